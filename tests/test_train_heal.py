"""A run that heals itself, through the real launcher on tiny synthetic shards (CPU, gloo, real DeepSpeed).

- ``train.recovery.spike_policy: rollback``: a loss spike injected at one step (rank 0 only, so the
  all-reduced step loss is what every rank judges) rolls every rank back to the last checkpoint,
  the global sample window since it is skipped and recorded, and the run ends near an unspiked run
  (``make soak``: also spikes at steps drawn from its seeds); spikes past ``max_rollbacks`` stop like ``nonfinite_loss: stop``, the last good checkpoint intact.
- ``train.recovery.max_restarts``: a rank SIGKILLed mid-run is restarted by the launcher (torchrun
  and the deepspeed launcher), resumes from the latest checkpoint and ends with the uninterrupted
  run's losses.
"""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

from pretrain.events import read_events
from pretrain.tracking import losses_by_step, metrics_by_step
from pretrain_pipeline.artifacts import RunPaths, read_json
from pretrain_pipeline.config import merge_tree
from conftest import free_port  # tests/ is on sys.path (rootdir conftest)
from test_train_features import make_cfg as features_cfg, new_run, state_dir  # noqa: F401 (a fixture)

pytestmark = pytest.mark.integration

STEPS = 12
ROUNDS = max(1, int(os.environ.get("PRETRAIN_SOAK_ROUNDS", "1")))
SEED = int(os.environ.get("PRETRAIN_PIPELINE_FAULT_SEED", "0"))
GLOBAL_BATCH = 8 * 2  # micro-batch 8 x 2 ranks x accumulation 1


def make_cfg(paths: RunPaths, **train):
    """test_train_features' tiny run (micro-batch 8, constant LR 3e-3), on 2 ranks for 12 steps."""
    return features_cfg(paths, **merge_tree({
        "max_steps": STEPS, "launch": {"nproc_per_node": 2}, "validation": {"batches": 4},
        "checkpoint": {"every": 4, "keep_last": 4},
    }, train))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted, unspiked run every test here compares with."""
    from pretrain.launch import launch_training

    root = tmp_path_factory.mktemp("straight")
    paths = new_run(root, "straight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_PIPELINE_STATE", str(root / "state"))
        result = launch_training(make_cfg(paths), paths, log=lambda _: None)
    assert result.steps == STEPS and read_events(paths.train) == []
    return paths, result


def spike_points() -> list[int]:
    """Step 10; under ``make soak`` (PRETRAIN_SOAK_ROUNDS > 1) also steps drawn from the fault seed,
    each late enough for the detector's window to have filled and a checkpoint to exist."""
    rng = random.Random(SEED)
    return [10] + [rng.randrange(6, STEPS + 1) for _ in range(ROUNDS - 1)]


def final_val_loss(paths: RunPaths) -> float:
    return metrics_by_step(paths.metrics, "val/loss")[STEPS]["val/loss"]


def test_a_spike_is_rolled_back_its_window_skipped_and_the_run_finishes_like_an_unspiked_one(
        straight, state_dir, tmp_path, monkeypatch):
    from pretrain.checkpoint import load_client_state
    from pretrain.faults import FAULT_SPIKE_ENV
    from pretrain.launch import launch_training

    base_paths, base = straight
    for round_, spike_at in enumerate(spike_points()):
        paths = new_run(tmp_path, f"spike{round_}")
        resumed = (spike_at - 1) // 4 * 4  # the last checkpoint before the spike (every 4 steps)
        monkeypatch.setenv(FAULT_SPIKE_ENV, str(spike_at))  # rank 0's loss x10 at that step
        cfg = make_cfg(paths, recovery={"spike_policy": "rollback", "spike_window": 4, "spike_k": 3.0, "max_rollbacks": 2})
        lines: list[str] = []
        result = launch_training(cfg, paths, log=lines.append)
        assert result.steps == STEPS and math.isfinite(result.final_loss)

        [event] = read_events(paths.train)
        assert (event["kind"], event["step"], event["resumed_step"]) == ("rollback", spike_at, resumed)
        # The steps since the checkpoint drew 16 global samples each after its position: that window is skipped.
        lo, hi = event["skipped"]
        assert hi - lo == (spike_at - resumed) * GLOBAL_BATCH and lo == resumed * GLOBAL_BATCH
        assert any("rollback" in line and f"step {spike_at}" in line for line in lines)  # the train log says so
        state = load_client_state(paths.checkpoints)
        assert state["step"] == STEPS and [lo, hi] in [list(r) for r in state["data"]["skipped"]]
        assert state["spikes"]["budget"]["rollbacks"] == 1 and len(state["spikes"]["detector"]["losses"]) == 4
        # The spiked step ran again after the rollback, on samples after the skipped window.
        assert losses_by_step(paths.metrics)[spike_at] < 2 * losses_by_step(base_paths.metrics)[spike_at]
        # Other samples, same amount of training: the held-out loss ends within 2% of the unspiked run.
        assert final_val_loss(paths) == pytest.approx(final_val_loss(base_paths), rel=0.02), spike_at
        assert result.final_loss == pytest.approx(base.final_loss, rel=0.05), spike_at


def test_spikes_past_max_rollbacks_stop_and_keep_the_last_good_checkpoint(state_dir, tmp_path, monkeypatch):
    from pretrain.checkpoint import latest_tag, list_tags, load_client_state, load_consolidated_state_dict
    from pretrain.faults import FAULT_SPIKE_ENV
    from pretrain.launch import TrainingFailed, launch_training

    paths = new_run(tmp_path, "spikes")
    monkeypatch.setenv(FAULT_SPIKE_ENV, "6,6,6")  # step 6 spikes each of the three times it is reached
    cfg = make_cfg(paths, launch={"nproc_per_node": 1},
                   recovery={"spike_policy": "rollback", "spike_window": 4, "spike_k": 3.0, "max_rollbacks": 2})
    with pytest.raises(TrainingFailed, match="exitcode  : 4"):
        launch_training(cfg, paths, log=lambda _: None)
    log = (paths.train / "launcher.log").read_text()
    assert "[pretrain] error: loss spike at step 6" in log
    assert ("stopped without saving (train.recovery.max_rollbacks=2 rollbacks already made); "
            "latest checkpoint step_000004 is the last good state") in log
    assert [(e["kind"], e["step"], e["resumed_step"]) for e in read_events(paths.train)] == [("rollback", 6, 4)] * 2
    assert latest_tag(paths.checkpoints) == "step_000004" and list_tags(paths.checkpoints)[-1] == "step_000004"
    assert load_client_state(paths.checkpoints)["step"] == 4
    assert all(torch.isfinite(t).all() for t in load_consolidated_state_dict(paths.checkpoints).values())
    assert not (paths.train / "summary.json").exists()


def test_nonfinite_gradients_roll_back_under_the_rollback_policy(state_dir, tmp_path, monkeypatch):
    from pretrain.faults import FAULT_NONFINITE_ENV
    from pretrain.launch import launch_training

    paths = new_run(tmp_path, "nanback")
    monkeypatch.setenv(FAULT_NONFINITE_ENV, "5")  # rank 0's 6th micro-batch: step 6's NaN loss
    cfg = make_cfg(paths, max_steps=8, launch={"nproc_per_node": 1},
                   recovery={"spike_policy": "rollback", "spike_window": 4, "max_rollbacks": 1,
                             "rollback_lr_factor": 0.5, "rollback_lr_steps": 2})
    result = launch_training(cfg, paths, log=lambda _: None)
    assert result.steps == 8 and math.isfinite(result.final_loss)
    [event] = read_events(paths.train)
    assert (event["kind"], event["step"], event["resumed_step"]) == ("rollback", 6, 4)
    assert "non-finite loss at step 6" in event["message"] and event["skipped"][1] - event["skipped"][0] == 2 * 8
    # Steps 5 and 6 ran again at half the LR, then the LR came back.
    lrs = {s: r["train/lr"] for s, r in metrics_by_step(paths.metrics).items()}
    assert [lrs[s] for s in (4, 5, 6, 7)] == pytest.approx([3e-3, 1.5e-3, 1.5e-3, 3e-3])
    assert all(math.isfinite(v) for v in losses_by_step(paths.metrics).values())


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_killed_rank_is_restarted_and_the_run_ends_with_the_uninterrupted_losses(
        straight, state_dir, tmp_path, monkeypatch, launcher):
    from pretrain.faults import FAULT_KILL_ENV
    from pretrain.launch import launch_training

    base_paths, _ = straight
    paths = new_run(tmp_path, f"restart-{launcher}")
    monkeypatch.setenv(FAULT_KILL_ENV, "1:6")  # rank 1 SIGKILLs itself before step 6, first attempt only
    # A port of our own: the deepspeed launcher's default 29500 may be another run's on a shared machine.
    cfg = make_cfg(paths, launch={"launcher": launcher, "master_port": free_port()}, recovery={"max_restarts": 1})
    lines: list[str] = []
    result = launch_training(cfg, paths, log=lines.append)
    assert result.steps == STEPS
    kinds = [(e["kind"], e["step"]) for e in read_events(paths.train)]
    assert ("restart", 4) in kinds and ("resume", 4) in kinds, kinds
    # Steps 5 (logged before the kill) and 5..12 again after the restart: the newest of each equals the straight run.
    assert losses_by_step(paths.metrics) == pytest.approx(losses_by_step(base_paths.metrics), rel=1e-6)
    assert read_json(paths.train / "summary.json")["completed"]
