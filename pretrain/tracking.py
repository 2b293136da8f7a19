"""Experiment tracking: Weights & Biases behind a four-member interface, plus ``metrics.jsonl``.

``metrics.jsonl`` is always written (the report and tests read it without W&B); W&B runs in the
mode the config names (offline by default: files under ``runs/<name>/wandb/``, sync later with
``wandb sync``). Only rank 0 should create a Tracker. The API key, if any, stays in the environment.

Resuming after a crash or ``kill -9`` (``resume_id`` = the id saved in the checkpoint):

* Each Tracker talks to a W&B service (``wandb-core``) started by its own process. A service
  inherited through ``WANDB_SERVICE`` (set by any parent that used W&B: the Prefect flow process,
  pytest, a notebook) outlives a killed rank and keeps the dead run's stream open, so the resumed
  run's ``wandb.init`` gets "run ID ... is in use" until that parent exits. Our own service exits
  with our process (wandb-core watches its parent), so nothing holds the id after a kill.
* A resumed run re-runs the steps after its checkpoint, some of which the killed process already
  logged. W&B online drops steps below the resumed run's step by itself; offline nothing does, so we
  read the last step in this run's earlier ``.wandb`` logs and skip W&B logging up to it
  (``metrics.jsonl`` still gets every line). ``wandb sync`` of all the run's folders then yields
  one history with each step once.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pretrain_pipeline.config import TrackingConfig


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; a diverged loss is still worth a line, as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# WANDB_SERVICE is "<version>-<pid of the process that started the service>-<unix|tcp>-...".
_SERVICE_OWNER = re.compile(r"^\d+-(\d+)-")


def drop_inherited_wandb_service() -> bool:
    """Forget a W&B service started by another process, so ``wandb.init`` starts our own.

    Returns True if one was dropped.
    """
    token = os.environ.get("WANDB_SERVICE")
    if not token:
        return False
    owner = _SERVICE_OWNER.match(token)
    if owner and int(owner.group(1)) == os.getpid():
        return False  # ours (an earlier Tracker in this process): reuse it
    # Read once, when this process first talks to W&B: call this before any other W&B use.
    os.environ.pop("WANDB_SERVICE")
    return True


def run_log_files(wandb_dir: str | Path, run_id: str) -> list[Path]:
    """The transaction logs (``.wandb``) of every earlier process of this run, oldest first."""
    return sorted(Path(wandb_dir).glob(f"*-{run_id}/run-{run_id}.wandb"))


def last_logged_step(log_file: str | Path) -> int | None:
    """The last history step committed to a ``.wandb`` log, read with W&B's own reader
    (``wandb leet inspect --summary --json``, run through wandb-core directly to skip the CLI's
    start-up). None if the log holds no history row yet."""
    from wandb.util import get_core_path

    log_file = Path(log_file)
    cmd = [get_core_path(), "leet", "inspect", "--no-observability", "--summary", "--json",
           "--run-file", str(log_file), str(log_file.parent.parent)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise RuntimeError(f"could not read W&B log {log_file}: {out.stderr.strip() or out.stdout.strip()}")
    summary = json.loads(out.stdout)
    # "step" is 0 for a log without history rows; the summary's "_step" tells the two apart.
    if "_step" not in (summary.get("summary") or {}):
        return None
    return int(summary["step"])


def wandb_credentials() -> str | None:
    """Where W&B will take its credentials from (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, or
    the netrc entry for ``WANDB_BASE_URL`` that ``wandb login`` writes), or None. Looked up the way
    wandb itself does, without contacting the server: ranks on other nodes get no WANDB_API_KEY from
    the launcher, only their own ~/.netrc."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(name):
            return name
    host = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth
    except ImportError:  # moved in another wandb release: read the netrc entry ourselves
        import netrc
        from urllib.parse import urlsplit

        try:
            entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(host).netloc)
        except (FileNotFoundError, netrc.NetrcParseError):
            return None
        return "netrc" if entry and entry[2] else None
    return "netrc" if read_netrc_auth(host=host) else None


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
        # W&B history already holds steps below this (logged by an earlier, killed process).
        self.first_wandb_step = 0
        self.mode = cfg.wandb_mode
        if cfg.wandb_mode == "disabled":
            return
        import wandb

        if cfg.wandb_mode == "online" and not wandb_credentials():
            raise RuntimeError(
                "tracking.wandb_mode is online but W&B has no credentials on this node: set WANDB_API_KEY "
                "in the environment or run `wandb login` here (it writes ~/.netrc)"
            )
        drop_inherited_wandb_service()
        wandb_dir = self.run_dir / "wandb"
        if resume_id:
            steps = []
            for log_file in run_log_files(wandb_dir, resume_id):
                try:
                    step = last_logged_step(log_file)
                except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as err:
                    # A damaged log must not stop a resume; at worst W&B sees some steps twice.
                    print(f"[tracking] warning: {err}; its steps may be logged again", file=sys.stderr, flush=True)
                    continue
                if step is not None:
                    steps.append(step)
            self.first_wandb_step = max(steps) + 1 if steps else 0
            # W&B names a run's folder by its start second; a restart within that second would
            # write into the killed process's folder and log file.
            prefix = "offline-run" if cfg.wandb_mode == "offline" else "run"
            while (wandb_dir / f"{prefix}-{time.strftime('%Y%m%d_%H%M%S')}-{resume_id}").exists():
                time.sleep(0.1)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            tags=cfg.tags or None,
            group=cfg.group,
            name=run_name or self.run_dir.name,
            config=config_dict or {},
            dir=str(self.run_dir),
            mode=cfg.wandb_mode,
            id=resume_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, save_code=False, disable_git=True),
        )
        # Online, the server tells a resumed run where its history ends.
        self.first_wandb_step = max(self.first_wandb_step, self._run.starting_step or 0)

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
        if self._run is not None and step >= self.first_wandb_step:
            self._run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def event(self, event: dict[str, Any]) -> None:
        """A timeline event (``pretrain.events``): counted as ``events/<kind>`` at its step, and the
        run's events so far listed in the summary."""
        if self._run is None:
            return
        from pretrain.events import event_line, read_events

        step = event.get("step")
        if step is not None and step >= self.first_wandb_step:
            self._run.log({f"events/{event['kind']}": 1}, step=step)
        self._run.summary["events"] = [event_line(e) for e in read_events(self.run_dir / "train")]

    def skip_wandb_until(self, step: int) -> None:
        """Log steps below ``step`` to metrics.jsonl only: W&B already has them (a rollback replays them)."""
        self.first_wandb_step = max(self.first_wandb_step, step)

    def summary(self, values: dict[str, Any]) -> None:
        if self._run is not None:
            self._run.summary.update(values)

    def table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table in the run (a W&B Table; metrics.jsonl gets its rows as records)."""
        self._metrics.write(json.dumps({"table": key, "rows": [dict(zip(columns, map(_clean, r))) for r in rows]}) + "\n")
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def finish(self, exit_code: int = 0) -> None:
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
        if not self._metrics.closed:
            self._metrics.close()


def metrics_by_step(metrics_path: str | Path, key: str = "train/loss") -> dict[int, dict[str, Any]]:
    """The records of ``metrics.jsonl`` that carry ``key``, by step. A step logged again after a
    resume (the killed run got past the checkpoint it resumed from) keeps its newest record."""
    out: dict[int, dict[str, Any]] = {}
    for line in Path(metrics_path).read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record
    return out


def losses_by_step(metrics_path: str | Path) -> dict[int, float]:
    return {step: record["train/loss"] for step, record in metrics_by_step(metrics_path).items()}
