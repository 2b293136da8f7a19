"""Loader guarantees from issue 4: exact resume on 2 ranks, split stability, refusals, mixtures."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_prep.shards import assign_splits, read_shard_tokens
from pretrain.data import (
    DataIntegrityError,
    MixtureDataset,
    ShardDataset,
    build_mixture,
    build_train_loader,
    load_manifest,
)
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

BLOCK, MB = 16, 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_synthetic_run(root, n_train_docs=200, n_val_docs=30)
    return root


def _ranks(run_dir, seed=7):
    return [ShardDataset(run_dir / "shards", "train", BLOCK, MB, rank=r, world_size=2, seed=seed) for r in range(2)]


def _take(loaders, n):
    """n steps of every rank in lockstep: per step, (epoch, inputs, targets) of each rank."""
    out = []
    for _ in range(n):
        step = []
        for ld in loaders:
            x, y = ld.next_batch()
            step.append((ld.epoch, x, y))
        out.append(step)
    return out


def test_two_rank_exact_resume_mid_epoch_across_epoch_boundary(run_dir):
    steps_per_epoch = _ranks(run_dir)[0].sampler.epoch_length // (2 * MB)
    assert steps_per_epoch >= 4
    total = 2 * steps_per_epoch + 3  # crosses two epoch boundaries
    reference = _take(_ranks(run_dir), total)

    for cut in (1, steps_per_epoch - 1, steps_per_epoch + 2):  # mid-epoch, just before and after a boundary
        interrupted = _ranks(run_dir)
        head = _take(interrupted, cut)
        # What the trainer does: the state goes through the checkpoint's JSON client state.
        states = [json.loads(json.dumps(ld.state_dict())) for ld in interrupted]
        del interrupted
        restored = _ranks(run_dir)
        for ld, st in zip(restored, states):
            ld.load_state_dict(st)
        tail = _take(restored, total - cut)
        for ref, got in zip(reference, head + tail):
            for (e1, x1, y1), (e2, x2, y2) in zip(ref, got):
                assert e1 == e2 and torch.equal(x1, x2) and torch.equal(y1, y2)

    # Within every epoch the two ranks see disjoint samples, each the same number.
    loaders = _ranks(run_dir)
    for _ in range(2):
        seen: list[list[int]] = [[], []]
        for _ in range(steps_per_epoch):
            for ld, ids in zip(loaders, seen):
                ids += ld.sample_indices().tolist()
                ld.next_batch()
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[1]) == steps_per_epoch * MB


def test_resume_on_another_world_size_needs_the_same_global_batch(run_dir):
    state = _ranks(run_dir)[0].state_dict()
    with pytest.raises(ValueError, match="global batch of 8 samples = 4 x 1 x 2 ranks; this run's is 4 samples"):
        ShardDataset(run_dir / "shards", "train", BLOCK, MB, world_size=1).load_state_dict(state)
    one = ShardDataset(run_dir / "shards", "train", BLOCK, MB, world_size=1, grad_accum_steps=2)
    one.load_state_dict(state)  # tests/test_global_cursor.py: it then reads what the two ranks would have


def test_split_is_stable_when_the_corpus_grows():
    rng = random.Random(0)
    ids = [f"doc-{rng.getrandbits(48):012x}" for _ in range(2000)]
    before = assign_splits(ids, seed=1234, val_fraction=0.05)
    grown = ids[:1000] + [f"new-{i}" for i in range(3000)] + ids[1000:]
    after = dict(zip(grown, assign_splits(grown, seed=1234, val_fraction=0.05)))
    assert [after[i] for i in ids] == before  # no existing document changed split
    assert 0.03 < before.count("val") / len(before) < 0.07
    shuffled = ids[::-1]
    assert dict(zip(shuffled, assign_splits(shuffled, 1234, 0.05))) == dict(zip(ids, before))
    assert assign_splits(ids, seed=99, val_fraction=0.05) != before  # the seed matters


def test_corrupted_or_truncated_shard_is_refused_naming_the_file(tmp_path):
    make_synthetic_run(tmp_path, n_train_docs=60, n_val_docs=10)
    shard = tmp_path / "shards" / "train-00000.arrow"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(DataIntegrityError, match=r"train-00000\.arrow.*sha256"):
        ShardDataset(tmp_path / "shards", "train", BLOCK, 2)
    shard.unlink()
    with pytest.raises(DataIntegrityError, match=r"train-00000\.arrow.*missing"):
        ShardDataset(tmp_path / "shards", "train", BLOCK, 2)


def test_a_different_valid_tokenizer_is_refused(tmp_path, run_dir):
    other = tmp_path / "other"
    make_synthetic_run(other, n_train_docs=60, n_val_docs=10, vocab_size=300, seed=1)
    local = tmp_path / "run"
    shutil.copytree(run_dir, local)
    # A perfectly loadable SentencePiece model, just not the one the shards were encoded with.
    shutil.copy(other / "tokenizer" / "tokenizer.model", local / "tokenizer" / "tokenizer.model")
    with pytest.raises(DataIntegrityError, match=r"tokenizer\.model does not match tokenizer_sha256"):
        ShardDataset(local / "shards", "train", BLOCK, MB)


def test_shards_open_with_plain_pyarrow_and_datasets(run_dir):
    import datasets

    manifest = load_manifest(run_dir / "shards")
    path = manifest.shard_paths("train")[0]
    tokens, offsets = read_shard_tokens(path)
    with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
        table = reader.read_all()
    assert table.column("input_ids").type == pa.list_(pa.uint16())
    ds = datasets.Dataset.from_file(str(path))
    assert ds.num_rows == table.num_rows == len(offsets) - 1 == manifest.shard_entries("train")[0]["documents"]
    for i in (0, ds.num_rows - 1):
        doc = tokens[offsets[i] : offsets[i + 1]]
        assert ds[i]["input_ids"] == table.column("input_ids")[i].as_py() == doc.tolist()
        assert doc[-1] == manifest.eos_id
    assert ds[0]["n_bytes"] > 0


# ---------------------------------------------------------------- mixtures


def _mix(sources, weights, rank=0, world=1, seed=3):
    return build_mixture(sources, weights, "train", BLOCK, MB, rank=rank, world_size=world, seed=seed)


def test_mixture_follows_weights_and_reports_them(two_sources):
    mix = _mix(two_sources, {"web": 3, "books": 1})
    for _ in range(2000):
        mix.next_batch()
    real = mix.realised_proportions()
    assert mix.weights == {"books": 0.25, "web": 0.75}
    assert abs(real["web"] - 0.75) < 0.04 and abs(real["books"] - 0.25) < 0.04
    only = _mix(two_sources, {"web": 1, "books": 0})
    assert {only.source_at(k) for k in range(200)} == {"web"}


def test_mixture_resumes_exactly_and_keeps_its_weights(two_sources):
    for rank in range(2):
        ref = _mix(two_sources, {"web": 0.6, "books": 0.4}, rank, 2)
        expected = [ref.next_batch()[0] for _ in range(60)]
        first = _mix(two_sources, {"web": 0.6, "books": 0.4}, rank, 2)
        head = [first.next_batch()[0] for _ in range(25)]
        state = json.loads(json.dumps(first.state_dict()))
        assert state["mixture"] == {"books": 0.4, "web": 0.6}
        again = _mix(two_sources, {"web": 0.6, "books": 0.4}, rank, 2)
        again.load_state_dict(state)
        tail = [again.next_batch()[0] for _ in range(35)]
        assert all(torch.equal(a, b) for a, b in zip(expected, head + tail))
        assert again.counts == ref.counts
    with pytest.raises(ValueError, match="mixture"):
        _mix(two_sources, {"web": 0.5, "books": 0.5}).load_state_dict(state)


def test_mixture_refuses_bad_weights_and_mixed_tokenizers(two_sources, tmp_path):
    with pytest.raises(ValueError, match="must name exactly"):
        _mix(two_sources, {"web": 1})
    other = tmp_path / "code"
    make_synthetic_run(other, n_train_docs=60, n_val_docs=10, vocab_size=300, seed=1)
    with pytest.raises(DataIntegrityError, match="different tokenizers"):
        _mix({**two_sources, "code": other / "shards"}, {"web": 1, "books": 1, "code": 1})


def test_build_train_loader_from_config(two_sources, run_dir):
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import PipelineConfig

    runs_root = run_dir.parent
    web, books = run_dir.name, two_sources["books"].parent.name
    base = {"data": {"sample_corpus": True}, "model": {"block_size": BLOCK}, "train": {"micro_batch_size": MB}}
    cfg = PipelineConfig.model_validate({**base, "runtime": {"runs_root": str(runs_root), "run_name": web}})
    plain = build_train_loader(cfg, RunPaths(run_dir), rank=1, world_size=2)
    assert isinstance(plain, ShardDataset) and plain.rank == 1
    base["train"]["data_mixture"] = {web: 2.0, books: 1.0}
    cfg = PipelineConfig.model_validate({**base, "runtime": {"runs_root": str(runs_root), "run_name": web}})
    mix = build_train_loader(cfg, RunPaths(run_dir), rank=0, world_size=2, verify=True)
    assert isinstance(mix, MixtureDataset) and mix.weights == {books: 1 / 3, web: 2 / 3}
    mix.next_batch()
    assert sum(mix.counts.values()) == 2 * MB  # samples both ranks read in the micro-step
