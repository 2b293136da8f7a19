"""Fault injection for the reliability tests: corrupt chosen micro-batches of a training rank.

Read from the environment the launcher passes to the ranks; with the variables unset (every real
run) ``LossFaults.apply`` returns the loss untouched. Indices are 0-based micro-batches counted from
the rank process's start, comma-separated, and only rank 0 corrupts them, so the other ranks must
agree with it (the non-finite policy's all-reduce is what is under test).
"""

from __future__ import annotations

import os

import torch

# The loss becomes NaN before the non-finite check.
FAULT_NONFINITE_ENV = "PRETRAIN_FAULT_NONFINITE_MICROBATCHES"
# The loss stays finite but its backward gives NaN gradients.
FAULT_NONFINITE_GRAD_ENV = "PRETRAIN_FAULT_NONFINITE_GRAD_MICROBATCHES"


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

    def apply(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` of the next micro-batch, corrupted if the environment names it."""
        if self.drawn in self.nan_loss:
            loss = loss + float("nan")
        if self.drawn in self.nan_grad:
            loss = _NaNGradient.apply(loss)
        self.drawn += 1
        return loss
