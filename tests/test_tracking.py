"""W&B resume after ``kill -9``: the same run id continues at once, with each step logged once.

Real W&B (offline) in real processes: a Tracker in a subprocess logs steps (as if it had
checkpointed along the way), is killed with SIGKILL, and a new Tracker with ``resume_id`` re-runs
the steps after the checkpoint, as a resumed training run does; twice, then it finishes. The
processes inherit ``WANDB_SERVICE`` from a live parent holding a W&B service (as ranks do from the
Prefect flow process, or from pytest after an in-process eval): that service used to keep the dead
run's stream open, so the resumed ``wandb.init`` failed with "run ID ... is in use" until the
parent exited. The second kill leaves the process's own wandb-core orphaned.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.tracking import last_logged_step, run_log_files

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

# argv: run_dir resume_id first_step last_step loss_offset finish|hang
CHILD = r"""
import sys, time
from pretrain.tracking import Tracker
from pretrain_pipeline.config import TrackingConfig

run_dir, resume_id, first, last, offset, end = sys.argv[1:]
tracker = Tracker(TrackingConfig(wandb_mode="offline"), run_dir, resume_id=resume_id or None)
for step in range(int(first), int(last) + 1):
    tracker.log({"train/loss": float(offset) + step}, step=step)
print("LOGGED", tracker.run_id, tracker.first_wandb_step, flush=True)
if end == "finish":
    tracker.finish()
else:
    time.sleep(600)
"""

# A parent that has used W&B: its service lives as long as it does and children inherit the token.
SERVICE_HOLDER = "import os, sys, wandb; wandb.setup(); print(os.environ['WANDB_SERVICE'], flush=True); sys.stdin.read()"


def history(log_file: Path) -> dict[int, float]:
    """step -> train/loss of every history row in a ``.wandb`` log, read with W&B's reader
    (``wandb leet inspect --json``; wandb-core directly, without the CLI's start-up)."""
    from wandb.util import get_core_path

    out = subprocess.run(
        [get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(log_file),
         str(log_file.parent.parent)],
        capture_output=True, text=True, check=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    rows: dict[int, float] = {}
    for line in out.stdout.splitlines():
        rec = json.loads(line)
        if rec["type"] == "history":
            step = int(rec["history"]["step"]["num"])
            assert step not in rows, f"step {step} twice in {log_file}"
            rows[step] = rec["history"]["item"]["train/loss"]
    return rows


def run_id_of(log_file: Path) -> str:
    from wandb.util import get_core_path

    out = subprocess.run(
        [get_core_path(), "leet", "inspect", "--no-observability", "--summary", "--json", "--run-file",
         str(log_file), str(log_file.parent.parent)],
        capture_output=True, text=True, check=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    return json.loads(out.stdout)["run_id"]


def wait_for_committed_step(run_dir: Path, run_id: str, step: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        files = run_log_files(run_dir / "wandb", run_id)
        if files and last_logged_step(files[-1]) == step:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"step {step} never reached {files}")
        time.sleep(0.3)


def start_leg(run_dir: Path, env: dict[str, str], resume_id: str, first: int, last: int, offset: int) -> tuple[subprocess.Popen, str, int]:
    err = open(run_dir.parent / f"leg-{first}.stderr", "w+")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(run_dir), resume_id, str(first), str(last), str(offset), "hang"],
                            env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    line = proc.stdout.readline().split()
    if not line:  # the Tracker failed: show why
        proc.wait()
        err.seek(0)
        raise AssertionError(f"Tracker process failed (rc {proc.returncode}):\n{err.read()[-3000:]}")
    word, run_id, first_wandb_step = line
    assert word == "LOGGED"
    return proc, run_id, int(first_wandb_step)


def test_resume_after_sigkill_continues_the_same_run_without_step_collisions(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", SERVICE_HOLDER], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    env["WANDB_SERVICE"] = holder.stdout.readline().strip()
    assert env["WANDB_SERVICE"], "the holder did not start a W&B service"
    run_dir = tmp_path / "run"
    try:
        # Leg 1: steps 1-6 (checkpoint at 3), killed. Step 6 stays open in W&B until a later step
        # arrives, so wait for 1-5 to reach the log file first.
        proc, run_id, first_a = start_leg(run_dir, env, "", 1, 6, 0)
        wait_for_committed_step(run_dir, run_id, 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Leg 2: resumed from step 3, re-runs 4-9 (checkpoint at 6), killed; its own wandb-core is
        # orphaned by the kill, as a rank's is.
        proc, same_id, first_b = start_leg(run_dir, env, run_id, 4, 9, 100)
        assert same_id == run_id
        wait_for_committed_step(run_dir, run_id, 8)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Leg 3: resumed from step 6, re-runs 7-12 and finishes.
        done = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), run_id, "7", "12", "200", "finish"],
                              env=env, capture_output=True, text=True, timeout=50)
        assert done.returncode == 0, done.stderr[-3000:]
        word, same_id, first_c = done.stdout.split()
        assert word == "LOGGED" and same_id == run_id
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)

    logs = run_log_files(run_dir / "wandb", run_id)
    assert len(logs) == 3 and {run_id_of(f) for f in logs} == {run_id}
    rows = [history(f) for f in logs]
    # Each step once across the three processes: each resumed run starts where the log ends.
    assert [first_a, first_b, int(first_c)] == [0, max(rows[0]) + 1, max(rows[1]) + 1]
    assert sorted(s for r in rows for s in r) == list(range(1, 13))
    for offset, r in zip((0, 100, 200), rows):
        assert r == {s: offset + s for s in r}
    # metrics.jsonl keeps every line the processes logged (re-run steps included).
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [*range(1, 7), *range(4, 10), *range(7, 13)]
