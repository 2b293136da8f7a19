"""Checks that take seconds and catch what would otherwise fail hours into a run.

``run`` and every stage command call :func:`check_stages` before Prefect, Ray or any stage
starts; ``pretrain-pipeline check`` runs it alone and prints what it found. Nothing here imports
Ray, DeepSpeed or Prefect, and nothing is written: a check only looks. lm-eval and W&B are
imported only when configured; a Ray or Prefect address is probed with a short timeout.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from data_prep.readers import expand_inputs
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.stages import STAGES

PROBE_TIMEOUT_S = 2.0  # a Ray or Prefect address that does not answer in this is named as down
# Set by the CLI once it has checked a config: the flow it then starts in this process skips the
# same checks (a flow started from a deployment has no such mark and checks for itself).
CHECKED_ENV = "PRETRAIN_PIPELINE_PREFLIGHT_CHECKED"
COMPRESSED_SUFFIXES = (".gz", ".zst", ".parquet")


@dataclass(frozen=True)
class Problem:
    """Something that would make a stage fail; ``where`` is the config field or file at fault."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Findings:
    """What the checks saw (label, value rows for the table) and the problems among it."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def table(self) -> str:
        width = max((len(label) for label, _ in self.rows), default=0)
        return "\n".join(f"{label.ljust(width)}  {value}" for label, value in self.rows)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _text_bytes(files: Iterable[Path]) -> int:
    """Estimated bytes of text in ``files``: gzip, zstd and Parquet count 4x their size."""
    return sum(f.stat().st_size * (4 if f.name.endswith(COMPRESSED_SUFFIXES) else 1) for f in files)


def _found_files(field: str, label: str, patterns: Iterable[str], found: Findings) -> list[Path]:
    """The files of every pattern, a row each; a pattern that matches nothing is a problem on ``field``."""
    out: list[Path] = []
    for pattern in patterns:
        try:
            files = expand_inputs([pattern])  # the stages' own resolution, one pattern at a time to count each
        except (FileNotFoundError, ValueError) as err:
            found.rows.append((f"{label} {pattern}", "NOT FOUND"))
            found.problems.append(Problem(field, str(err)))
            continue
        found.rows.append((f"{label} {pattern}", f"{len(files)} files, {_human_bytes(sum(f.stat().st_size for f in files))}"))
        out += files
    return out


def _check_inputs(cfg: PipelineConfig, found: Findings) -> int:
    """Rows per input pattern; returns the inputs' estimated text bytes."""
    if cfg.data.sample_corpus:
        found.rows.append(("inputs", f"sample corpus (built at first run, up to {cfg.data.sample_corpus_max_docs} documents)"))
        return cfg.data.sample_corpus_max_docs * 4096  # a docstring document is a few KiB at most
    return _text_bytes(_found_files("data.inputs", "input", cfg.data.inputs, found))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_run_dir(cfg: PipelineConfig, found: Findings) -> None:
    run_dir = cfg.run_dir()
    existing = _existing_ancestor(run_dir)
    if not existing.is_dir():
        found.problems.append(Problem("runtime.runs_root", f"{existing} is a file, so run directory {run_dir} cannot be made"))
    elif not os.access(existing, os.W_OK | os.X_OK):
        found.problems.append(Problem("runtime.runs_root", f"run directory {run_dir} is not writable ({existing} refuses writes)"))
    state = "exists" if run_dir.exists() else "will be created"
    free = _human_bytes(shutil.disk_usage(existing).free) if existing.is_dir() else "?"
    found.rows.append(("run dir", f"{run_dir} ({state}; {free} free)"))


def _check_device(cfg: PipelineConfig, found: Findings) -> None:
    launch = cfg.train.launch
    if launch.launcher == "ray":
        # Ray places the ranks on the cluster's nodes; this host's devices say nothing about them.
        found.rows.append(("device", f"train.device={cfg.train.device} on the Ray cluster's workers (not checked here)"))
        return
    import torch  # here: the table and the input checks need no torch

    from pretrain.device import resolve_device

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(cfg.train.device)
    found.rows.append(("device", f"train.device={cfg.train.device} -> {device}; {gpus} GPU(s) visible"))
    if device == "cuda" and not gpus:
        found.problems.append(
            Problem("train.device", "cuda requested but no CUDA device is visible here; to train on CPU: --set train.device=cpu")
        )
    elif device == "cuda" and launch.nproc_per_node > gpus:
        found.problems.append(
            Problem(
                "train.launch.nproc_per_node",
                f"{launch.nproc_per_node} ranks per node but {gpus} GPU(s) visible; --set train.launch.nproc_per_node={gpus}",
            )
        )


def _check_plan(cfg: PipelineConfig, found: Findings) -> None:
    if not cfg.train.plan.device_memory_gb:
        return
    from pretrain.plan import make_plan, plan_vocab_size

    plan = make_plan(cfg, plan_vocab_size(cfg, RunPaths(cfg.run_dir())))
    found.rows.append(("memory plan", f"{plan.total_gb:.2f} GiB per rank of {plan.device_memory_gb:g}"))
    if not plan.fits:
        found.problems.append(
            Problem(
                "train.plan.device_memory_gb",
                f"the plan needs {plan.total_gb:.2f} GiB per rank, more than {plan.device_memory_gb:g} "
                "(see `pretrain-pipeline plan`)",
            )
        )


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _output_estimates(cfg: PipelineConfig, stages: set[str], text_bytes: int) -> dict[str, int]:
    """Bytes each stage about to run adds under the run directory.

    Made simply, as an upper bound: clean parts ~ the inputs' text (compressed inputs x4); shards ~
    4 bytes per token at ~4 bytes of text per token; params ~ 12 x layers x width^2 + the embeddings
    (the usual GPT count, no model built); each checkpoint ~ params x (weight + 4 fp32 master + 8
    Adam) bytes, keep_last of them plus the one being written; the export ~ params x 4 per format.
    What a stage's folder already holds is subtracted (a rerun replaces it).
    """
    paths, mc = RunPaths(cfg.run_dir()), cfg.model
    if "clean" not in stages and paths.clean.is_dir():
        text_bytes = _text_bytes(paths.clean.rglob("*.parquet"))
    tokens = text_bytes // 4
    embeddings = (mc.vocab_size or cfg.tokenizer.vocab_size) * mc.n_embd * (1 if mc.tie_embeddings else 2)
    params = 12 * mc.n_layer * mc.n_embd**2 + embeddings + (mc.block_size * mc.n_embd if mc.position == "learned" else 0)
    weight = 4 if cfg.train.precision == "fp32" else 2
    estimates = {
        "clean": (paths.clean, text_bytes),
        "tokenize": (paths.shards, tokens * 4),
        "train": (paths.checkpoints, params * (weight + 4 + 8) * (cfg.train.checkpoint.keep_last + 1)),
        "export": (paths.export, params * 4 * (1 + cfg.export.onnx + cfg.export.gguf)),
    }
    return {stage: max(0, size - _tree_bytes(folder))
            for stage, (folder, size) in estimates.items() if stage in stages}


def _check_disk(cfg: PipelineConfig, stages: set[str], text_bytes: int, found: Findings) -> None:
    existing = _existing_ancestor(cfg.run_dir())
    if not existing.is_dir():
        return  # _check_run_dir names it
    needed = _output_estimates(cfg, stages, text_bytes)
    total, free = sum(needed.values()), shutil.disk_usage(existing).free
    parts = ", ".join(f"{stage} {_human_bytes(n)}" for stage, n in needed.items() if n)
    found.rows.append(("disk", f"~{_human_bytes(total)} to write ({parts or 'nothing new'}); {_human_bytes(free)} free"))
    if total > free:
        found.problems.append(Problem(
            "runtime.runs_root",
            f"the stages need about {_human_bytes(total)} ({total:,} bytes: {parts}) but {existing} has "
            f"{_human_bytes(free)} ({free:,} bytes) free"))


def _check_resume(cfg: PipelineConfig, found: Findings) -> None:
    """``train.resume: auto`` continues the newest checkpoint: it must be of this model and keep its
    global batch on the configured ranks (pretrain.launch.keep_resumed_global_batch)."""
    paths = RunPaths(cfg.run_dir())
    if cfg.train.resume != "auto" or not paths.checkpoints.is_dir():
        return
    from pretrain.checkpoint import CheckpointError, find_usable_tag, load_client_state, resume_refusal
    from pretrain.global_batch import GlobalBatchRefused
    from pretrain.launch import keep_resumed_global_batch

    tag, _ = find_usable_tag(paths.checkpoints, verify=False)  # the ranks verify the hashes
    if tag is None:
        found.rows.append(("resume", f"no complete checkpoint in {paths.checkpoints}: starts at step 0"))
        return
    try:
        refusal = resume_refusal(load_client_state(paths.checkpoints, tag), cfg.model.fingerprint(), paths.checkpoints)
        resumed = None if refusal else keep_resumed_global_batch(cfg, paths, log=lambda _: None)
    except (GlobalBatchRefused, CheckpointError, FileNotFoundError) as err:
        refusal = str(err)
    if refusal:
        found.rows.append(("resume", f"{tag}: REFUSED"))
        found.problems.append(Problem("train.resume", refusal))
        return
    world = cfg.train.launch.nproc_per_node * cfg.train.launch.nnodes
    found.rows.append(("resume", f"{tag} on {world} rank(s), grad_accum_steps {resumed.train.grad_accum_steps}"))


def _check_lm_eval_tasks(cfg: PipelineConfig, stages: set[str], found: Findings) -> None:
    """Task names resolve through lm-eval's TaskManager (local YAMLs first; nothing downloaded)."""
    fields = {"data.decontaminate.tasks": cfg.data.decontaminate.tasks if "clean" in stages else [],
              "eval.lm_eval_tasks": cfg.eval.lm_eval_tasks if "evaluate" in stages else []}
    names = sorted({name for wanted in fields.values() for name in wanted})
    if not names:
        return
    from data_prep.benchmarks import resolve_tasks, unknown_tasks_message

    include_path = cfg.eval.lm_eval_include_path
    _, unknown = resolve_tasks(names, include_path)
    found.rows.append(("lm-eval tasks", ", ".join(f"{n} (UNKNOWN)" if n in unknown else n for n in names)))
    for where, wanted in fields.items():
        if missing := [n for n in wanted if n in unknown]:
            found.problems.append(Problem(where, unknown_tasks_message(missing, include_path)))


def _check_wandb(cfg: PipelineConfig, stages: set[str], found: Findings) -> None:
    mode = cfg.tracking.wandb_mode
    if not ("train" in stages or ("evaluate" in stages and cfg.eval.wandb)):
        return
    if mode != "online":
        found.rows.append(("W&B", mode))
        return
    from pretrain.tracking import wandb_credentials

    source = wandb_credentials()  # the name of the variable or file, never the key
    found.rows.append(("W&B", f"online, credentials from {source}" if source else "online, NO CREDENTIALS"))
    if not source:
        found.problems.append(Problem(
            "tracking.wandb_mode",
            "online but W&B has no credentials here: set WANDB_API_KEY in the environment or run `wandb login`, "
            "or --set tracking.wandb_mode=offline"))


def _probe_tcp(host: str, port: int) -> str | None:
    """None when ``host:port`` accepts a connection within PROBE_TIMEOUT_S, else why not."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    return None


def _probe_http(url: str) -> str | None:
    """None when ``url`` gives any HTTP answer within PROBE_TIMEOUT_S, else why not."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as err:
        return str(getattr(err.reason, "strerror", None) or err.reason)
    except (OSError, ValueError) as err:
        return str(err) or type(err).__name__
    return None


def _report_probe(found: Findings, label_and_field: tuple[str, str], address: str, why: str | None, fix: str) -> None:
    label, where = label_and_field
    found.rows.append((label, f"{address} " + ("answers" if why is None else "DOES NOT ANSWER")))
    if why is not None:
        found.problems.append(Problem(where, f"{address} does not answer ({why} within {PROBE_TIMEOUT_S:g} s); {fix}"))


def _check_ray(cfg: PipelineConfig, stages: set[str], found: Findings) -> None:
    if not (stages & {"clean", "tokenize"} or ("train" in stages and cfg.train.launch.launcher == "ray")):
        return
    address = cfg.runtime.ray_address
    if not address:
        found.rows.append(("Ray", "a local Ray, started by the stage"))
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port or (10001 if parts.scheme == "ray" else 6379)
    except ValueError:
        port = None
    if not parts.hostname or port is None or address in ("auto", "local"):
        found.rows.append(("Ray", f"{address} (not probed)"))
        return
    why = _probe_tcp(parts.hostname, port)
    _report_probe(found, ("Ray", "runtime.ray_address"), address, why and f"{parts.hostname}:{port}: {why}",
                  "start the cluster or leave runtime.ray_address empty for a local Ray")


def _check_prefect(found: Findings) -> None:
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        found.rows.append(("Prefect", "a temporary local server (PREFECT_API_URL not set)"))
        return
    _report_probe(found, ("Prefect", "PREFECT_API_URL"), api, _probe_http(api.rstrip("/") + "/health"),
                  "start it (`make server`) or unset PREFECT_API_URL for a temporary local server")


def check_stages(cfg: PipelineConfig, stages: Iterable[str], prefect: bool = True) -> Findings:
    """Run the checks that matter for ``stages`` (names from pretrain_pipeline.stages.STAGES);
    ``prefect``: they will run as Prefect flows (PREFECT_API_URL, when set, must answer)."""
    stages = set(stages)
    found = Findings()
    found.rows.append(("stages", ", ".join(s for s in STAGES if s in stages)))
    text_bytes = _check_inputs(cfg, found) if "clean" in stages else 0
    _check_run_dir(cfg, found)
    _check_disk(cfg, stages, text_bytes, found)
    if "train" in stages:
        _check_device(cfg, found)
        _check_plan(cfg, found)
        _check_resume(cfg, found)
    if "evaluate" in stages:  # else the evaluate stage would fail on them after training
        _found_files("eval.heldout_inputs", "held-out", cfg.eval.heldout_inputs, found)
    _check_lm_eval_tasks(cfg, stages, found)
    _check_wandb(cfg, stages, found)
    _check_ray(cfg, stages, found)
    if prefect:
        _check_prefect(found)
    return found


def preflight(cfg: PipelineConfig, stages: Iterable[str], prefect: bool = True) -> list[Problem]:
    """The problems :func:`check_stages` finds for ``stages``; empty when they may start."""
    return check_stages(cfg, stages, prefect).problems


def _checked_key(cfg: PipelineConfig, stages: Iterable[str]) -> str:
    return f"{cfg.fingerprint()}:{','.join(sorted(stages))}"


def mark_checked(cfg: PipelineConfig, stages: Iterable[str]) -> None:
    """Record that ``cfg`` passed the checks for ``stages`` in this process."""
    os.environ[CHECKED_ENV] = _checked_key(cfg, stages)


def already_checked(cfg: PipelineConfig, stages: Iterable[str]) -> bool:
    """Whether this process already checked this very config for these stages."""
    return os.environ.get(CHECKED_ENV) == _checked_key(cfg, stages)
