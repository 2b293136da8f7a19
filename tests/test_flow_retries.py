"""Prefect retries a stage task only when a second try can pass: a Ray worker killed under it is
retried, a missing input is not (it would fail the same way, after the retry delay)."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in its own interpreter: Prefect's temporary server (as `pretrain-pipeline run` starts it)
# and a local Ray stay out of the pytest process.
FLOW_SCRIPT = r"""
import json, os, signal, sys, threading, time
from pathlib import Path

from pretrain_pipeline.stages import configure_environment
configure_environment()

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client

from data_prep.ray_runtime import RayRunner, ray_session
from flows.pipeline import clean_task, retry_if_transient
from pretrain_pipeline.config import RuntimeConfig, load_config

work = Path(sys.argv[1])


def sleeping_unit(unit, work):
    # The first worker to get here is killed by the driver while it sleeps; a retry finds it done.
    if not (Path(work) / "killed").exists():
        (Path(work) / f"pid-{os.getpid()}").touch()
        time.sleep(120)
    return unit


def kill_first_worker(work):
    while not (work / "killed").exists():
        for pid_file in work.glob("pid-*"):
            os.kill(int(pid_file.name[4:]), signal.SIGKILL)
            (work / "killed").touch()
        time.sleep(0.05)


@task(name="ray-work", retries=1, retry_delay_seconds=0, retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def ray_work(work):
    threading.Thread(target=kill_first_worker, args=(work,), daemon=True).start()
    return list(RayRunner(retries=0).map(sleeping_unit, [7], describe=lambda u: f"unit {u}", desc="unit",
                                         shared=(str(work),)))


@flow(name="retries")
def retries(cfg):
    return {"clean": clean_task(cfg, return_state=True), "ray-work": ray_work(work, return_state=True)}


cfg = load_config(str(Path.cwd() / "configs" / "smoke.yaml"), [
    "data.sample_corpus=false", f"data.inputs=[{work}/raw/*.jsonl]", f"runtime.runs_root={work}/runs",
    "runtime.num_cpus=1"])
with ray_session(RuntimeConfig(num_cpus=1)):
    states = retries(cfg)
with get_client(sync_client=True) as client:
    runs = {name: client.read_task_run(s.state_details.task_run_id) for name, s in states.items()}
print(json.dumps({name: {"attempts": run.run_count, "state": run.state.type.value, "message": run.state.message}
                  for name, run in runs.items()}))
"""


@pytest.mark.integration
def test_prefect_retries_a_killed_ray_worker_not_a_missing_input(tmp_path):
    env = {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"),
           "PREFECT_HOME": str(tmp_path / "state" / "prefect"), "PRETRAIN_PIPELINE_QUIET": "1"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-c", FLOW_SCRIPT, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    assert runs["clean"]["state"] == "FAILED" and "matches no" in runs["clean"]["message"]
    assert runs["clean"]["attempts"] == 1, "a missing input was retried"
    assert (tmp_path / "killed").exists(), "no Ray worker was killed"
    assert runs["ray-work"] == {"attempts": 2, "state": "COMPLETED", "message": runs["ray-work"]["message"]}


def test_only_lost_workers_and_transient_os_errors_are_retried():
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    from pretrain.global_batch import GlobalBatchRefused
    from pretrain_pipeline.config import ConfigError
    from pretrain_pipeline.errors import MissingInput, UserError, is_transient

    def wrapped(cause: BaseException) -> BaseException:
        """As the Ray runner reports a failed unit: a RuntimeError raised from the cause."""
        try:
            raise RuntimeError("clean: unit 3 failed") from cause
        except RuntimeError as err:
            return err

    for retried in (WorkerCrashedError(), RayActorError(), NodeDiedError("node 1 died"),
                    OSError(errno.EIO, "I/O error"), OSError(errno.ESTALE, "stale handle"), ConnectionResetError()):
        assert is_transient(retried) and is_transient(wrapped(retried)), retried
    for final in (ValueError("bad value"), ConfigError("c.yaml: train.lr"), MissingInput("input 'x' matches no file"),
                  GlobalBatchRefused("no grad_accum_steps"), FileNotFoundError(errno.ENOENT, "gone"),
                  OSError(errno.ENOSPC, "No space left"), RuntimeError("bug"), TypeError("bug")):
        assert not is_transient(final) and not is_transient(wrapped(final)), final
    # A user error stays final even when a lost worker shows up further down its chain.
    try:
        raise UserError("refusing to resume") from WorkerCrashedError()
    except UserError as err:
        assert not is_transient(err)
