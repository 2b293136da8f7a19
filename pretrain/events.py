"""The run's timeline: one JSON line per resume, conversion, rollback or restart in ``train/events.jsonl``.

Written by training rank 0 (resume, conversion, rollback) and by the launcher (restart); read by the
report's timeline and its loss plot. A line cut short by a crash is skipped when read back.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"
EVENT_KINDS = ("resume", "conversion", "rollback", "restart")


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan" still says what happened
    return value


def record_event(train_dir: str | Path, kind: str, step: int | None, message: str, **details: Any) -> dict[str, Any]:
    """Append one event to ``<train_dir>/events.jsonl`` (fsynced: it outlives the crash it may announce)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}; one of {EVENT_KINDS}")
    event = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "kind": kind, "step": step,
             "message": message, **{k: _plain(v) for k, v in details.items()}}
    path = Path(train_dir) / EVENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        # A line torn by a crash ends without a newline: start on a fresh line, not glued to it.
        size = f.seek(0, os.SEEK_END)
        torn = size > 0 and os.pread(f.fileno(), 1, size - 1) != b"\n"
        f.write((("\n" if torn else "") + json.dumps(event) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    return event


def read_events(train_dir: str | Path) -> list[dict[str, Any]]:
    """Every complete event line of ``<train_dir>/events.jsonl``, oldest first ([] when none)."""
    path = Path(train_dir) / EVENTS_FILE
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # cut by a crash mid-write
    return events


def event_line(event: dict[str, Any]) -> str:
    """``step 105: rollback: ...`` for logs and the report."""
    step = event.get("step")
    return f"{'step ' + str(step) if step is not None else 'start'}: {event['kind']}: {event['message']}"


# Set by launch_training around the deepspeed launcher, which restarts nothing itself.
RESTART_COUNT_ENV = "PRETRAIN_PIPELINE_RESTART_COUNT"


def restart_count() -> int:
    """How often the launcher has restarted this rank group: torchrun's count, or ours for the deepspeed launcher."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get(RESTART_COUNT_ENV) or 0)
