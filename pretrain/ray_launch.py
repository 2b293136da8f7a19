"""``train.launch.launcher: ray``: the torchrun ranks' training function, run by Ray Train across a Ray cluster.

The driver (the CLI or the Prefect flow process) joins ``runtime.ray_address`` or starts a local
Ray (``data_prep.ray_runtime.ray_session``, the one place that starts Ray), then a
``TorchTrainer`` starts ``nnodes * nproc_per_node`` workers. Ray Train creates the process group
(gloo on CPU, NCCL on GPU) and sets the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_*``
variables torchrun would; each worker then runs ``pretrain.trainer.Trainer`` on the run directory's
``config.yaml``, exactly as a torchrun rank does (DeepSpeed finds the process group already up).

Fault tolerance: when a worker dies, ``FailureConfig(max_failures)`` makes Ray Train tear down and
restart the whole group, and ``Trainer`` resumes from the latest checkpoint in the run directory
(``train.resume: auto``). Ray Train's own checkpoint reporting is not used: our checkpoints already
hold the data loader position and every RNG state, which is what makes the resume exact.

The run directory must be on storage every node sees (as for multi-node torchrun). Ray Train
runs the function in a worker thread, so the ranks' SIGTERM handler (save, then exit) is not
installed there: a preempted worker is handled like a lost one, from the last periodic checkpoint.
Worker output goes to Ray's logs (and the driver's terminal), not to train/launcher.log; the driver
follows rank 0's ``metrics.jsonl`` and passes its step and validation lines to ``log`` (the Prefect
task log), as the torchrun launcher passes the ranks' output.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import PipelineConfig

# What a rank needs from the launcher's environment (see launch.build_env). Only these travel in
# the workers' runtime_env, which Ray records and shows in its dashboard, so secrets never do:
# WANDB_API_KEY reaches rank 0 from its node's own environment (a Kubernetes Secret, the instance
# environment; a local Ray's workers inherit the driver's).
RANK_ENV = (
    "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "OMP_NUM_THREADS", "WANDB_MODE", "WANDB_SILENT",
    "PYTHONUNBUFFERED", "PYTHONPATH", "PRETRAIN_PIPELINE_STATE", "PRETRAIN_PIPELINE_QUIET",
)
FORWARD_PREFIXES = ("NCCL_",)  # fabric settings, forwarded like the deepspeed launcher does
SECRET_ENV = ("WANDB_API_KEY",)

ATTEMPTS_FILE = "ray_attempts.jsonl"


def cluster_device(cfg: PipelineConfig) -> str:
    """The workers' device. ``auto`` asks the cluster, not this process: the driver often runs on a
    CPU-only head node while the workers get GPUs."""
    if cfg.train.device != "auto":
        return cfg.train.device
    import ray

    return "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def worker_env(cfg: PipelineConfig, device: str) -> dict[str, str]:
    """The ``env_vars`` of the workers' runtime_env: the same variables torchrun's ranks get."""
    from pretrain.launch import build_env

    resolved = cfg.model_copy(deep=True)
    resolved.train.device = device  # build_env would otherwise look for a GPU on the driver
    full = build_env(resolved)
    env = {k: full[k] for k in RANK_ENV if k in full}
    env.update({k: v for k, v in full.items() if k.startswith(FORWARD_PREFIXES)})
    for key in SECRET_ENV:
        env.pop(key, None)
    return env


def _record_attempt(paths: RunPaths, device: str) -> None:
    """Rank 0 appends one line per (re)start of the worker group: where each rank runs and which
    checkpoint it resumes from. Users see the restarts; the tests find the ranks' pids here."""
    import ray
    import ray.train
    import torch.distributed as dist

    from pretrain.checkpoint import latest_tag

    ctx = ray.train.get_context()
    me = {"rank": ctx.get_world_rank(), "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
    ranks: list[Any] = [None] * ctx.get_world_size()
    dist.all_gather_object(ranks, me)
    if ctx.get_world_rank() == 0:
        record = {
            "time": time.time(),
            "world_size": ctx.get_world_size(),
            "device": device,
            "resume_from": latest_tag(paths.checkpoints),
            "ranks": ranks,
        }
        with open(paths.train / ATTEMPTS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: what ``python -m pretrain.trainer --run-dir`` is to a torchrun rank."""
    import torch

    from pretrain.trainer import Trainer
    from pretrain_pipeline.config import load_config

    paths = RunPaths(Path(config["run_dir"]))
    cfg = load_config(paths.config)
    cfg.train.device = config["device"]
    if config["device"] == "cuda":
        # Ray Train shows each node's workers all of that node's assigned GPUs, in local-rank order.
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    _record_attempt(paths, config["device"])
    rc = Trainer(cfg, paths).train()
    if rc != 0:
        raise RuntimeError(f"training rank stopped early (exit code {rc}); see {paths.train}")


def train_on_ray(cfg: PipelineConfig, paths: RunPaths, log: Callable[[str], Any] = print) -> None:
    """Run the training function on the Ray cluster; returns when every step is done.

    Raises ``pretrain.launch.TrainingFailed`` when the run fails for good (more than
    ``train.launch.ray_max_failures`` restarts, or an error in the driver).
    """
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from data_prep.ray_runtime import ray_session
    from pretrain.launch import TrainingFailed

    tc = cfg.train
    with ray_session(cfg.runtime):
        device = cluster_device(cfg)
        workers = tc.launch.nnodes * tc.launch.nproc_per_node
        env = worker_env(cfg, device)
        if "TORCH_EXTENSIONS_DIR" in env:
            Path(env["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"run_dir": str(paths.root.resolve()), "device": device},
            torch_config=TorchConfig(backend="gloo" if device == "cpu" else "nccl"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=device == "cuda"),
            run_config=RunConfig(
                # Ray Train's own run state goes to train/ray_train/; our checkpoints stay in checkpoints/.
                name="ray_train",
                storage_path=str(paths.train.resolve()),
                failure_config=FailureConfig(max_failures=tc.launch.ray_max_failures),
                worker_runtime_env={"env_vars": env},
            ),
        )
        log(f"train: Ray Train TorchTrainer, {workers} workers on {device}, max_failures {tc.launch.ray_max_failures}")
        before = len(read_attempts(paths))
        stop = threading.Event()
        follower = threading.Thread(target=follow_metrics, args=(paths.metrics, log, stop), daemon=True)
        follower.start()
        try:
            trainer.fit()
        except ray.train.TrainingFailedError as err:
            raise TrainingFailed(f"Ray Train run failed: {err}") from err
        finally:
            stop.set()
            follower.join()
    attempts = read_attempts(paths)[before:]
    if len(attempts) > 1:
        log(f"train: Ray Train restarted the worker group {len(attempts) - 1} time(s); "
            f"last resumed from {attempts[-1]['resume_from']}")


def metrics_line(record: dict[str, Any]) -> str | None:
    """The log line of one metrics.jsonl record, worded as a torchrun rank 0 prints it."""
    if "train/loss" in record:
        return f"[pretrain] step {record['step']} loss {record['train/loss']:.4f} lr {record.get('train/lr', 0.0):.2e}"
    if "val/loss" in record:
        return f"[pretrain] step {record['step']} val_loss {record['val/loss']:.4f}"
    return None


def follow_metrics(path: Path, log: Callable[[str], Any], stop: threading.Event, poll_s: float = 1.0) -> None:
    """Pass the lines rank 0 appends to ``path`` to ``log`` until ``stop`` is set (then once more).

    Starts at the file's current end: an earlier run's lines were logged by that run. Only whole
    lines are read; a partly written one waits for the next poll.
    """
    offset = path.stat().st_size if path.exists() else 0
    pending = b""
    while True:
        stopping = stop.wait(poll_s)
        if path.exists():
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            *whole, pending = (pending + chunk).split(b"\n")
            for raw in whole:
                try:
                    line = metrics_line(json.loads(raw))
                except ValueError:
                    continue
                if line:
                    log(line)
        if stopping:
            return


def read_attempts(paths: RunPaths) -> list[dict[str, Any]]:
    path = paths.train / ATTEMPTS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
