"""ZeRO 1, 2 and 3 each train on real shards with 2 ranks (gloo, CPU), and train alike; bf16 and
ZeRO-Offload (optimizer, and parameters at stage 3) train too.

One launch per case, a few steps of a tiny GPT. The stages change where gradients, optimizer
states and parameters live, not the arithmetic, so in fp32 their losses agree closely.
"""

from __future__ import annotations

import pytest

from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config, merge_tree
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration

STEPS = 8
LOSSES: dict[int, dict[int, float]] = {}  # stage -> step -> loss, filled by the parametrized runs


def run_case(tmp_path, monkeypatch, stage: int, **train_extra):
    from pretrain.launch import launch_training

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    paths = RunPaths(tmp_path / "runs" / f"zero{stage}")
    make_synthetic_run(paths.root)
    cfg = build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"preset": "tiny", "block_size": 32},
            "train": merge_tree({
                "micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": STEPS, "log_every": 1, "device": "cpu",
                "zero": {"stage": stage}, "launch": {"nproc_per_node": 2}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 2, "min_lr": 3e-4}, "validation": {"every": 1000, "batches": 1},
                "checkpoint": {"every": 1000},
            }, train_extra),
            "tracking": {"wandb_mode": "disabled"},
            "runtime": {"run_name": paths.root.name, "runs_root": str(paths.root.parent)},
        }
    )
    lines: list[str] = []
    result = launch_training(cfg, paths, log=lines.append)
    losses = losses_by_step(paths.metrics)
    assert sorted(losses) == list(range(1, STEPS + 1)) and result.steps == STEPS
    return paths, result, lines, losses


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_reduces_loss_on_real_shards(stage, tmp_path, monkeypatch):
    paths, result, lines, losses = run_case(tmp_path, monkeypatch, stage)
    assert any(f"world 2, device cpu, zero {stage}," in line for line in lines)
    assert losses[1] > 5.0 and losses[STEPS] < losses[1] - 0.5, losses
    # Each rank wrote its own partition of the optimizer state (and, at stage 3, of the weights).
    tag = paths.checkpoints / result.last_tag
    assert len(list(tag.glob("*optim_states.pt"))) == 2
    LOSSES[stage] = losses


def test_zero_stages_agree():
    if len(LOSSES) < 3:
        pytest.skip("needs the three stage runs of this module")
    for stage in (2, 3):
        assert LOSSES[stage] == pytest.approx(LOSSES[1], rel=1e-4), stage


@pytest.mark.parametrize(
    "stage,extra",
    [
        (2, {"precision": "bf16", "zero": {"offload_optimizer": True}}),
        (3, {"zero": {"offload_optimizer": True, "offload_param": True}}),
    ],
    ids=["zero2-bf16-offload-optimizer", "zero3-offload-optimizer-and-params"],
)
def test_bf16_and_offload_train(stage, extra, tmp_path, monkeypatch):
    paths, result, lines, losses = run_case(tmp_path, monkeypatch, stage, **extra)
    precision = extra.get("precision", "fp32")
    assert any(f"world 2, device cpu, zero {stage}, {precision}," in line for line in lines), lines[-20:]
    assert losses[STEPS] < losses[1] - 0.5, losses
