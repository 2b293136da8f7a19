"""The protocol every stage follows: fingerprint, skip when current, temporary outputs, record last.

A stage says what it reads (hashes of its inputs), which config section shapes its outputs and
where it writes; ``Stage`` does the bookkeeping the same way for all of them::

    stage = Stage("clean", paths.clean, cfg.data.model_dump(mode="json"), input_hashes, force=force)
    if record := stage.current():
        return CleanResult.from_record(record)
    with stage.outputs(paths.clean) as (tmp,):
        ...                                   # compute, writing into tmp
    stage.done(summary)                       # _SUCCESS.json, after the rename

A stage that fails or is killed before ``done`` leaves its previous outputs or none, never a
record vouching for half-written files, so the next run redoes it.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any, Iterator

from pretrain_pipeline.artifacts import (
    RunPaths,
    atomic_path,
    atomic_write_text,
    fingerprint,
    mark_stage_done,
    naming_file,
    project_state_dir,
    read_stage_record,
    replace_path,
    stage_is_current,
)
from pretrain_pipeline.config import PipelineConfig, dump_config

# Inside a resumable output's temporary directory: the fingerprint of the work it holds.
PARTIAL_FINGERPRINT = ".fingerprint"


class Stage:
    """One stage's bookkeeping. The fingerprint covers the stage name, its config section, its
    inputs and the code version: a change in any of them makes the recorded outputs stale."""

    def __init__(self, name: str, directory: Path, config: Any, *inputs: Any, force: bool = False) -> None:
        self.name, self.directory, self.force = name, Path(directory), force
        self.fingerprint = fingerprint(name, config, *inputs)

    def current(self) -> dict[str, Any] | None:
        """The completion record if it matches this fingerprint (and the stage is not forced)."""
        if self.force or not stage_is_current(self.directory, self.fingerprint):
            return None
        return read_stage_record(self.directory)

    @contextlib.contextmanager
    def outputs(self, *paths: Path | None, resumable: bool = False) -> Iterator[list[Path | None]]:
        """Temporary paths for ``paths`` (``None`` gives ``None``: an output not written this time),
        renamed into place when the block succeeds and removed when it fails.

        ``resumable``: each temporary is a fixed-name directory that outlives a failure, so a rerun
        with the same fingerprint finds what the failed one finished; any other content is discarded.
        """
        place = self._resumable if resumable else atomic_path
        with contextlib.ExitStack() as stack:
            yield [None if p is None else stack.enter_context(place(Path(p))) for p in paths]

    def done(self, summary: dict[str, Any]) -> None:
        """Write ``_SUCCESS.json``: the fingerprint and ``summary`` (usually the stage's result, whose
        ``skipped`` flag is not recorded). Call it after the ``outputs`` block, never inside."""
        mark_stage_done(self.directory, self.fingerprint, {k: v for k, v in summary.items() if k != "skipped"})

    @contextlib.contextmanager
    def _resumable(self, path: Path) -> Iterator[Path]:
        partial = path.with_name(f".{path.name}.partial")
        stamp = partial / PARTIAL_FINGERPRINT
        if partial.exists() and not (stamp.exists() and stamp.read_text().strip() == self.fingerprint):
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
        with naming_file(stamp):
            stamp.write_text(self.fingerprint + "\n")
        yield partial
        stamp.unlink()
        replace_path(partial, path)


def completed_record(directory: Path, stage: str) -> dict[str, Any]:
    """The record of an earlier stage that this one reads; without it, an error saying what to run."""
    record = read_stage_record(directory)
    if record is None:
        raise FileNotFoundError(f"{directory}: the {stage} stage has not completed (no _SUCCESS.json); run it first")
    return record


def prepare_run(cfg: PipelineConfig, paths: RunPaths | None = None) -> RunPaths:
    """Create the run directory and record the resolved config every stage (and rank) reads."""
    paths = paths or RunPaths(cfg.run_dir())
    paths.root.mkdir(parents=True, exist_ok=True)
    text = dump_config(cfg)
    # Node 0 owns the run directory; another node of a multi-node run shares it (or holds a copy)
    # and writes the config only where there is none, never over node 0's with its own node_rank.
    leader = cfg.train.launch.node_rank == 0
    if not paths.config.exists() or (leader and paths.config.read_text() != text):
        atomic_write_text(paths.config, text)
    project_state_dir().mkdir(parents=True, exist_ok=True)
    return paths
