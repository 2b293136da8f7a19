"""The loss-spike detector, the rollback budget and the events timeline (pure units, no training)."""

from __future__ import annotations

import json
import statistics

import pytest

from pretrain.events import event_line, read_events, record_event
from pretrain.spikes import RollbackBudget, SpikeDetector

NOISY = [3.0, 3.1, 2.9, 3.05, 2.95]  # mean 3.0, population std 0.0707


def filled(window: int = 5, k: float = 3.0) -> SpikeDetector:
    detector = SpikeDetector(window, k)
    for loss in NOISY[:window]:
        assert detector.observe(loss) is None
    return detector


def test_no_spike_until_the_window_is_full():
    detector = SpikeDetector(window=5, k=3.0)
    for loss in [3.0, 3.1, 2.9, 30.0]:  # a huge jump, but only 3 losses seen so far
        assert detector.observe(loss) is None
    assert list(detector.losses) == [3.0, 3.1, 2.9, 30.0]


def test_a_loss_above_mean_plus_k_std_is_a_spike_and_just_below_is_not():
    detector = filled()
    threshold = statistics.fmean(NOISY) + 3.0 * statistics.pstdev(NOISY)
    assert detector.check(threshold - 1e-9) is None
    spike = detector.check(threshold + 1e-6)
    assert spike is not None and spike.threshold == pytest.approx(threshold)
    assert spike.mean == pytest.approx(3.0) and spike.std == pytest.approx(statistics.pstdev(NOISY))
    assert "rolling mean 3" in spike.describe()


def test_k_sets_how_far_above_the_mean_counts():
    loss = 3.0 + 2.0 * statistics.pstdev(NOISY)  # 2 std devs up
    assert filled(k=1.5).check(loss) is not None
    assert filled(k=3.0).check(loss) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_loss_is_always_a_spike_even_before_the_window_fills(bad):
    detector = SpikeDetector(window=5, k=3.0)
    spike = detector.observe(bad)
    assert spike is not None and "non-finite" in spike.describe()
    assert len(detector.losses) == 0  # never joins the window


def test_a_spike_does_not_join_the_window_but_a_normal_loss_slides_it():
    detector = filled()
    assert detector.observe(50.0) is not None
    assert list(detector.losses) == NOISY
    assert detector.observe(2.8) is None  # below the mean: fine, and the oldest loss leaves
    assert list(detector.losses) == [*NOISY[1:], 2.8]


def test_a_falling_loss_is_never_a_spike():
    detector = SpikeDetector(window=4, k=2.0)
    assert all(detector.observe(10.0 * 0.9**i) is None for i in range(50))


def test_state_round_trips_through_json_and_a_resumed_detector_judges_alike():
    detector = filled()
    state = json.loads(json.dumps(detector.state_dict()))  # plain data, as the client state holds it
    resumed = SpikeDetector(window=5, k=3.0)
    resumed.load_state_dict(state)
    for loss in [3.2, 3.25, 2.7, 9.0]:
        assert (resumed.observe(loss) is None) == (detector.observe(loss) is None)
    assert list(resumed.losses) == list(detector.losses)


def test_a_smaller_window_on_resume_keeps_the_newest_losses():
    resumed = SpikeDetector(window=3, k=3.0)
    resumed.load_state_dict(filled().state_dict())
    assert list(resumed.losses) == NOISY[-3:]


@pytest.mark.parametrize("window,k", [(1, 3.0), (5, 0.0), (5, -1.0)])
def test_bad_settings_are_refused_by_name(window, k):
    with pytest.raises(ValueError, match="window|k"):
        SpikeDetector(window, k)


def test_rollback_budget_counts_scales_the_lr_for_a_while_and_survives_a_resume():
    budget = RollbackBudget(max_rollbacks=2, lr_factor=0.5, lr_steps=3)
    assert budget.lr_scale(0) == 1.0 and not budget.exhausted()
    budget.spend(resumed_step=10)
    assert [budget.lr_scale(s) for s in (10, 11, 12, 13)] == [0.5, 0.5, 0.5, 1.0]
    resumed = RollbackBudget(max_rollbacks=2, lr_factor=0.5, lr_steps=3)
    resumed.load_state_dict(budget.state_dict())
    assert resumed.lr_scale(11) == 0.5 and resumed.rollbacks == 1
    resumed.spend(resumed_step=10)
    assert resumed.exhausted()


def test_events_append_one_line_each_and_read_back_past_a_torn_line(tmp_path):
    record_event(tmp_path, "rollback", 7, "loss 9 > 3.2; back to step 5", resumed_step=5, loss=float("nan"))
    with open(tmp_path / "events.jsonl", "a") as f:
        f.write('{"kind": "resta')  # a crash mid-write
    record_event(tmp_path, "restart", None, "rank group restarted (1 of 1)")
    events = read_events(tmp_path)
    assert [e["kind"] for e in events] == ["rollback", "restart"]
    assert events[0]["loss"] == "nan" and events[0]["resumed_step"] == 5
    assert event_line(events[0]) == "step 7: rollback: loss 9 > 3.2; back to step 5"
    assert event_line(events[1]).startswith("start: restart")
    with pytest.raises(ValueError, match="unknown event kind"):
        record_event(tmp_path, "reboot", 1, "x")
    assert read_events(tmp_path / "none") == []


def test_the_guard_rolls_back_only_when_the_policy_is_on_and_keeps_its_budget_across_a_rollback():
    from types import SimpleNamespace

    from pretrain.spikes import RollBack, SpikeGuard

    def recovery(policy):
        return SimpleNamespace(spike_policy=policy, spike_window=5, spike_k=3.0, max_rollbacks=3,
                               rollback_lr_factor=0.1, rollback_lr_steps=10)

    off = SpikeGuard(recovery("off"))
    off.judge(1, float("nan"))  # off: nothing is judged, nothing raised
    guard = SpikeGuard(recovery("rollback"))
    for step, loss in enumerate(NOISY, 1):
        guard.judge(step, loss)
    saved = guard.state_dict()
    with pytest.raises(RollBack, match=r"^loss spike at step 6 \(loss 9 > 3.2") as info:
        guard.judge(6, 9.0)
    assert info.value.step == 6
    guard.budget.spend(resumed_step=5)
    guard.load_state_dict(saved, rolling_back=True)
    assert guard.budget.rollbacks == 1 and list(guard.detector.losses) == NOISY
    guard.load_state_dict(saved)  # a resume takes the checkpoint's count
    assert guard.budget.rollbacks == 0
    guard.load_state_dict(None)  # an older checkpoint without spike state changes nothing


def test_report_lists_the_timeline_and_marks_rollbacks_and_restarts_on_the_loss_plot(tmp_path):
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.report import _event_marks, write_report

    paths = RunPaths(tmp_path / "run")
    paths.root.mkdir()
    # Steps 5-6 ran, were rolled back to 4 and replayed: the plot keeps each step's newest loss.
    losses = [(1, 5.0), (2, 4.8), (3, 4.6), (4, 4.5), (5, 4.4), (6, 4.3), (5, 4.35), (6, 4.25), (7, 4.2)]
    paths.metrics.write_text("".join(json.dumps({"step": s, "train/loss": v}) + "\n" for s, v in losses))
    record_event(paths.train, "rollback", 6, "loss spike at step 6 | x; rolled back to step 4", resumed_step=4)
    record_event(paths.train, "restart", 4, "rank group restarted by the launcher (1 of 1)")
    record_event(paths.train, "resume", 4, "resumed from step_000004")
    text = write_report(paths).read_text()
    assert _event_marks(read_events(paths.train)) == [(6, "rollback"), (4, "restart")]  # resumes are not marked
    assert (paths.plots / "loss.png").stat().st_size > 0
    assert "- train loss: 7 points, last 4.2 at step 7" in text
    timeline = text.split("Timeline (train/events.jsonl):")[1]
    assert "| 6 | rollback | loss spike at step 6 / x; rolled back to step 4 |" in timeline
    assert timeline.index("| restart |") < timeline.index("| resume |")


def test_events_reach_wandb_as_counts_at_their_step_and_a_summary_list(tmp_path, monkeypatch):
    """A real offline W&B run, read back with W&B's own reader (wandb-core ``leet inspect``)."""
    import subprocess

    from wandb.util import get_core_path

    from pretrain.tracking import Tracker, run_log_files
    from pretrain_pipeline.config import TrackingConfig

    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    tracker = Tracker(TrackingConfig(wandb_mode="offline"), tmp_path)
    run_id = tracker.run_id
    for step in (1, 2, 3):
        tracker.log({"train/loss": 5.0 - step}, step)
    tracker.event(record_event(tmp_path / "train", "rollback", 3, "loss spike at step 3; rolled back to step 2"))
    tracker.skip_wandb_until(4)
    tracker.log({"train/loss": 3.5}, 3)  # the replayed step: metrics.jsonl only
    tracker.log({"train/loss": 1.5}, 4)
    tracker.finish()
    [log_file] = run_log_files(tmp_path / "wandb", run_id)
    out = subprocess.run([get_core_path(), "leet", "inspect", "--no-observability", "--summary", "--json",
                          "--run-file", str(log_file), str(log_file.parent.parent)],
                         capture_output=True, text=True, check=True, timeout=120, stdin=subprocess.DEVNULL)
    summary = json.loads(out.stdout)["summary"]
    assert summary["events"] == ["step 3: rollback: loss spike at step 3; rolled back to step 2"]
    assert summary["events/rollback"] == 1 and summary["train/loss"] == 1.5
    assert [json.loads(x)["train/loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [4, 3, 2, 3.5, 1.5]
