"""Checks that take seconds and catch what would otherwise fail hours into a run.

``run`` and every stage command call :func:`check_stages` before Prefect, Ray or any stage
starts; ``pretrain-pipeline check`` runs it alone and prints what it found. Nothing here imports
Ray, DeepSpeed or Prefect, and nothing is written: a check only looks.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field

from data_prep.readers import expand_inputs
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.stages import STAGES


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


def _check_inputs(cfg: PipelineConfig, found: Findings) -> None:
    if cfg.data.sample_corpus:
        found.rows.append(("inputs", f"sample corpus (built at first run, up to {cfg.data.sample_corpus_max_docs} documents)"))
        return
    for pattern in cfg.data.inputs:
        try:
            # The clean stage's own resolution, one pattern at a time to count each.
            files = expand_inputs([pattern])
        except (FileNotFoundError, ValueError) as err:
            found.rows.append((f"input {pattern}", "NOT FOUND"))
            found.problems.append(Problem("data.inputs", str(err)))
            continue
        size = sum(f.stat().st_size for f in files)
        found.rows.append((f"input {pattern}", f"{len(files)} files, {_human_bytes(size)}"))


def _check_run_dir(cfg: PipelineConfig, found: Findings) -> None:
    run_dir = cfg.run_dir()
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
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
    from pretrain_pipeline.artifacts import RunPaths

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


def check_stages(cfg: PipelineConfig, stages: Iterable[str]) -> Findings:
    """Run the checks that matter for ``stages`` (names from pretrain_pipeline.stages.STAGES)."""
    stages = set(stages)
    found = Findings()
    found.rows.append(("stages", ", ".join(s for s in STAGES if s in stages)))
    if "clean" in stages:
        _check_inputs(cfg, found)
    _check_run_dir(cfg, found)
    if "train" in stages:
        _check_device(cfg, found)
        _check_plan(cfg, found)
    return found


def preflight(cfg: PipelineConfig, stages: Iterable[str]) -> list[Problem]:
    """The problems :func:`check_stages` finds for ``stages``; empty when they may start."""
    return check_stages(cfg, stages).problems
