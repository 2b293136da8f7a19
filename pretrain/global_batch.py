"""The global batch across cluster shapes: micro_batch_size x grad_accum_steps x world size samples.

A run resumed on another number of ranks keeps the global batch its checkpoint recorded (so the
optimizer sees the same batches and the LR schedule keeps its meaning) by changing
grad_accum_steps; where no whole accumulation fits, the launch is refused before any process
starts, naming the numbers and the nearest settings that work. Pure functions, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pretrain_pipeline.errors import UserError


@dataclass(frozen=True)
class BatchLayout:
    """How one optimizer step's samples are split: per rank, per micro-step, over ranks."""

    micro_batch_size: int
    grad_accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    @property
    def micro_step(self) -> int:
        """Samples all ranks read together in one micro-step."""
        return self.micro_batch_size * self.world_size

    def describe(self) -> str:
        ranks = "rank" if self.world_size == 1 else "ranks"
        return (f"{self.global_batch} samples = {self.micro_batch_size} x {self.grad_accum_steps} x "
                f"{self.world_size} {ranks}")

    def state(self) -> dict[str, int]:
        """The fields a data state records (read back by :meth:`from_state`)."""
        return {"global_batch": self.global_batch, "micro_batch_size": self.micro_batch_size,
                "grad_accum_steps": self.grad_accum_steps, "world_size": self.world_size}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BatchLayout | None:
        """The layout a data state was saved with; None for states from before it was recorded."""
        if "global_batch" not in state:
            return None
        return cls(int(state["micro_batch_size"]), int(state["grad_accum_steps"]), int(state["world_size"]))


class GlobalBatchRefused(UserError, ValueError):
    """No grad_accum_steps keeps the recorded global batch on the new ranks and micro-batch."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(values: list[int], target: int) -> list[int]:
    """The closest value below and the closest above ``target`` (those that exist)."""
    below = [v for v in values if v < target]
    above = [v for v in values if v > target]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def nearest_settings(global_batch: int, micro_batch_size: int, world_size: int) -> list[str]:
    """Settings near the asked ones that keep ``global_batch``: other rank counts with this
    micro-batch, then other micro-batch sizes on these ranks."""
    options = []
    if global_batch % micro_batch_size == 0:
        for w in _nearest(_divisors(global_batch // micro_batch_size), world_size):
            options.append(f"{w} rank{'s' * (w > 1)} (grad_accum_steps {global_batch // (micro_batch_size * w)})")
    if global_batch % world_size == 0:
        for m in _nearest(_divisors(global_batch // world_size), micro_batch_size):
            options.append(f"micro_batch_size {m} with grad_accum_steps {global_batch // (m * world_size)} "
                           f"on {world_size} rank{'s' * (world_size > 1)}")
    return options


def keep_global_batch(saved: BatchLayout, micro_batch_size: int, world_size: int) -> BatchLayout:
    """The layout on ``world_size`` ranks with ``micro_batch_size`` that keeps ``saved``'s global
    batch (only grad_accum_steps changes); raises GlobalBatchRefused naming the nearest that work."""
    total, per_micro_step = saved.global_batch, micro_batch_size * world_size
    if total % per_micro_step == 0:
        return BatchLayout(micro_batch_size, total // per_micro_step, world_size)
    options = nearest_settings(total, micro_batch_size, world_size)
    ranks = "rank" if world_size == 1 else "ranks"
    raise GlobalBatchRefused(
        f"global batch {saved.describe()} (micro_batch_size x grad_accum_steps x ranks); on {world_size} {ranks} "
        f"with micro_batch_size {micro_batch_size} no grad_accum_steps fits ({total} is not a multiple of "
        f"{micro_batch_size} x {world_size} = {per_micro_step}): "
        + (f"use {', or '.join(options)}" if options
           else "no setting near these keeps it; set train.resume: never to start over")
    )
