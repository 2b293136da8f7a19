"""Start the training ranks (torchrun or the deepspeed launcher) and wait for them.

A plain function for the CLI and the Prefect flow: it decides whether training is current,
builds the command and environment, streams the ranks' output, and kills the whole process
group when the caller is interrupted (a Prefect cancel arrives as an exception or a signal).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from pretrain.device import resolve_device
from pretrain.global_batch import BatchLayout, GlobalBatchRefused, keep_global_batch
from pretrain_pipeline.artifacts import RunPaths, atomic_write_text, project_state_dir, read_json, sha256_file
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.errors import MissingInput
from pretrain_pipeline.stage import Stage, prepare_run

# Below Prefect runner's 30 s between SIGTERM and SIGKILL of a cancelled flow run, so the flow
# process still lives to SIGKILL the training group if the ranks ignore SIGTERM.
GRACE_SECONDS = 20.0


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class TrainResult:
    checkpoint_dir: str
    last_tag: str | None
    final_loss: float | None
    steps: int
    skipped: bool = False
    tokens_seen: int = 0
    wandb_run_id: str | None = None
    wandb_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_stage(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> Stage:
    """Training reads the model and train sections and the shard manifests it samples from."""
    manifest = paths.shards / "manifest.json"
    if not manifest.exists():
        raise MissingInput(f"{manifest} not found: run the shards stage first")
    # A mixture's other sources are inputs too: new shards there mean the model is out of date.
    runs_root = Path(cfg.runtime.runs_root)
    sources = sorted(n for n in cfg.train.data_mixture if n != cfg.runtime.run_name)
    missing = [n for n in sources if not (runs_root / n / "shards" / "manifest.json").exists()]
    if missing:
        raise MissingInput(f"train.data_mixture sources without shards under {runs_root}: {missing}")
    source_hashes = {n: sha256_file(runs_root / n / "shards" / "manifest.json") for n in sources}
    config = {"model": cfg.model.model_dump(mode="json"), "train": cfg.train.model_dump(mode="json")}
    inputs = [sha256_file(manifest), *([source_hashes] if source_hashes else [])]
    return Stage("train", paths.train, config, *inputs, force=force)


def build_command(cfg: PipelineConfig, paths: RunPaths) -> list[str]:
    """The launcher command for this node.

    torchrun: on one node, ``python -m pretrain.launch`` (torchrun whose rendezvous listens on
    127.0.0.1 only, see ``loopback_torchrun``); across nodes, static rendezvous (``--nnodes --node_rank
    --master_addr --master_port``), one command per node. deepspeed: a hostfile started from node 0
    over pdsh, or ``--no_ssh`` with one command per node (Kubernetes, Slurm ``srun``).
    """
    tc = cfg.train
    if tc.launch.launcher == "ray":
        raise ValueError("train.launch.launcher=ray starts no command: pretrain.ray_launch.train_on_ray runs it")
    target = ["--run-dir", str(paths.root.resolve())]
    rendezvous = ["--master_addr", tc.launch.master_addr, "--master_port", str(tc.launch.master_port)]
    if tc.launch.launcher == "deepspeed":
        launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
        cmd = [launcher]
        if tc.launch.hostfile:
            if not Path(tc.launch.hostfile).is_file():
                raise MissingInput(f"train.launch.hostfile={tc.launch.hostfile} not found")
            cmd += ["--hostfile", tc.launch.hostfile]
        elif tc.launch.nnodes > 1:
            raise ValueError("train.launch.launcher=deepspeed with nnodes > 1 needs train.launch.hostfile")
        cmd += ["--num_nodes", str(tc.launch.nnodes), "--num_gpus", str(tc.launch.nproc_per_node)]
        if tc.launch.no_ssh:
            cmd += ["--no_ssh", "--node_rank", str(tc.launch.node_rank)]
        if tc.launch.nnodes > 1 or tc.launch.no_ssh:
            cmd += rendezvous
        # --module: the deepspeed launcher runs "python -m" on what follows.
        return cmd + ["--module", "pretrain.trainer", *target]
    # torchrun restarts the whole local rank group after a rank fails; the ranks resume (train.resume: auto).
    ranks = ["--nproc_per_node", str(tc.launch.nproc_per_node), "--max-restarts", str(tc.recovery.max_restarts),
             "-m", "pretrain.trainer", *target]
    if tc.launch.nnodes == 1:
        return [sys.executable, "-m", "pretrain.launch", *ranks]
    # Static rendezvous: every node is told the same master and its own rank.
    return [sys.executable, "-m", "torch.distributed.run",
            "--nnodes", str(tc.launch.nnodes), "--node_rank", str(tc.launch.node_rank), *rendezvous, *ranks]


def loopback_torchrun(argv: list[str]) -> None:
    """torchrun for a one-node run, with every listening socket on 127.0.0.1.

    A TCPStore server binds all interfaces (``::``) whatever host it is given (torch 2.13, libuv and
    classic backends alike), so ``--standalone`` exposes the rendezvous store to the network. The one
    exception is a socket handed over as ``master_listen_fd``. torchrun's static rendezvous opens its
    store with ``multi_tenant=True``, which reuses a server this process already runs on that port:
    so we bind 127.0.0.1 on a port the kernel picks (free, and held, so parallel runs never collide),
    start the store on it, and run torchrun in this process pointed at it. The ranks use the agent's
    store (TORCHELASTIC_USE_AGENT_STORE) and listen for gloo on the loopback interface (build_env).
    """
    import torch.distributed as dist
    from torch.distributed.run import main

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    # The store owns the descriptor from here on (detach: Python must not close it as well); the
    # local keeps the server alive while torchrun runs.
    store = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, multi_tenant=True,
                          master_listen_fd=sock.detach())
    main(["--nnodes", "1", "--node_rank", "0", "--master_addr", "127.0.0.1", "--master_port", str(port), *argv])
    del store


def loopback_interface() -> str:
    """The name of the interface holding 127.0.0.1 (``lo`` on Linux)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
            return name
    return "lo"


def build_env(cfg: PipelineConfig) -> dict[str, str]:
    env = dict(os.environ)
    if resolve_device(cfg.train.device) == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
        # DeepSpeed's CPU accelerator otherwise runs `numactl --hardware` for its device count on
        # every ZeRO-3 gradient reduce.
        env.setdefault("LOCAL_SIZE", str(cfg.train.launch.nproc_per_node))
    # A parent's W&B service (Prefect, pytest) would keep a killed rank's run id "in use" until the
    # parent exits; each training run starts its own.
    env.pop("WANDB_SERVICE", None)
    # DeepSpeed compiles its CPU comm op on first use; keep the build where the next run finds it.
    env.setdefault("TORCH_EXTENSIONS_DIR", str(project_state_dir() / "torch_extensions"))
    # Threads per rank: an OMP_NUM_THREADS the caller set wins (on a shared or busy machine one
    # thread per rank can be several times faster: OpenMP's barriers stall whenever one of its
    # threads is descheduled); otherwise the CPUs this process may use (its affinity, which
    # containers and taskset narrow, unlike os.cpu_count()) shared among the local ranks.
    if not env.get("OMP_NUM_THREADS"):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cpus // cfg.train.launch.nproc_per_node))
    env["WANDB_MODE"] = cfg.tracking.wandb_mode
    env["PYTHONUNBUFFERED"] = "1"
    if cfg.train.launch.nnodes == 1 and cfg.train.launch.launcher != "ray":
        # One node: gloo's and NCCL's bootstrap sockets stay on loopback, like the rendezvous
        # (loopback_torchrun). A setting the caller made wins.
        lo = loopback_interface()
        env.setdefault("GLOO_SOCKET_IFNAME", lo)
        env.setdefault("NCCL_SOCKET_IFNAME", lo)
    # The ranks import this package; make that work from any working directory.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# The deepspeed launcher's pdsh path (a hostfile, no --no_ssh) starts the ranks of every node over
# ssh with a fresh environment: it forwards only NCCL*/PYTHON*/UCX*/MLFLOW*/MV2* and the NAME=value
# lines of its env file (DS_ENV_FILE, else .deepspeed_env in ~ and the launch directory). These are
# the other settings a rank needs; the file is plain text on shared storage, so no secrets.
DEEPSPEED_ENV_NAMES = ("DS_ACCELERATOR", "LOCAL_SIZE", "OMP_NUM_THREADS", "GLOO_SOCKET_IFNAME",
                       "TP_SOCKET_IFNAME", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DEEPSPEED_ENV_PREFIXES = ("PRETRAIN_PIPELINE_", "WANDB_", "TORCH_", "NCCL_")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|AUTH", re.IGNORECASE)
# pdsh puts each value into `export NAME="value";`: these characters would change that command.
_UNSAFE_VALUE = re.compile(r'["$`\\\n\r]')
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def deepspeed_env_lines(env: dict[str, str], log: Callable[[str], Any] = print) -> list[str]:
    """The ``NAME=value`` lines of the launcher's env file: the user's own ``.deepspeed_env``
    (``~`` then the launch directory, which ours replaces) and the rank settings from ``env``;
    never a secret (``wandb login`` on each node puts the W&B key in ~/.netrc instead)."""
    entries: dict[str, str] = {}
    root = Path(__file__).resolve().parent.parent
    user_name = env.get("DS_ENV_FILE", ".deepspeed_env")
    for user_file in (Path.home() / user_name, root / user_name):
        if user_file.is_file():
            for line in user_file.read_text().splitlines():
                if "=" in line:
                    name, value = line.split("=", 1)
                    entries[name.strip()] = value.strip()
    for name, value in env.items():
        if name in DEEPSPEED_ENV_NAMES or name.startswith(DEEPSPEED_ENV_PREFIXES):
            entries[name] = value
    lines, skipped = [], []
    for name, value in entries.items():
        if SECRET_NAME.search(name) or _UNSAFE_VALUE.search(value) or not _NAME.fullmatch(name):
            skipped.append(name)
        else:
            lines.append(f"{name}={value}")
    if skipped:
        log(f"train: not forwarded to other nodes (secret or unquotable): {', '.join(sorted(skipped))}")
    return lines


def write_deepspeed_env(cfg: PipelineConfig, paths: RunPaths, env: dict[str, str],
                        log: Callable[[str], Any] = print) -> Path | None:
    """For a pdsh launch, write the env file into ``train/`` and point ``DS_ENV_FILE`` at it (an
    absolute name: DeepSpeed joins it to ``~`` and ``.``, so both lookups find this one file)."""
    tc = cfg.train
    if tc.launch.launcher != "deepspeed" or not tc.launch.hostfile or tc.launch.no_ssh:
        return None
    path = (paths.train / "deepspeed_env").resolve()
    # DeepSpeed splits every line at "=": no comments, no blank lines.
    atomic_write_text(path, "".join(f"{line}\n" for line in deepspeed_env_lines(env, log)))
    env["DS_ENV_FILE"] = str(path)
    return path


def terminate(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """SIGTERM the launcher's process group (ranks save and exit), then SIGKILL after ``grace``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def run_streaming(cmd: list[str], env: dict[str, str], log_path: Path, log: Callable[[str], Any], cwd: Path) -> int:
    tail: collections.deque[str] = collections.deque(maxlen=40)
    errors: list[str] = []  # the ranks' own "[pretrain] error:" lines, which tracebacks push out of the tail
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as logfile:
        logfile.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, bufsize=1, start_new_session=True,
        )
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if "[pretrain] error:" in line and len(errors) < 10:
                    errors.append(line)
                logfile.write(line + "\n")
                log(line)
            rc = proc.wait()
        except BaseException:
            terminate(proc)
            raise
    if rc != 0:
        cause = "".join(f"{line}\n" for line in errors if line not in tail)
        raise TrainingFailed(
            f"training exited with code {rc} (full log: {log_path}); {cause}last lines:\n" + "\n".join(tail), rc
        )
    return rc


def run_rank_group(cfg: PipelineConfig, paths: RunPaths, cmd: list[str], env: dict[str, str], log_path: Path,
                   log: Callable[[str], Any]) -> None:
    """Run the launcher command. torchrun restarts failed ranks itself (``--max-restarts``); the
    deepspeed launcher does not, so after a failure it is started again, up to
    ``train.recovery.max_restarts`` times, and its ranks resume from the latest checkpoint. A run
    the non-finite or spike policy stopped, or one asked to stop, is not restarted: it would stop again."""
    from pretrain.events import RESTART_COUNT_ENV
    from pretrain.trainer import EXIT_NONFINITE, EXIT_PREEMPTED

    restarts = cfg.train.recovery.max_restarts if cfg.train.launch.launcher == "deepspeed" else 0
    for attempt in range(restarts + 1):
        env[RESTART_COUNT_ENV] = str(attempt)
        write_deepspeed_env(cfg, paths, env, log)
        try:
            run_streaming(cmd, env, log_path, log, cwd=Path(__file__).resolve().parent.parent)
            return
        except TrainingFailed as failure:
            if attempt == restarts or failure.exit_code in (EXIT_NONFINITE, EXIT_PREEMPTED):
                raise
            log(f"train: rank group failed (exit code {failure.exit_code}); restarting from the latest "
                f"checkpoint ({attempt + 1} of train.recovery.max_restarts={restarts})")


def keep_resumed_global_batch(cfg: PipelineConfig, paths: RunPaths,
                              log: Callable[[str], Any] = print) -> PipelineConfig:
    """``train.resume: auto`` on another cluster shape: ``cfg`` with the grad_accum_steps that keeps
    the global batch the latest checkpoint recorded. Raises GlobalBatchRefused when none fits."""
    tc = cfg.train
    if tc.resume != "auto" or not paths.checkpoints.is_dir():
        return cfg
    from pretrain.checkpoint import find_usable_tag, load_client_state

    tag, _ = find_usable_tag(paths.checkpoints, verify=False)  # the ranks verify the hashes
    saved = BatchLayout.from_state(load_client_state(paths.checkpoints, tag).get("data", {})) if tag else None
    if saved is None:  # nothing to resume, or saved before the layout was recorded (the loader judges it)
        return cfg
    world = tc.launch.nproc_per_node * tc.launch.nnodes
    try:
        layout = keep_global_batch(saved, tc.micro_batch_size, world)
    except GlobalBatchRefused as refused:
        raise GlobalBatchRefused(f"refusing to resume {paths.checkpoints / tag}: {refused}") from None
    if layout != saved or layout.grad_accum_steps != tc.grad_accum_steps:
        log(f"train: resuming {tag} written with a global batch of {saved.describe()}: grad_accum_steps "
            f"{layout.grad_accum_steps} keeps it on {world} rank(s) ({layout.describe()}; configured "
            f"{tc.grad_accum_steps})")
    return cfg.model_copy(update={"train": tc.model_copy(update={"grad_accum_steps": layout.grad_accum_steps})})


def launch_training(cfg: PipelineConfig, paths: RunPaths, force: bool = False, log: Callable[[str], Any] = print) -> TrainResult:
    stage = train_stage(cfg, paths, force)
    if record := stage.current():
        log(f"train: current (fingerprint {stage.fingerprint[:12]}), skipping")
        return TrainResult(**{**record.get("result", {}), "skipped": True})
    # Only node 0 owns the run directory (config, checkpoints, stage record); other nodes share it
    # (or hold a copy) and just start their ranks.
    leader = cfg.train.launch.node_rank == 0
    # Refuse a run that cannot fit before any process starts (and before config.yaml changes).
    from pretrain.plan import check_fits, plan_launch

    # A checkpoint of another cluster shape: keep its global batch, or refuse before anything starts.
    cfg, plan = plan_launch(cfg, paths, leader)
    check_fits(plan)
    for line in plan.lines():
        log(f"train: plan: {line}")
    # The ranks read config.yaml; make sure it says what this call was given.
    prepare_run(cfg, paths)
    if leader and cfg.train.resume == "never" and paths.checkpoints.exists():
        # Set aside rather than delete: old tags would otherwise mix with (and be pruned as) new ones.
        aside = paths.root / f"checkpoints.old-{time.strftime('%Y%m%d-%H%M%S')}"
        paths.checkpoints.rename(aside)
        log(f"train: resume=never, previous checkpoints moved to {aside}")
    paths.train.mkdir(parents=True, exist_ok=True)
    if cfg.train.launch.launcher == "ray":
        # One driver places every rank through Ray Train; the workers run the same pretrain.trainer.Trainer.
        from pretrain.ray_launch import train_on_ray

        train_on_ray(cfg, paths, log)
    else:
        env = build_env(cfg)
        Path(env["TORCH_EXTENSIONS_DIR"]).mkdir(parents=True, exist_ok=True)
        cmd = build_command(cfg, paths)
        log("train: " + " ".join(cmd))
        log_name = "launcher.log" if leader else f"launcher-node{cfg.train.launch.node_rank}.log"
        run_rank_group(cfg, paths, cmd, env, paths.train / log_name, log)
    if not leader:
        # Global rank 0 (on node 0) writes the summary and node 0's launcher the stage record.
        return TrainResult(checkpoint_dir=str(paths.checkpoints), last_tag=None, final_loss=None,
                           steps=cfg.train.max_steps)

    summary = read_json(paths.train / "summary.json")
    if not summary.get("completed"):
        raise TrainingFailed(f"training stopped early at step {summary.get('steps')}; run again to resume")
    result = TrainResult(
        checkpoint_dir=str(paths.checkpoints),
        last_tag=summary["last_checkpoint_tag"],
        final_loss=summary["final_loss"],
        steps=summary["steps"],
        tokens_seen=summary["tokens_seen"],
        wandb_run_id=summary.get("wandb_run_id"),
        wandb_dir=summary.get("wandb_dir"),
    )
    stage.done({"result": result.to_dict(), "summary": summary})
    return result


if __name__ == "__main__":
    # build_command's one-node torchrun: python -m pretrain.launch <torchrun arguments>
    loopback_torchrun(sys.argv[1:])
