"""A full disk while a checkpoint is written: a clear error naming the file, no completion record,
nothing that later passes for a checkpoint, and the next run (with space) succeeds.

The run's ``checkpoints/`` is a real tmpfs of 256 KiB (mount needs root with CAP_SYS_ADMIN; the
test skips, saying why, where the kernel refuses), so the failure is the kernel's ENOSPC, not a
simulation. The rest of the run directory (launcher log, metrics) stays on the normal disk.
"""

from __future__ import annotations

import subprocess

import pytest

from pretrain.synthetic import make_synthetic_run
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config

pytestmark = pytest.mark.integration


@pytest.fixture()
def small_disk(tmp_path):
    """A 256 KiB tmpfs; yields (mount point, function that grows it)."""
    mount_point = tmp_path / "run" / "checkpoints"
    mount_point.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {proc.stderr.strip()}")

    def grow(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_checkpoint_on_a_full_disk_fails_by_name_and_a_later_run_succeeds(small_disk, tmp_path, monkeypatch):
    from pretrain.checkpoint import COMPLETE_FILE, latest_tag, verify_tag
    from pretrain.launch import TrainingFailed, train

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    mount_point, grow = small_disk
    paths = RunPaths(tmp_path / "run")
    assert paths.checkpoints == mount_point
    make_synthetic_run(paths.root, n_train_docs=200, n_val_docs=40)
    cfg = build_config({
        "data": {"sample_corpus": True},
        "tokenizer": {"vocab_size": 320},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "train": {"zero_stage": 1, "nproc_per_node": 1, "micro_batch_size": 4, "max_steps": 4,
                  "warmup_steps": 0, "log_every": 1, "eval_every": 100, "eval_batches": 1,
                  "checkpoint_every": 2, "device": "cpu"},
        "tracking": {"wandb_mode": "disabled"},
        "runtime": {"run_name": "run", "runs_root": str(tmp_path)},
    })

    with pytest.raises(TrainingFailed) as err:
        train(cfg, paths, log=lambda _: None)
    message = str(err.value)
    # The rank names the file it could not write and how much room was left.
    assert f"could not write checkpoint file {mount_point / 'step_000002'}/" in message, message
    assert "bytes free on that file system" in message
    assert not list(mount_point.rglob(COMPLETE_FILE)) and not (mount_point / "latest").exists()
    assert latest_tag(paths.checkpoints) is None  # the partial tag never counts
    assert not (paths.train / "_SUCCESS.json").exists()

    grow("16m")
    lines: list[str] = []
    result = train(cfg, paths, log=lines.append)
    assert result.steps == 4 and result.last_tag == "step_000004"
    assert any("no complete checkpoint" in x and "step_000002" in x for x in lines), lines
    verify_tag(paths.checkpoints, "step_000004")
    assert (paths.train / "_SUCCESS.json").exists()
