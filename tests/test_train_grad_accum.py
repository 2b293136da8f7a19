"""Gradient accumulation is a batch split, not a different optimisation: micro 2 x accum 4 trains
like micro 8 x accum 1 (same sequences per optimizer step, same seed), up to fp32 summation order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.launch import launch_training
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration


def run(tmp_path: Path, name: str, micro: int, accum: int, keep_zero1: bool) -> dict[int, float]:
    paths = RunPaths(tmp_path / "runs" / name)
    make_synthetic_run(paths.root)
    cfg = build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": {
                "micro_batch_size": micro, "grad_accum_steps": accum, "max_steps": 6, "log_every": 1, "device": "cpu",
                "zero": {"stage": 1, "keep_stage_on_one_rank": keep_zero1}, "launch": {"nproc_per_node": 1},
                "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
                "validation": {"every": 100, "batches": 1}, "checkpoint": {"every": 100},
            },
            "tracking": {"wandb_mode": "disabled"},
            "runtime": {"run_name": name, "runs_root": str(paths.root.parent)},
        }
    )
    launch_training(cfg, paths, log=lambda _: None)
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


# One fp32 rank runs ZeRO-1 as ZeRO-0 (DeepSpeed's engine accumulates into .grad); kept, DeepSpeed's
# ZeRO-1 optimizer accumulates into its own partition.
@pytest.mark.parametrize("keep_zero1", [False, True], ids=["zero0", "zero1"])
def test_micro2_accum4_equals_micro8_accum1(tmp_path, monkeypatch, keep_zero1):
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    split = run(tmp_path, "split", micro=2, accum=4, keep_zero1=keep_zero1)
    whole = run(tmp_path, "whole", micro=8, accum=1, keep_zero1=keep_zero1)
    assert sorted(split) == list(range(1, 7))
    # Step 1 sees identical weights and data: only summation order differs. Later steps compound it.
    assert split[1] == pytest.approx(whole[1], rel=1e-5)
    assert split == pytest.approx(whole, rel=1e-3)
    assert split[6] < split[1]
