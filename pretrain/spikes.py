"""Loss-spike detection and the rollback bookkeeping of ``train.recovery.spike_policy: rollback``.

Pure Python (no torch, no collectives): every rank feeds the same all-reduced step loss, so every
rank reaches the same verdict without another collective. Its state goes into the checkpoint's
client state, so a resumed run judges the next loss against the same window.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spike:
    """Why a loss was judged a spike: the loss and the threshold it crossed (NaN for a non-finite loss)."""

    loss: float
    mean: float
    std: float
    threshold: float

    def describe(self) -> str:
        if not math.isfinite(self.loss):
            return f"non-finite loss {self.loss}"
        return (f"loss {self.loss:.4g} > {self.threshold:.4g} "
                f"(rolling mean {self.mean:.4g} + k x std {self.std:.3g})")


class SpikeDetector:
    """A loss above ``mean + k * std`` of the last ``window`` finite losses is a spike, once the
    window is full; a NaN/inf loss is always one.

    A spike is not added to the window: the step is rolled back, and judging the replayed steps
    against a window that holds the spike would hide the next one.
    """

    def __init__(self, window: int, k: float) -> None:
        if window < 2:
            raise ValueError(f"spike window must hold at least 2 losses for a standard deviation, got {window}")
        if k <= 0:
            raise ValueError(f"spike k (standard deviations) must be positive, got {k}")
        self.window, self.k = window, k
        self.losses: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> Spike | None:
        """The spike ``loss`` would be, or None; changes nothing."""
        nan = float("nan")
        if not math.isfinite(loss):
            return Spike(loss, nan, nan, nan)
        if len(self.losses) < self.window:
            return None
        # Population std: the window is all there is, not a sample of a larger set.
        mean, std = statistics.fmean(self.losses), statistics.pstdev(self.losses)
        threshold = mean + self.k * std
        return Spike(loss, mean, std, threshold) if loss > threshold else None

    def observe(self, loss: float) -> Spike | None:
        """Judge ``loss``; a loss that is no spike joins the window."""
        spike = self.check(loss)
        if spike is None:
            self.losses.append(float(loss))
        return spike

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "k": self.k, "losses": list(self.losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the remembered losses; a run resumed with another window keeps the newest that fit."""
        self.losses = deque((float(v) for v in state["losses"]), maxlen=self.window)


class RollbackBudget:
    """How many rollbacks this run has made and the LR scale after the latest one.

    Unlike the detector (restored from the checkpoint rolled back to), this survives a rollback:
    the checkpoint predates the rollbacks that returned to it.
    """

    def __init__(self, max_rollbacks: int, lr_factor: float, lr_steps: int) -> None:
        self.max_rollbacks, self.lr_factor, self.lr_steps = max_rollbacks, lr_factor, lr_steps
        self.rollbacks = 0
        self.lr_scaled_until = 0  # steps below this run at lr x lr_factor

    def exhausted(self) -> bool:
        """True when one more rollback would exceed ``max_rollbacks``."""
        return self.rollbacks >= self.max_rollbacks

    def spend(self, resumed_step: int) -> None:
        """Count a rollback to ``resumed_step``; the LR is scaled for the next ``lr_steps`` steps."""
        self.rollbacks += 1
        self.lr_scaled_until = resumed_step + self.lr_steps

    def lr_scale(self, step: int) -> float:
        return self.lr_factor if step < self.lr_scaled_until else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"rollbacks": self.rollbacks, "lr_scaled_until": self.lr_scaled_until}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks, self.lr_scaled_until = int(state["rollbacks"]), int(state["lr_scaled_until"])


class RollBack(Exception):
    """Every rank agreed that step ``step`` went bad (a spike, or non-finite loss or gradients)."""

    def __init__(self, step: int, what: str, detail: str = "") -> None:
        super().__init__(f"{what} at step {step}" + (f" ({detail})" if detail else ""))
        self.step = step


class SpikeGuard:
    """``train.recovery``'s spike policy for one run: the detector plus the rollback budget."""

    def __init__(self, recovery: Any) -> None:
        self.enabled = recovery.spike_policy == "rollback"
        self.detector = SpikeDetector(recovery.spike_window, recovery.spike_k)
        self.budget = RollbackBudget(recovery.max_rollbacks, recovery.rollback_lr_factor, recovery.rollback_lr_steps)

    def judge(self, step: int, loss: float) -> None:
        """Raise RollBack when the policy is on and ``loss`` (the same on every rank) is a spike."""
        if not self.enabled:
            return
        spike = self.detector.observe(loss)
        if spike is not None:
            raise RollBack(step, "loss spike" if math.isfinite(loss) else "non-finite loss", spike.describe())

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "budget": self.budget.state_dict()}

    def load_state_dict(self, state: dict[str, Any] | None, rolling_back: bool = False) -> None:
        """Restore from a checkpoint's client state; a rollback keeps this run's budget, which the
        checkpoint (older than the rollbacks that returned to it) does not know."""
        if not state:  # a checkpoint from before spike detection: judge from an empty window
            return
        self.detector.load_state_dict(state["detector"])
        if not rolling_back:
            self.budget.load_state_dict(state["budget"])
