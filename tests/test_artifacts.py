"""Atomic writes and stage completion records."""

import pytest

from pretrain_pipeline.artifacts import (
    atomic_path,
    atomic_write_json,
    fingerprint,
    mark_stage_done,
    read_json,
    stage_is_current,
)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_path_keeps_old_output_when_writer_fails(tmp_path):
    target = tmp_path / "out"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "f").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "f").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "f").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stage_record_matches_only_its_fingerprint(tmp_path):
    fp = fingerprint({"a": 1}, "input-hash")
    assert not stage_is_current(tmp_path, fp)
    mark_stage_done(tmp_path, fp, {"kept": 3})
    assert stage_is_current(tmp_path, fp)
    assert not stage_is_current(tmp_path, fingerprint({"a": 2}, "input-hash"))
    (tmp_path / "_SUCCESS.json").write_text("{truncated")
    assert not stage_is_current(tmp_path, fp)


def test_leftovers_of_a_killed_writer_are_removed(tmp_path):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "half-written").write_text("x")
    with atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
