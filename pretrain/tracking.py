"""Experiment tracking: Weights & Biases behind a four-member interface, plus ``metrics.jsonl``.

``metrics.jsonl`` is always written (the report and tests read it without W&B); W&B runs in the
mode the config names (offline by default: files under ``runs/<name>/wandb/``, sync later with
``wandb sync``). Only rank 0 should create a Tracker. The API key, if any, stays in the environment.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from pretrain_pipeline.config import TrackingConfig


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; a diverged loss is still worth a line, as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


RUN_ID_WAIT_SECONDS = 120.0


class Tracker:
    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str | Path,
        config_dict: dict[str, Any] | None = None,
        resume_id: str | None = None,
        run_name: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.metrics_path, "a", buffering=1, encoding="utf-8")
        self._run = None
        self.mode = cfg.wandb_mode
        if cfg.wandb_mode == "disabled":
            return
        import wandb

        if cfg.wandb_mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise RuntimeError("tracking.wandb_mode is online but WANDB_API_KEY is not set in the environment")
        kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            tags=cfg.tags or None,
            name=run_name or self.run_dir.name,
            config=config_dict or {},
            dir=str(self.run_dir),
            mode=cfg.wandb_mode,
            id=resume_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False, disable_git=True),
        )
        # After a preemption or kill -9, the dead run's W&B service can hold the run id for a while
        # ("run ID ... is in use"); a resumed run waits for it rather than failing or forking.
        deadline = time.monotonic() + RUN_ID_WAIT_SECONDS
        while True:
            try:
                self._run = wandb.init(**kwargs)
                break
            except Exception as err:  # noqa: BLE001 - wandb raises its own error types per version
                if "in use" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(3)

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def offline_dir(self) -> str | None:
        """The W&B run folder (what ``wandb sync`` takes) when running offline."""
        if self._run is None:
            return None
        return str(Path(self._run.dir).parent)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        if self._run is not None:
            self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(values)

    def finish(self, exit_code: int = 0) -> None:
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
        if not self._metrics.closed:
            self._metrics.close()
