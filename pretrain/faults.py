"""Fault injection for the reliability tests: corrupt chosen micro-batches or steps of a training rank, or kill it.

Read from the environment the launcher passes to the ranks; with the variables unset (every real
run) ``LossFaults.apply`` returns the loss untouched. Indices are 0-based micro-batches counted from
the rank process's start, comma-separated, and only rank 0 corrupts them, so the other ranks must
agree with it (the non-finite policy's all-reduce is what is under test).
"""

from __future__ import annotations

import collections
import os
import signal

import torch

from pretrain.events import restart_count

# The loss becomes NaN before the non-finite check.
FAULT_NONFINITE_ENV = "PRETRAIN_FAULT_NONFINITE_MICROBATCHES"
# The loss stays finite but its backward gives NaN gradients.
FAULT_NONFINITE_GRAD_ENV = "PRETRAIN_FAULT_NONFINITE_GRAD_MICROBATCHES"
# Rank 0's step loss x SPIKE_FACTOR at these 1-based optimizer steps; a step listed n times spikes
# the first n times it is reached (a rollback replays it).
FAULT_SPIKE_ENV = "PRETRAIN_FAULT_SPIKE_STEPS"
SPIKE_FACTOR = 10.0
# "rank:step": that rank SIGKILLs itself before the step, in the rank group's first start only
# (a launcher restart must not be killed again).
FAULT_KILL_ENV = "PRETRAIN_FAULT_KILL_RANK_AT_STEP"


def injected_nonfinite(rank: int, env: str = FAULT_NONFINITE_ENV) -> set[int]:
    raw = os.environ.get(env, "")
    return {int(v) for v in raw.split(",") if v.strip()} if rank == 0 else set()


class _NaNGradient(torch.autograd.Function):
    """The identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


class LossFaults:
    """The micro-batch losses this rank corrupts, by the index of the micro-batch drawn."""

    def __init__(self, rank: int) -> None:
        self.nan_loss = injected_nonfinite(rank, FAULT_NONFINITE_ENV)
        self.nan_grad = injected_nonfinite(rank, FAULT_NONFINITE_GRAD_ENV)
        self.drawn = 0
        steps = os.environ.get(FAULT_SPIKE_ENV, "") if rank == 0 else ""
        self.spikes = collections.Counter(int(v) for v in steps.split(",") if v.strip())
        kill = os.environ.get(FAULT_KILL_ENV, "")
        kill_rank, _, kill_step = kill.partition(":")
        self.kill_step = int(kill_step) if kill and int(kill_rank) == rank and restart_count() == 0 else None

    def apply(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` of the next micro-batch, corrupted if the environment names it."""
        if self.drawn in self.nan_loss:
            loss = loss + float("nan")
        if self.drawn in self.nan_grad:
            loss = _NaNGradient.apply(loss)
        self.drawn += 1
        return loss

    def spike(self, step: int, loss: float) -> float:
        """``loss`` of optimizer step ``step``, multiplied into a spike if the environment names it."""
        if self.spikes[step] > 0:
            self.spikes[step] -= 1
            return loss * SPIKE_FACTOR
        return loss

    def kill_before(self, step: int) -> None:
        """SIGKILL this rank (no cleanup, as a lost node) before ``step`` if the environment says so."""
        if step == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
