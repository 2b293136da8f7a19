"""A run continues on another world size and ZeRO stage through the real launcher (CPU, gloo, fp32).

The straight run trains 10 steps on topology A. The interrupted run trains the same config to step
6 on A, then is launched again (``train.resume: auto``) on topology B, with gradient accumulation
keeping the global batch: its checkpoint is converted once (``pretrain.reshard``), the optimizer
state, LR schedule position, data position and W&B run continue, and steps 7-10 have the straight
run's losses within 1e-4 relative (only the order of the gradient reduction differs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config, merge_tree
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration

STEPS, STOP_AT, GLOBAL_BATCH = 10, 6, 8


def make_cfg(root: Path, world: int, stage: int, max_steps: int):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": merge_tree({
                "micro_batch_size": 4, "grad_accum_steps": GLOBAL_BATCH // (4 * world), "max_steps": max_steps,
                "log_every": 1, "device": "cpu", "precision": "fp32", "zero": {"stage": stage},
                "launch": {"nproc_per_node": world}, "optimizer": {"lr": 3e-3},
                # A constant schedule after warmup: the LR of a step does not depend on max_steps,
                # so the run stopped at STOP_AT is the straight run's prefix.
                "schedule": {"warmup_steps": 2, "kind": "constant"},
                "validation": {"every": 100, "batches": 1}, "checkpoint": {"every": 100, "keep_last": 2},
            }, {}),
            "tracking": {"wandb_mode": "offline"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


@pytest.mark.parametrize(
    "before,after,line",
    [((2, 2), (1, 2), "written by 2 ranks ZeRO-2 on 1 rank ZeRO-0: converted in"),
     ((1, 0), (2, 3), "written by 1 rank ZeRO-0 on 2 ranks ZeRO-3: converted in")],
    ids=["2r-zero2_to_1r", "1r-zero0_to_2r-zero3"],
)
def test_resume_on_another_world_size_and_stage_continues_the_run(before, after, line, tmp_path, monkeypatch):
    from pretrain.events import read_events
    from pretrain.launch import launch_training
    from pretrain.reshard import RECORD_FILE, UNIVERSAL_DIR

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    straight = RunPaths(tmp_path / "straight")
    make_synthetic_run(straight.root)
    launch_training(make_cfg(straight.root, *before, STEPS), straight, log=lambda _: None)
    expected = losses_by_step(straight.metrics)

    moved = RunPaths(tmp_path / "moved")
    make_synthetic_run(moved.root)
    first = launch_training(make_cfg(moved.root, *before, STOP_AT), moved, log=lambda _: None)
    lines: list[str] = []
    result = launch_training(make_cfg(moved.root, *after, STEPS), moved, log=lines.append)
    assert any(f"resuming step {STOP_AT} {line}" in x for x in lines), lines[-30:]
    assert result.steps == STEPS and result.wandb_run_id == first.wandb_run_id
    got = losses_by_step(moved.metrics)
    for step in range(STOP_AT + 1, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), (step, got[step], expected[step])
    # Converted once, recorded next to the tag it came from, and on the run's timeline.
    record = json.loads((moved.checkpoints / f"step_{STOP_AT:06d}" / UNIVERSAL_DIR / RECORD_FILE).read_text())
    assert (record["source_world_size"], record["source_zero_stage"]) == before
    conversions = [e for e in read_events(moved.train) if e["kind"] == "conversion"]
    assert len(conversions) == 1 and conversions[0]["step"] == STOP_AT and line in conversions[0]["message"]
