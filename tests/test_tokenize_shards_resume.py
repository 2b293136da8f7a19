"""Shard writing resumes after a crash: only missing shards are written, the result is identical;
a process pool and Ray write the same shards."""

from __future__ import annotations

import importlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import shards as shards_mod
from data_prep.ray_runtime import process_pool_runner, ray_runner
from data_prep.shards import write_shards
from data_prep.tokenizer import train_tokenizer
from pretrain_pipeline.artifacts import RunPaths, mark_stage_done, read_json, sha256_file
from pretrain_pipeline.config import PipelineConfig


def _docstrings() -> list[str]:
    docs = []
    for name in ["argparse", "collections", "csv", "datetime", "json", "logging", "pathlib", "re",
                 "shutil", "subprocess", "textwrap", "typing", "unittest", "inspect", "difflib"]:
        mod = importlib.import_module(name)
        docs += [d for d in [mod.__doc__, *(getattr(v, "__doc__", None) for v in vars(mod).values())]
                 if isinstance(d, str) and len(d) > 40]
    return list(dict.fromkeys(docs))


def _files(d):
    return {p.name: sha256_file(p) for p in sorted(d.glob("*.arrow"))}


def _tokenized_run(root, docs: list[str]) -> tuple[PipelineConfig, RunPaths]:
    """A clean stage output (as clean.py leaves it), then the real tokenizer stage."""
    paths = RunPaths(root)
    paths.clean.mkdir(parents=True)
    for p in range(3):
        chunk = docs[p::3]
        ids = [f"d{p}-{i:05d}" for i in range(len(chunk))]
        pq.write_table(pa.table({"id": ids, "text": chunk}), paths.clean / f"part-{p:05d}.parquet", row_group_size=40)
    mark_stage_done(paths.clean, "resume-test", {"documents": len(docs)})
    cfg = PipelineConfig.model_validate(
        {"tokenizer": {"vocab_size": 500, "val_fraction": 0.1, "shard_size_mb": 0.02},
         "runtime": {"num_cpus": 2}, "data": {"sample_corpus": True}}
    )
    train_tokenizer(cfg, paths)
    return cfg, paths


def test_process_pool_and_ray_write_the_same_shards(ray_cluster, tmp_path, monkeypatch):
    """The two places encode tasks run (a local pool without Ray, Ray tasks), with documents
    big enough to be cut into pieces: the same bytes, manifest included."""
    docs = _docstrings()
    docs[5] = "\n".join(docs[:200])  # giant: cut into pieces across tasks
    cfg, paths = _tokenized_run(tmp_path / "run", docs)
    monkeypatch.setattr(shards_mod, "MIN_PIECE_BYTES", 8192)
    assert any('"piece"' in item for item in shards_mod.work_items(sorted(paths.clean.glob("*.parquet")), 2))
    outputs = []
    for runner in (process_pool_runner(2, preload=("data_prep.shards",)), ray_runner(cfg.runtime)):
        with runner as r:
            write_shards(cfg, paths, force=True, runner=r)
        outputs.append((_files(paths.shards), (paths.shards / "manifest.json").read_bytes()))
    assert outputs[0] == outputs[1] and len(outputs[0][0]) >= 4


def test_rerun_after_crash_writes_only_missing_shards(ray_cluster, tmp_path, monkeypatch):
    cfg, paths = _tokenized_run(tmp_path / "run", _docstrings())

    write_shards(cfg, paths)
    reference, ref_manifest = _files(paths.shards), read_json(paths.shards / "manifest.json")
    assert len(ref_manifest["splits"]["train"]) >= 4

    # Crash on the 4th shard (after 3 finished ones): the completed shards/ of run 1 stay untouched.
    real_flush, calls = shards_mod.ShardWriter.flush, []

    def crashing_flush(self):
        if self.pending and self.split == "train":
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("injected crash")
        real_flush(self)

    monkeypatch.setattr(shards_mod.ShardWriter, "flush", crashing_flush)
    with pytest.raises(RuntimeError, match="injected crash"):
        write_shards(cfg, paths, force=True)
    monkeypatch.setattr(shards_mod.ShardWriter, "flush", real_flush)
    assert _files(paths.shards) == reference
    work = paths.shards.with_name(".shards.partial")
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in work.glob("*.arrow")}
    assert sorted(finished) == ["train-00000.arrow", "train-00001.arrow", "train-00002.arrow"]
    (work / ".train-00003.arrow.tmp").write_bytes(b"half a shard")  # what a kill -9 mid-write leaves
    # A finished shard damaged after its record was written is rewritten, not trusted.
    (work / "train-00002.arrow").write_bytes(b"garbage")
    del finished["train-00002.arrow"]

    res = write_shards(cfg, paths, force=True)
    assert not res.skipped and not work.exists()
    assert _files(paths.shards) == reference
    assert read_json(paths.shards / "manifest.json") == ref_manifest
    for name, (ino, mtime) in finished.items():  # kept, not rewritten
        st = (paths.shards / name).stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime)
    assert sorted(p.name for p in paths.shards.iterdir() if p.name.startswith(".")) == []
