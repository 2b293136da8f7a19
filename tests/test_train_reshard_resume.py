"""A run SIGKILLed on one cluster shape continues on another, through the real launcher (CPU, gloo, fp32).

The reference is one uninterrupted 1-rank run of STEPS steps. Each case trains the same config on
topology A until a rank SIGKILLs itself (``pretrain.faults``: no save, no cleanup, as a lost node)
before step KILL_AT, then is launched again (``train.resume: auto``) on topology B with gradient
accumulation keeping the global batch: the last checkpoint (step RESUMED_AT) is converted once
(``pretrain.reshard``), the optimizer state, LR schedule position, data position and W&B run continue,
and at every step the run reads the reference's global samples (hashes of the ids each step consumed)
with its loss within 1e-4 relative (only the order of the gradient reduction differs), the 20 steps
after the resume included. ``make soak`` (PRETRAIN_SOAK_ROUNDS > 1) adds kills at points drawn from
PRETRAIN_PIPELINE_FAULT_SEED.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from pretrain.tracking import losses_by_step, metrics_by_step
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config, merge_tree
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration

CHECKPOINT_EVERY, KILL_AT, GLOBAL_BATCH = 6, 8, 8
RESUMED_AT = (KILL_AT - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
STEPS = RESUMED_AT + 20
ROUNDS = max(1, int(os.environ.get("PRETRAIN_SOAK_ROUNDS", "1")))
SEED = int(os.environ.get("PRETRAIN_PIPELINE_FAULT_SEED", "0"))


def make_cfg(root: Path, world: int, stage: int):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": merge_tree({
                "micro_batch_size": 4, "grad_accum_steps": GLOBAL_BATCH // (4 * world), "max_steps": STEPS,
                "log_every": 1, "device": "cpu", "precision": "fp32", "zero": {"stage": stage},
                "launch": {"nproc_per_node": world}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 2, "min_lr": 3e-4},  # cosine: the resumed run must find its place
                "validation": {"every": 100, "batches": 1},
                "checkpoint": {"every": CHECKPOINT_EVERY, "keep_last": 10},
            }, {}),
            "tracking": {"wandb_mode": "offline"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


def hashes_by_step(paths: RunPaths) -> dict[int, int]:
    return {s: r["data/sample_hash"] for s, r in metrics_by_step(paths.metrics, "data/sample_hash").items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run on one rank, every step's sample hash logged."""
    from pretrain.launch import launch_training
    from pretrain.trainer import SAMPLE_HASH_ENV

    root = tmp_path_factory.mktemp("reference")
    paths = RunPaths(root / "straight")
    make_synthetic_run(paths.root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_PIPELINE_STATE", str(root / "state"))
        mp.setenv(SAMPLE_HASH_ENV, "1")
        launch_training(make_cfg(paths.root, 1, 0), paths, log=lambda _: None)
    hashes = hashes_by_step(paths)
    assert sorted(hashes) == list(range(1, STEPS + 1)) and len(set(hashes.values())) == STEPS
    return losses_by_step(paths.metrics), hashes


def kill_points() -> list[int]:
    """KILL_AT; under ``make soak`` also drawn points, each after the first checkpoint."""
    rng = random.Random(SEED)
    return [KILL_AT] + [rng.randrange(CHECKPOINT_EVERY + 1, STEPS) for _ in range(ROUNDS - 1)]


@pytest.mark.parametrize(
    "before,after,line",
    [((2, 2), (1, 2), "written by 2 ranks ZeRO-2 on 1 rank ZeRO-0: converted in"),
     ((1, 0), (2, 3), "written by 1 rank ZeRO-0 on 2 ranks ZeRO-3: converted in")],
    ids=["2r-zero2-killed_to_1r", "1r-zero0-killed_to_2r-zero3"],
)
def test_a_run_killed_and_resumed_on_another_world_size_and_stage_continues_it(
        before, after, line, reference, tmp_path, monkeypatch):
    from pretrain.checkpoint import load_client_state
    from pretrain.events import read_events
    from pretrain.faults import FAULT_KILL_ENV
    from pretrain.launch import TrainingFailed, launch_training
    from pretrain.reshard import RECORD_FILE, UNIVERSAL_DIR
    from pretrain.trainer import SAMPLE_HASH_ENV

    expected_losses, expected_hashes = reference
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    monkeypatch.setenv(SAMPLE_HASH_ENV, "1")
    for round_, kill_at in enumerate(kill_points()):
        resumed_at = (kill_at - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        moved = RunPaths(tmp_path / f"moved{round_}")
        make_synthetic_run(moved.root)
        monkeypatch.setenv(FAULT_KILL_ENV, f"{before[0] - 1}:{kill_at}")  # the last rank, before step kill_at
        with pytest.raises(TrainingFailed):
            launch_training(make_cfg(moved.root, *before), moved, log=lambda _: None)
        monkeypatch.delenv(FAULT_KILL_ENV)
        assert max(losses_by_step(moved.metrics)) == kill_at - 1  # it got past its last checkpoint
        lines: list[str] = []
        result = launch_training(make_cfg(moved.root, *after), moved, log=lines.append)
        assert any(f"resuming step {resumed_at} {line}" in x for x in lines), (kill_at, lines[-30:])
        assert result.steps == STEPS
        tag = f"step_{resumed_at:06d}"
        assert result.wandb_run_id == load_client_state(moved.checkpoints, tag)["wandb_run_id"] is not None
        # Every step, before the kill and after the resume, read the reference's samples with its loss.
        assert hashes_by_step(moved) == expected_hashes, kill_at
        got = losses_by_step(moved.metrics)
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in range(1, STEPS + 1):
            assert got[step] == pytest.approx(expected_losses[step], rel=1e-4), (kill_at, step, got[step])
        # Converted once, recorded next to the tag it came from, and on the run's timeline.
        record = json.loads((moved.checkpoints / tag / UNIVERSAL_DIR / RECORD_FILE).read_text())
        assert (record["source_world_size"], record["source_zero_stage"]) == before
        conversions = [e for e in read_events(moved.train) if e["kind"] == "conversion"]
        assert len(conversions) == 1 and conversions[0]["step"] == resumed_at and line in conversions[0]["message"]
