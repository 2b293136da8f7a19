"""``train.launch.launcher: ray``: the torchrun ranks' training function run by Ray Train's TorchTrainer.

(a) Two workers on a local Ray give the same per-step losses as torchrun's two processes, and
    only rank 0 logs (one W&B offline run, one metrics file).
(b) On a two-node Ray cluster on this machine (conftest's ``two_node_cluster``: a head and a
    second ``ray start`` node, one CPU each, so one worker lands on each), one worker is SIGKILLed
    mid-run; FailureConfig makes Ray Train restart the whole group, which resumes from the last
    checkpoint in the run directory, finishes every step, and logs exactly the uninterrupted
    run's losses from the resume on (CPU fp32).
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

from pretrain.launch import launch_training
from pretrain.ray_launch import SECRET_ENV, read_attempts, worker_env
from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths, read_stage_record
from pretrain_pipeline.config import dump_config
from test_train_resume import make_cfg  # tests/ is on sys.path (rootdir conftest)
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

# Enough steps after the step-3 checkpoint that the kill lands mid-run, few enough to stay quick.
STEPS = 24


def test_worker_env_carries_rank_settings_but_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "planted-secret-key")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    cfg = make_cfg(tmp_path / "r", launch={"launcher": "ray"})
    env = worker_env(cfg, "cpu")
    assert env["DS_ACCELERATOR"] == "cpu" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["WANDB_MODE"] == cfg.tracking.wandb_mode and "TORCH_EXTENSIONS_DIR" in env
    # Ray records the runtime_env (dashboard, job table): secrets stay in each node's environment.
    assert not set(SECRET_ENV) & set(env) and "planted-secret-key" not in json.dumps(env)
    assert "DS_ACCELERATOR" not in worker_env(cfg, "cuda")


def test_ray_launcher_config_is_checked(tmp_path):
    from pretrain.launch import build_command

    with pytest.raises(ValueError, match="launcher=ray"):
        make_cfg(tmp_path / "r", launch={"launcher": "ray", "nnodes": 2, "node_rank": 1})
    with pytest.raises(ValueError, match="launcher=ray"):
        build_command(make_cfg(tmp_path / "r", launch={"launcher": "ray"}), RunPaths(tmp_path / "r"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted torchrun 2-process run both Ray runs are compared with."""
    paths = RunPaths(tmp_path_factory.mktemp("straight") / "run")
    make_synthetic_run(paths.root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_PIPELINE_STATE", str(paths.root.parent / "state"))
        launch_training(make_cfg(paths.root, max_steps=STEPS), paths, log=lambda _: None)
    losses = losses_by_step(paths.metrics)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.integration
def test_ray_train_two_workers_equal_torchrun(straight, tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    paths = RunPaths(tmp_path / "ray")
    make_synthetic_run(paths.root)
    cfg = make_cfg(paths.root, max_steps=STEPS, launch={"launcher": "ray"})
    cfg.runtime.num_cpus = 2  # a local Ray: one CPU per worker
    cfg.tracking.wandb_mode = "offline"
    lines: list[str] = []
    result = launch_training(cfg, paths, log=lines.append)

    assert result.steps == STEPS and read_stage_record(paths.train) is not None
    assert losses_by_step(paths.metrics) == straight  # same function, ranks and seeds: bitwise equal
    (attempt,) = read_attempts(paths)
    assert attempt["world_size"] == 2 and attempt["resume_from"] is None
    assert len({r["pid"] for r in attempt["ranks"]}) == 2  # two worker processes, not one
    # Only rank 0 tracks: one W&B offline run holding the run's id, one metrics line per step.
    runs = list((paths.root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and result.wandb_run_id and runs[0].name.endswith(result.wandb_run_id)
    assert list(runs[0].glob("*.wandb")) and os.path.getsize(next(runs[0].glob("*.wandb"))) > 0
    steps = [json.loads(x)["step"] for x in paths.metrics.read_text().splitlines() if "train/loss" in x]
    assert steps == list(range(1, STEPS + 1))
    # The driver's log (the Prefect task log) follows rank 0's steps, as with torchrun.
    logged = [line for line in lines if line.startswith("[pretrain] step ") and " loss " in line]
    assert [int(line.split()[2]) for line in logged] == steps, lines


def _wait_until(cond, driver: subprocess.Popen, log: Path, what: str, limit: float = 480.0):
    """Poll ``cond`` while the driver runs. The limit only stops a hung test; nothing is timed."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if driver.poll() is not None:
            pytest.fail(f"driver exited ({driver.returncode}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.05)
    driver.kill()
    pytest.fail(f"gave up waiting for {what}:\n{log.read_text()[-4000:]}")


@pytest.mark.integration
def test_killed_worker_on_two_nodes_is_restarted_and_resumes_exactly(straight, two_node_cluster, tmp_path):
    address, _dashboard, cluster_env = two_node_cluster
    paths = RunPaths(tmp_path / "runs" / "killed")
    make_synthetic_run(paths.root)
    cfg = make_cfg(paths.root, max_steps=STEPS, launch={"launcher": "ray", "ray_max_failures": 2})
    config_file = tmp_path / "killed.yaml"
    config_file.write_text(dump_config(cfg))
    env = {**cluster_env, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"), "PRETRAIN_PIPELINE_QUIET": "1"}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "driver.log"
    # The driver is its own process: it must present the cluster's token, which this one must not.
    with open(log, "w") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", "pretrain_pipeline.cli", "train", "--config", str(config_file),
             "--ray-address", address],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )
    try:
        first = _wait_until(lambda: (read_attempts(paths) or [None])[0], driver, log, "the workers started")
        assert len({r["node_id"] for r in first["ranks"]}) == 2, first  # one worker on each node
        # Step 4 logged means the step-3 checkpoint is complete.
        _wait_until(lambda: paths.metrics.exists() and max(losses_by_step(paths.metrics), default=0) >= 4,
                    driver, log, "step 4")
        victim = next(r for r in first["ranks"] if r["rank"] == 1)  # not the rank that logs
        os.kill(victim["pid"], signal.SIGKILL)
        assert not (paths.train / "summary.json").exists(), "training finished before the kill"
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()

    attempts = read_attempts(paths)
    assert len(attempts) == 2, attempts  # FailureConfig restarted the group exactly once
    retry = attempts[1]
    assert retry["resume_from"] in {f"step_{s:06d}" for s in range(3, STEPS, 3)}, retry
    assert not {r["pid"] for r in retry["ranks"]} & {r["pid"] for r in first["ranks"]}  # new processes
    assert "restarted the worker group 1 time" in log.read_text()
    summary = json.loads((paths.train / "summary.json").read_text())
    assert summary["completed"] and summary["steps"] == STEPS
    got = losses_by_step(paths.metrics)
    assert sorted(got) == list(range(1, STEPS + 1))
    resumed_at = int(retry["resume_from"].split("_")[1])
    for step in range(resumed_at + 1, STEPS + 1):
        assert got[step] == straight[step], (step, got[step], straight[step])  # bitwise, not approx
