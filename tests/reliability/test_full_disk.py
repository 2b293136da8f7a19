"""A full disk in every stage that writes much: a clear error naming the file, no completion
record, no half-written output in place, and a rerun (with room) that finishes exactly as an
uninterrupted run does.

Two ways to run out of room, both real kernel errors rather than simulations:

- a tmpfs too small for the output (``test_*_on_a_full_disk_*``): the kernel's ENOSPC. Mounting
  needs root with CAP_SYS_ADMIN; these tests skip, saying why, where the kernel refuses. The
  training test mounts one on ``checkpoints/`` only (launcher log and metrics stay on the normal disk).
- ``RLIMIT_FSIZE`` in a child process (``test_*_past_the_file_size_limit_*``; any user, so CI always
  runs them): a write past the limit fails with EFBIG. CPython ignores SIGXFSZ (the child says so
  again), so the stage gets the error instead of being killed. For the data stages the child starts
  Ray *before* lowering its own limit: Ray's daemons and the workers they fork keep theirs (Ray's
  shared-memory object store and logs would fail under a small limit), and the output files the
  limit then stops are the ones the driver writes: clean's final parts, every shard. The workers'
  write site (clean's work files) is what the tmpfs clean test fills.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain_pipeline.artifacts import SUCCESS_FILE, RunPaths, read_json
from pretrain_pipeline.config import PipelineConfig, build_config
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration


@pytest.fixture()
def tmpfs(tmp_path):
    """Mount a tmpfs of ``size`` at a directory; yields mount(point, size) -> grow(size)."""
    mounted: list[Path] = []

    def mount(point: Path, size: str):
        point.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(point)

        def grow(new_size: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={new_size}", str(point)], check=True)

        return grow

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


@pytest.fixture()
def small_disk(tmpfs, tmp_path):
    """A 256 KiB tmpfs on the run's checkpoints/; yields (mount point, function that grows it)."""
    mount_point = tmp_path / "run" / "checkpoints"
    return mount_point, tmpfs(mount_point, "256k")


def _kib(n_bytes: int) -> str:
    return f"{-(-n_bytes // 4096) * 4}k"  # whole pages: what tmpfs counts


def _disk_use(root: Path) -> int:
    """Bytes the files under ``root`` take on a tmpfs (whole pages per file)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in root.rglob("*") if f.is_file())


def _outputs(stage_dir: Path) -> dict[str, bytes]:
    """Every file a stage left in place, but its completion record (which holds timings and paths)."""
    return {str(f.relative_to(stage_dir)): f.read_bytes() for f in sorted(stage_dir.rglob("*"))
            if f.is_file() and f.name != SUCCESS_FILE}


def _temporaries(root: Path) -> list[str]:
    return [str(f) for f in root.rglob("*") if ".tmp" in f.name]


def _train_cfg(runs_root: Path, max_steps: int, checkpoint_every: int) -> PipelineConfig:
    """A tiny model trained on CPU over make_synthetic_run's data, in ``runs_root/run``."""
    return build_config({
        "data": {"sample_corpus": True},
        "tokenizer": {"vocab_size": 320},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "train": {"micro_batch_size": 4, "max_steps": max_steps, "log_every": 1, "device": "cpu",
                  "zero": {"stage": 1}, "launch": {"nproc_per_node": 1}, "schedule": {"warmup_steps": 0},
                  "validation": {"every": 100, "batches": 1}, "checkpoint": {"every": checkpoint_every, "keep_last": 1}},
        "tracking": {"wandb_mode": "disabled"},
        "runtime": {"run_name": "run", "runs_root": str(runs_root)},
    })


# --- training checkpoints -------------------------------------------------------------------


def test_checkpoint_on_a_full_disk_fails_by_name_and_resume_uses_the_last_good_one(small_disk, tmp_path, monkeypatch):
    from pretrain.checkpoint import COMPLETE_FILE, latest_tag, load_consolidated_state_dict, verify_tag
    from pretrain.launch import TrainingFailed, launch_training

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    mount_point, grow = small_disk
    paths = RunPaths(tmp_path / "run")
    assert paths.checkpoints == mount_point
    make_synthetic_run(paths.root, n_train_docs=200, n_val_docs=40)

    def cfg(max_steps: int):
        return _train_cfg(tmp_path, max_steps, checkpoint_every=2)

    # A good checkpoint first (step 2), then shrink the disk so it holds that one and half another.
    grow("16m")
    assert launch_training(cfg(2), paths, log=lambda _: None).last_tag == "step_000002"
    used = sum(f.stat().st_size for f in mount_point.rglob("*") if f.is_file())
    grow(f"{used * 3 // 2 // 1024 + 64}k")

    with pytest.raises(TrainingFailed) as err:
        launch_training(cfg(4), paths, log=lambda _: None)
    message = str(err.value)
    # The rank names the file it could not write and how much room was left.
    assert f"could not write checkpoint file {mount_point / 'step_000004'}/" in message, message
    assert "bytes free on that file system" in message
    assert not (mount_point / "step_000004" / COMPLETE_FILE).exists()
    # The last good checkpoint is untouched and still the one a resume picks.
    assert latest_tag(paths.checkpoints) == "step_000002"
    verify_tag(paths.checkpoints, "step_000002")
    assert load_consolidated_state_dict(paths.checkpoints, "step_000002")

    grow("16m")
    lines: list[str] = []
    result = launch_training(cfg(4), paths, log=lines.append)
    assert any("resumed from" in x and "step_000002" in x for x in lines), lines
    assert result.steps == 4 and result.last_tag == "step_000004"
    verify_tag(paths.checkpoints, "step_000004")
    assert (paths.train / "_SUCCESS.json").exists()


# --- a stage in a child process under RLIMIT_FSIZE --------------------------------------------

CHILD = r"""
import json, resource, signal, sys
from pathlib import Path

from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import PipelineConfig

spec = json.loads(sys.argv[1])
cfg, paths = PipelineConfig.model_validate(spec["config"]), RunPaths(Path(spec["run"]))
if spec["stage"] == "clean":
    from data_prep.clean import clean_corpus as stage
elif spec["stage"] == "shards":
    from data_prep.shards import write_shards as stage
else:
    from pretrain.export import export as stage


def limited():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing us
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["limit"], hard))
    try:
        stage(cfg, paths)
        report = {"completed": True}
    except OSError as err:
        report = {"errno": err.errno, "message": str(err), "filename": err.filename}
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    Path(spec["report"]).write_text(json.dumps(report))


if spec["stage"] == "export":
    limited()
else:
    from data_prep.ray_runtime import ray_session

    with ray_session(cfg.runtime):  # Ray's processes start now, before the limit, and keep none
        limited()
"""


def _run_limited(stage: str, cfg: PipelineConfig, paths: RunPaths, limit: int, tmp_path: Path) -> dict:
    """Run ``stage`` in a child whose files may not grow past ``limit`` bytes; the error it hit."""
    report = tmp_path / f"{stage}-report.json"
    spec = {"stage": stage, "config": cfg.model_dump(mode="json"), "run": str(paths.root), "limit": limit,
            "report": str(report)}
    env = {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state")}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and report.exists(), proc.stderr[-4000:]
    result = read_json(report)
    assert not result.get("completed"), f"{stage} fit under a {limit}-byte file size limit"
    return result


def _error(err: OSError) -> dict:
    return {"errno": err.errno, "message": str(err), "filename": err.filename}


def _assert_names_the_file(error: dict, code: int, under: Path) -> Path:
    """The error is the kernel's, says so in words, and names the file, under ``under``."""
    message, name = error["message"], error["filename"]
    assert error["errno"] == code, message
    assert os.strerror(code) in message and name and name in message, message
    assert Path(name).is_relative_to(under), message
    return Path(name)


# --- data stages ----------------------------------------------------------------------------------


def _data_cfg(runs_root: Path, corpus: Path) -> PipelineConfig:
    return PipelineConfig.model_validate({
        # Small parts: a clean part row group is the unit a shard closes on, so several shards.
        "data": {"sample_corpus": False, "inputs": [str(corpus)], "documents_per_shard": 60},
        "tokenizer": {"vocab_size": 400, "input_sentence_size": 20000, "val_fraction": 0.1, "shard_size_mb": 0.02},
        "runtime": {"run_name": "run", "runs_root": str(runs_root), "num_cpus": 2},
    })


@pytest.fixture(scope="module")
def data_reference(ray_cluster, tmp_path_factory):
    """A corpus outside every run, and an uninterrupted clean + tokenizer + shards run over it."""
    from data_prep.clean import clean_corpus
    from data_prep.sample_corpus import build_sample_corpus
    from data_prep.shards import write_shards
    from data_prep.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("full_disk_data")
    corpus = root / "corpus.jsonl"
    build_sample_corpus(corpus, max_docs=400, seed=0)
    cfg = _data_cfg(root / "reference", corpus)
    paths = RunPaths(cfg.run_dir())
    clean_corpus(cfg, paths)
    train_tokenizer(cfg, paths)
    write_shards(cfg, paths)
    assert len(read_json(paths.shards / "manifest.json")["splits"]["train"]) >= 3
    return corpus, paths


def _assert_same_as(paths: RunPaths, reference: RunPaths, stage: str) -> None:
    here, there = getattr(paths, stage), getattr(reference, stage)
    assert _outputs(here) == _outputs(there)
    assert read_json(here / SUCCESS_FILE)["fingerprint"] == read_json(there / SUCCESS_FILE)["fingerprint"]


def _assert_no_clean_output(paths: RunPaths) -> None:
    from data_prep.clean import WORK_DIR

    # Finished work files of the workers may stay (a rerun reuses them); nothing else may.
    assert not [f for f in _outputs(paths.clean) if not f.startswith(f"{WORK_DIR}/")]
    assert not (paths.clean / SUCCESS_FILE).exists() and not _temporaries(paths.root)


def test_clean_on_a_full_disk_names_the_workers_file_and_a_rerun_matches(data_reference, tmpfs, tmp_path):
    from data_prep.clean import WORK_DIR, clean_corpus

    corpus, reference = data_reference
    cfg = _data_cfg(tmp_path, corpus)
    paths = RunPaths(cfg.run_dir())
    # Room for half the final output: the first work file a Ray worker writes (the text) does not fit.
    grow = tmpfs(paths.root, _kib(_disk_use(reference.clean) // 2))

    with pytest.raises(OSError) as err:
        clean_corpus(cfg, paths)
    # The worker's error reaches the driver as itself, not buried in a task traceback.
    _assert_names_the_file(_error(err.value), errno.ENOSPC, paths.clean / WORK_DIR)
    assert f"clean: cleaning {corpus}" in str(err.value)
    _assert_no_clean_output(paths)

    grow("64m")
    assert not clean_corpus(cfg, paths).skipped
    _assert_same_as(paths, reference, "clean")


def test_clean_past_the_file_size_limit_names_the_part_and_a_rerun_matches(data_reference, tmp_path):
    from data_prep.clean import clean_corpus

    corpus, reference = data_reference
    cfg = _data_cfg(tmp_path, corpus)
    paths = RunPaths(cfg.run_dir())
    limit = (reference.clean / "part-00000.parquet").stat().st_size // 2

    error = _run_limited("clean", cfg, paths, limit, tmp_path)
    name = _assert_names_the_file(error, errno.EFBIG, paths.root)
    assert name.name == "part-00000.parquet", error  # the driver's final write
    _assert_no_clean_output(paths)

    result = clean_corpus(cfg, paths)
    assert result.tasks_reused == result.tasks  # the workers' finished files were kept and reused
    _assert_same_as(paths, reference, "clean")


def _with_clean_and_tokenizer_of(reference: RunPaths, paths: RunPaths) -> None:
    shutil.copytree(reference.clean, paths.clean)
    shutil.copytree(reference.tokenizer, paths.tokenizer)


def _assert_no_shards(paths: RunPaths) -> None:
    # Shards finished before the error stay in the work directory, recorded, for the rerun.
    assert not paths.shards.exists() and not _temporaries(paths.root)


def test_shards_on_a_full_disk_name_the_file_and_a_rerun_matches(data_reference, tmpfs, tmp_path):
    from data_prep.shards import write_shards

    corpus, reference = data_reference
    cfg = _data_cfg(tmp_path, corpus)
    paths = RunPaths(cfg.run_dir())
    inputs = _disk_use(reference.clean) + _disk_use(reference.tokenizer)
    grow = tmpfs(paths.root, _kib(inputs + _disk_use(reference.shards) // 2))
    _with_clean_and_tokenizer_of(reference, paths)

    with pytest.raises(OSError) as err:
        write_shards(cfg, paths)
    _assert_names_the_file(_error(err.value), errno.ENOSPC, paths.root)
    _assert_no_shards(paths)

    grow("64m")
    assert not write_shards(cfg, paths).skipped
    _assert_same_as(paths, reference, "shards")


def test_shards_past_the_file_size_limit_name_the_shard_and_a_rerun_matches(data_reference, tmp_path):
    from data_prep.shards import write_shards

    corpus, reference = data_reference
    cfg = _data_cfg(tmp_path, corpus)
    paths = RunPaths(cfg.run_dir())
    _with_clean_and_tokenizer_of(reference, paths)
    first = read_json(reference.shards / "manifest.json")["splits"]["train"][0]

    error = _run_limited("shards", cfg, paths, first["bytes"] // 2, tmp_path)
    name = _assert_names_the_file(error, errno.EFBIG, paths.root)
    assert name.name == first["file"], error
    _assert_no_shards(paths)

    assert not write_shards(cfg, paths).skipped
    _assert_same_as(paths, reference, "shards")


# --- export ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny trained run and the files of its uninterrupted export (then removed)."""
    from pretrain.export import export
    from pretrain.launch import launch_training

    root = tmp_path_factory.mktemp("full_disk_export")
    cfg = _train_cfg(root, max_steps=1, checkpoint_every=1)
    paths = RunPaths(cfg.run_dir())
    make_synthetic_run(paths.root, n_train_docs=200, n_val_docs=40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_PIPELINE_STATE", str(root / "state"))
        launch_training(cfg, paths, log=lambda _: None)
        export(cfg, paths)
    reference = _outputs(paths.export)
    assert "hf/model.safetensors" in reference
    shutil.rmtree(paths.export)
    return cfg, paths, reference


def _assert_no_export(paths: RunPaths) -> None:
    assert not list(paths.export.iterdir()), list(paths.export.iterdir())  # no hf/, no temporaries, no record


def test_export_on_a_full_disk_names_the_file_and_a_rerun_matches(trained_run, tmpfs):
    from pretrain.export import export

    cfg, paths, reference = trained_run
    # Room for the small files, not for the weights.
    grow = tmpfs(paths.export, "64k")
    with pytest.raises(OSError) as err:
        export(cfg, paths)
    _assert_names_the_file(_error(err.value), errno.ENOSPC, paths.export)
    _assert_no_export(paths)

    grow("64m")
    assert not export(cfg, paths).skipped
    assert _outputs(paths.export) == reference and (paths.export / SUCCESS_FILE).exists()


def test_export_past_the_file_size_limit_names_the_file_and_a_rerun_matches(trained_run, tmp_path):
    from pretrain.export import export

    cfg, paths, reference = trained_run
    try:
        error = _run_limited("export", cfg, paths, 64 << 10, tmp_path)
        _assert_names_the_file(error, errno.EFBIG, paths.export)
        _assert_no_export(paths)

        assert not export(cfg, paths).skipped
        assert _outputs(paths.export) == reference and (paths.export / SUCCESS_FILE).exists()
    finally:
        shutil.rmtree(paths.export, ignore_errors=True)
