"""The stage protocol: skip when current, force, temporary outputs renamed into place, record last."""

import pytest

from pretrain_pipeline.artifacts import SUCCESS_FILE, read_json
from pretrain_pipeline.stage import PARTIAL_FINGERPRINT, Stage, completed_record, prepare_run


def _run(stage_dir, config, inputs=("corpus-hash",), force=False, fail=False):
    """A stage writing ``out/value.txt``; returns (outputs written, skipped)."""
    stage = Stage("demo", stage_dir, config, *inputs, force=force)
    if stage.current():
        return None, True
    with stage.outputs(stage_dir / "out") as (tmp,):
        tmp.mkdir()
        (tmp / "value.txt").write_text(str(config))
        if fail:
            raise RuntimeError("compute failed")
    stage.done({"value": config, "skipped": False})
    return (stage_dir / "out" / "value.txt").read_text(), False


def test_a_current_stage_is_skipped_and_a_changed_one_redone(tmp_path):
    assert _run(tmp_path, {"a": 1}) == ("{'a': 1}", False)
    assert _run(tmp_path, {"a": 1}) == (None, True)
    assert _run(tmp_path, {"a": 1}, inputs=("another-corpus",)) == ("{'a': 1}", False)
    assert _run(tmp_path, {"a": 2}, inputs=("another-corpus",)) == ("{'a': 2}", False)


def test_outputs_are_renamed_into_place_then_recorded(tmp_path):
    stage = Stage("demo", tmp_path, {"a": 1}, "corpus-hash")
    with stage.outputs(tmp_path / "out") as (tmp,):
        assert tmp.parent == tmp_path and tmp.name != "out"
        tmp.mkdir()
        (tmp / "value.txt").write_text("new")
        assert not (tmp_path / "out").exists()
    assert (tmp_path / "out" / "value.txt").read_text() == "new" and not tmp.exists()
    assert stage.current() is None  # in place, but not current until recorded
    stage.done({})
    assert stage.current() == {"fingerprint": stage.fingerprint}


def test_force_redoes_a_current_stage(tmp_path):
    _run(tmp_path, {"a": 1})
    assert _run(tmp_path, {"a": 1}, force=True) == ("{'a': 1}", False)


def test_the_record_holds_the_fingerprint_and_summary_but_not_skipped(tmp_path):
    _run(tmp_path, {"a": 1})
    record = read_json(tmp_path / SUCCESS_FILE)
    assert record == {"fingerprint": Stage("demo", tmp_path, {"a": 1}, "corpus-hash").fingerprint, "value": {"a": 1}}
    # The stage name is part of the fingerprint: another stage with the same inputs is not current.
    assert Stage("other", tmp_path, {"a": 1}, "corpus-hash").current() is None


def test_a_failing_stage_leaves_no_record_and_no_half_output(tmp_path):
    with pytest.raises(RuntimeError, match="compute failed"):
        _run(tmp_path, {"a": 1}, fail=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failing_rerun_keeps_the_previous_outputs_and_record(tmp_path):
    _run(tmp_path, {"a": 1})
    with pytest.raises(RuntimeError):
        _run(tmp_path, {"a": 2}, fail=True)
    assert (tmp_path / "out" / "value.txt").read_text() == "{'a': 1}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUCCESS_FILE, "out"]
    assert _run(tmp_path, {"a": 1}) == (None, True)


def test_an_output_not_written_this_time_gets_none(tmp_path):
    stage = Stage("demo", tmp_path, {}, force=False)
    with stage.outputs(tmp_path / "a", None) as (a, b):
        a.write_text("x")
        assert b is None
    assert (tmp_path / "a").read_text() == "x"


def test_a_resumable_output_survives_a_failure_only_for_the_same_fingerprint(tmp_path):
    def attempt(config, fail):
        stage = Stage("demo", tmp_path, config)
        with stage.outputs(tmp_path / "out", resumable=True) as (tmp,):
            found = sorted(p.name for p in tmp.iterdir() if p.name != PARTIAL_FINGERPRINT)
            (tmp / f"part-{len(found)}").write_text("x")
            if fail:
                raise RuntimeError("killed")
        stage.done({})
        return found

    for _ in range(2):
        with pytest.raises(RuntimeError):
            attempt({"a": 1}, fail=True)
    assert attempt({"a": 1}, fail=False) == ["part-0", "part-1"]  # the failed attempts' work is kept
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-0", "part-1", "part-2"]
    with pytest.raises(RuntimeError):
        attempt({"a": 1}, fail=True)
    assert attempt({"a": 2}, fail=False) == []  # another fingerprint starts over
    assert sorted(p.name for p in tmp_path.iterdir()) == [SUCCESS_FILE, "out"]


def test_completed_record_names_the_stage_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="the clean stage has not completed"):
        completed_record(tmp_path / "clean", "clean")
    Stage("clean", tmp_path / "clean", {}).done({"kept": 1})
    assert completed_record(tmp_path / "clean", "clean")["kept"] == 1


def test_prepare_run_writes_the_config_once_and_only_node_0_rewrites_it(tmp_path, monkeypatch):
    from pretrain_pipeline.config import build_config, dump_config

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    raw = {"data": {"sample_corpus": True}, "runtime": {"run_name": "r", "runs_root": str(tmp_path / "runs")}}
    cfg = build_config(raw)
    paths = prepare_run(cfg)
    assert paths.config.read_text() == dump_config(cfg)
    node_1 = build_config(raw, ["train.launch.nnodes=2", "train.launch.node_rank=1"])
    prepare_run(node_1, paths)
    assert paths.config.read_text() == dump_config(cfg)  # node 1 never overwrites node 0's config
    changed = build_config(raw, ["train.max_steps=7"])
    prepare_run(changed, paths)
    assert paths.config.read_text() == dump_config(changed)


def test_forced_stages_expands_all_and_refuses_an_unknown_name():
    from pretrain_pipeline.stages import STAGES, forced_stages

    assert forced_stages(["all"]) == set(STAGES) and forced_stages(["train"]) == {"train"} and forced_stages(()) == set()
    with pytest.raises(ValueError, match="unknown stage.*'trian'"):
        forced_stages(["trian"])
