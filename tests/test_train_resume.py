"""SIGKILL mid-run, ``--resume auto``: every later loss is bitwise equal to the uninterrupted run (CPU fp32).

Also covers ZeRO-1 on real shards (the straight run must reduce the loss) and MFU/memory metrics.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import dump_config, merge_tree
from synthetic import make_synthetic_run, synthetic_run_config  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration


def make_cfg(root: Path, **train):
    # W&B offline, as in production: the resumed run must continue the killed run's W&B run.
    return synthetic_run_config(root, merge_tree({
        "micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 10, "log_every": 1, "device": "cpu",
        "precision": "fp32", "zero": {"stage": 1}, "launch": {"nproc_per_node": 2},
        "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
        "validation": {"every": 100, "batches": 2}, "checkpoint": {"every": 3, "keep_last": 2},
        "plan": {"peak_tflops": 1.0},
    }, train), wandb_mode="offline")


@pytest.fixture()
def offline_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_sigkill_then_resume_auto_is_bitwise_equal(offline_env, tmp_path):
    from pretrain.launch import build_command, build_env, launch_training

    straight = RunPaths(tmp_path / "straight")
    make_synthetic_run(straight.root)
    launch_training(make_cfg(straight.root), straight, log=lambda _: None)
    expected = losses_by_step(straight.metrics)
    assert sorted(expected) == list(range(1, 11))
    assert expected[10] < expected[1] - 0.5, expected  # ZeRO-1 on real shards learns
    records = [json.loads(x) for x in straight.metrics.read_text().splitlines()]
    last = [r for r in records if "train/loss" in r][-1]
    # MFU logged against the configured 1 TFLOP/s peak; memory is the rank's peak RSS.
    assert 0 < last["train/mfu"] < 1 and last["memory/max_rss_gb"] > 0.05

    killed = RunPaths(tmp_path / "killed")
    make_synthetic_run(killed.root)
    cfg = make_cfg(killed.root)
    killed.train.mkdir(parents=True, exist_ok=True)
    killed.config.write_text(dump_config(cfg))
    proc = subprocess.Popen(
        build_command(cfg, killed), env=build_env(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
    )
    # A random point after the first checkpoint (step 3 is complete before step 4 runs): a step from
    # 4 to 6 and a moment after it (PRETRAIN_PIPELINE_FAULT_SEED, as the reliability suite), early
    # enough that the ranks, which may run ahead of our pipe reader, cannot reach the end first.
    rng = random.Random(int(os.environ.get("PRETRAIN_PIPELINE_FAULT_SEED", "0")))
    kill_after, delay = rng.randint(4, 6), rng.uniform(0.0, 0.05)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if f"[pretrain] step {kill_after} loss" in line:
            time.sleep(delay)
            break
    # torchrun starts each rank in its own session, so killing the launcher's group alone would
    # orphan the ranks: SIGKILL the whole tree at once, as a node loss would.
    import psutil

    tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    # The ranks may have run ahead of our pipe reader by a checkpoint or two, never to the end.
    tag = (killed.checkpoints / "latest").read_text().strip()
    assert tag in ("step_000003", "step_000006", "step_000009") and "summary.json" not in os.listdir(killed.train)
    resumed_at = int(tag.split("_")[1])
    from pretrain.checkpoint import load_client_state

    killed_wandb_id = load_client_state(killed.checkpoints)["wandb_run_id"]
    assert killed_wandb_id

    lines: list[str] = []
    result = launch_training(cfg, killed, log=lines.append)  # resume: auto is the default
    assert any("resumed from" in x and tag in x for x in lines), lines
    got = losses_by_step(killed.metrics)
    assert result.steps == 10
    assert result.wandb_run_id == killed_wandb_id  # same W&B run, not a fork
    for step in range(resumed_at + 1, 11):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise, not approx
