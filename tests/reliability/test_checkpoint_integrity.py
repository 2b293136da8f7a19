"""Checkpoints: a tag counts only once its completion record is written; a truncated or corrupted
one is refused by file name and the previous complete tag is used; nothing is unpickled beyond
tensors and plain data (``torch.load(weights_only=True)``).

One real 2-rank ZeRO-1 run (6 steps, a tag every 2) is shared by the module; each damage case
works on a copy of its checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    CLIENT_STATE_FILE,
    COMPLETE_FILE,
    CheckpointError,
    deepspeed_safe_globals,
    latest_tag,
    list_tags,
    load_client_state,
    require_tag,
    safe_load,
    verify_tag,
    write_completion_record,
)
from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration

TAGS = ["step_000002", "step_000004", "step_000006"]


def make_cfg(root: Path):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": {
                "micro_batch_size": 8, "max_steps": 6, "log_every": 1, "device": "cpu",
                "zero": {"stage": 1}, "launch": {"nproc_per_node": 2}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 1, "min_lr": 3e-4}, "validation": {"every": 100, "batches": 1},
                "checkpoint": {"every": 2, "keep_last": 3},
            },
            "eval": {"max_tokens": 256, "prompts": ["The cat"], "max_new_tokens": 4, "wandb": False},
            "tracking": {"wandb_mode": "disabled"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from pretrain.launch import launch_training

    os.environ.setdefault("PRETRAIN_PIPELINE_STATE", str(tmp_path_factory.mktemp("state")))
    paths = RunPaths(tmp_path_factory.mktemp("runs") / "ckpt")
    make_synthetic_run(paths.root)
    cfg = make_cfg(paths.root)
    launch_training(cfg, paths, log=lambda _: None)
    pristine = paths.root.parent / "pristine-checkpoints"
    shutil.copytree(paths.checkpoints, pristine)
    return cfg, paths, pristine, losses_by_step(paths.metrics)


@pytest.fixture()
def run(trained):
    """The trained run with its checkpoints restored to what training wrote."""
    cfg, paths, pristine, losses = trained
    shutil.rmtree(paths.checkpoints)
    shutil.copytree(pristine, paths.checkpoints)
    for stage in (paths.eval, paths.export):
        shutil.rmtree(stage, ignore_errors=True)
    return cfg, paths, losses


def _file(paths: RunPaths, tag: str, pattern: str) -> Path:
    (path,) = sorted((paths.checkpoints / tag).glob(pattern))[:1]
    return path


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 8] = bytes(b ^ 0xFF for b in data[mid : mid + 8])  # same size, other content
    path.write_bytes(bytes(data))


def test_complete_tags_carry_a_record_of_every_file(run):
    _, paths, _ = run
    assert list_tags(paths.checkpoints) == TAGS
    assert (paths.checkpoints / "latest").read_text() == "step_000006"
    for tag in TAGS:
        tag_dir = paths.checkpoints / tag
        record = json.loads((tag_dir / COMPLETE_FILE).read_text())
        on_disk = {p.name for p in tag_dir.iterdir() if p.name != COMPLETE_FILE}
        assert set(record["files"]) == on_disk
        assert CLIENT_STATE_FILE in on_disk and sum("optim_states" in n for n in on_disk) == 2
        verify_tag(paths.checkpoints, tag)
    # Our state loads with weights_only=True; DeepSpeed's files with only its few allow-listed classes.
    state = load_client_state(paths.checkpoints)
    assert state["step"] == 6 and len(state["rng"]) == 2
    for path in (paths.checkpoints / "step_000006").glob("*_states.pt"):
        assert isinstance(safe_load(path, extra_globals=deepspeed_safe_globals()), dict)


@pytest.mark.parametrize(
    "damage",
    ["truncate-model", "truncate-optim", "corrupt-optim", "delete-record", "delete-client-state"],
)
def test_damaged_latest_tag_is_refused_by_name(run, damage, caplog):
    _, paths, _ = run
    target = {
        "truncate-model": lambda: _file(paths, TAGS[-1], "mp_rank_*_model_states.pt"),
        "truncate-optim": lambda: _file(paths, TAGS[-1], "*rank_1_*optim_states.pt"),
        "corrupt-optim": lambda: _file(paths, TAGS[-1], "*rank_0_*optim_states.pt"),
        "delete-record": lambda: paths.checkpoints / TAGS[-1] / COMPLETE_FILE,
        "delete-client-state": lambda: paths.checkpoints / TAGS[-1] / CLIENT_STATE_FILE,
    }[damage]()
    if damage.startswith("truncate"):
        truncate(target)
    elif damage.startswith("corrupt"):
        flip_bytes(target)
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match=str(target)):
        verify_tag(paths.checkpoints, TAGS[-1])
    warnings: list[str] = []
    assert latest_tag(paths.checkpoints, warn=warnings.append) == "step_000004"
    assert len(warnings) == 1 and str(target) in warnings[0] and "falling back" in warnings[0]
    assert require_tag(paths.checkpoints) == "step_000004"
    assert str(target) in caplog.text


def test_every_tag_damaged_is_an_error_naming_the_files(run):
    cfg, paths, _ = run
    from pretrain.evaluate import evaluate
    from pretrain.export import export

    damaged = [_file(paths, tag, "mp_rank_*_model_states.pt") for tag in TAGS]
    for path in damaged:
        truncate(path)
    with pytest.raises(CheckpointError) as err:
        latest_tag(paths.checkpoints)
    assert all(str(p) in str(err.value) for p in damaged)
    for stage in (evaluate, export):
        with pytest.raises(CheckpointError, match=str(damaged[-1])):
            stage(cfg, paths, force=True)
    assert not (paths.eval / "_SUCCESS.json").exists() and not (paths.export / "hf").exists()


def test_evaluate_and_export_fall_back_to_the_last_good_tag(run, caplog):
    cfg, paths, _ = run
    from pretrain.evaluate import evaluate
    from pretrain.export import export

    bad = _file(paths, TAGS[-1], "*rank_0_*optim_states.pt")
    flip_bytes(bad)
    assert evaluate(cfg, paths).checkpoint_tag == "step_000004"
    assert export(cfg, paths).checkpoint_tag == "step_000004"
    assert str(bad) in caplog.text


class RunsCode:
    """Unpickling this would run ``touch <marker>``: what a malicious checkpoint file carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_with_pickled_code_are_refused_not_run(run, tmp_path):
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pretrain.checkpoint import safe_checkpoint_engine

    _, paths, _ = run
    tag_dir = paths.checkpoints / TAGS[-1]
    # The control: plain torch.load(weights_only=False) of such a file does run it.
    control = tmp_path / "control.pt"
    torch.save({"x": RunsCode(tmp_path / "ran-control")}, control)
    torch.load(control, weights_only=False)
    assert (tmp_path / "ran-control").exists()

    # Our client state, with a record rewritten to match (integrity is not authenticity).
    marker = tmp_path / "ran"
    torch.save({"step": 6, "x": RunsCode(marker)}, tag_dir / CLIENT_STATE_FILE)
    write_completion_record(tag_dir)
    with pytest.raises(CheckpointError, match=f"refusing to load {tag_dir / CLIENT_STATE_FILE}"):
        load_client_state(paths.checkpoints, TAGS[-1])

    # DeepSpeed's own loads, through the checkpoint engine our training installs: a real optimizer
    # file loads, one carrying code is refused.
    ds = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    safe_checkpoint_engine(ds)
    optim = _file(paths, TAGS[0], "*rank_0_*optim_states.pt")
    assert "optimizer_state_dict" in ds.checkpoint_engine.load(str(optim), map_location="cpu")
    evil = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match=f"refusing to load {evil}"):
        ds.checkpoint_engine.load(str(evil), map_location="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("planted", ["*rank_0_*optim_states.pt", "*mp_rank_00_model_states.pt"])
def test_evaluate_and_export_prescan_refuses_pickled_code_before_zero_to_fp32(run, tmp_path, planted):
    """evaluate and export consolidate weights through ``load_consolidated_state_dict``, whose
    ``zero_to_fp32`` unpickles with weights_only=False: the pre-scan must refuse a file carrying
    code by name before that load runs any of it."""
    from pretrain.checkpoint import load_consolidated_state_dict

    _, paths, _ = run
    copy = tmp_path / "checkpoints"
    shutil.copytree(paths.checkpoints / TAGS[0], copy / TAGS[0])
    assert load_consolidated_state_dict(copy, TAGS[0])  # the control: the untouched copy loads
    target = next((copy / TAGS[0]).glob(planted))
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": RunsCode(marker), "module": RunsCode(marker)}, target)
    with pytest.raises(CheckpointError, match=f"refusing to load {target}: it pickles .*posix.system"):
        load_consolidated_state_dict(copy, TAGS[0])
    assert not marker.exists()


def test_resume_skips_a_truncated_tag_and_reproduces_the_losses(run):
    """Truncate the newest tag's optimizer shard; the rerun says so, resumes from the tag before it
    and reproduces the original losses bitwise (CPU fp32)."""
    from pretrain.launch import launch_training

    cfg, paths, expected = run
    bad = _file(paths, TAGS[-1], "*rank_1_*optim_states.pt")
    truncate(bad)
    lines: list[str] = []
    result = launch_training(cfg, paths, force=True, log=lines.append)
    assert any(str(bad) in x and "falling back" in x for x in lines), lines
    assert any("resumed from" in x and "step_000004" in x for x in lines), lines
    assert result.steps == 6 and result.last_tag == "step_000006"
    got = losses_by_step(paths.metrics)
    for step in (5, 6):
        assert got[step] == expected[step], (step, got[step], expected[step])
    verify_tag(paths.checkpoints, "step_000006")  # saved again, complete
    assert (paths.checkpoints / "step_000006.damaged").is_dir()  # the refused one, kept aside


def test_resume_refuses_a_deepspeed_file_that_pickles_code(run, tmp_path):
    """An optimizer shard replaced by one that would run code, record rewritten to match: the ranks
    refuse it by name before any of it runs."""
    from pretrain.launch import TrainingFailed, launch_training

    cfg, paths, _ = run
    tag_dir = paths.checkpoints / TAGS[-1]
    target = _file(paths, TAGS[-1], "*rank_0_*optim_states.pt")
    marker = tmp_path / "ran"
    # Pickled by reference to os.system, so the ranks could unpickle it without this test module.
    torch.save({"optimizer_state_dict": RunsCode(marker)}, target)
    write_completion_record(tag_dir)
    with pytest.raises(TrainingFailed) as err:
        launch_training(cfg, paths, force=True, log=lambda _: None)
    assert f"refusing to load {target}" in str(err.value)
    assert not marker.exists()
