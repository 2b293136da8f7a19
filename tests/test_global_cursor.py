"""The global sample cursor of issue 23: the same samples at every step on any number of ranks.

Pure loader tests on small synthetic shards (no training): optimizer step k reads the same global
batch on 1, 2 and 4 ranks when micro_batch_size x grad_accum_steps x ranks is the same; a state
saved on 2 ranks continues on 1 (and on 4) with no sample skipped or read twice, for a mixture
too; skipped ranges are never served; another global batch is refused naming the numbers, and so
is a new cluster shape that no gradient accumulation fits.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pretrain.data import ShardDataset, build_mixture, build_train_loader
from pretrain.global_batch import BatchLayout, GlobalBatchRefused, keep_global_batch
from pretrain.sampler import merge_ranges, sample_digest, served_positions
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

BLOCK = 16
# The same 16-sample global batch as micro_batch_size x grad_accum_steps x ranks.
LAYOUTS = [(4, 4, 1), (4, 2, 2), (4, 1, 4), (8, 2, 1), (2, 2, 4)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_synthetic_run(root, n_train_docs=200, n_val_docs=30)
    return root


def ranks(run_dir, mb, accum, world, seed=7):
    return [ShardDataset(run_dir / "shards", "train", BLOCK, mb, rank=r, world_size=world, seed=seed,
                         verify=False, grad_accum_steps=accum) for r in range(world)]


def mixture_ranks(sources, mb, accum, world, weights=None, seed=3):
    weights = weights or {"web": 0.6, "books": 0.4}
    return [build_mixture(sources, weights, "train", BLOCK, mb, rank=r, world_size=world, seed=seed, verify=False,
                          grad_accum_steps=accum) for r in range(world)]


def take_steps(loaders, accum, steps):
    """Per optimizer step: (sorted global ids the step read, sorted token rows all ranks read)."""
    loaders[0].recording = True
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(accum):
            for loader in loaders:  # every rank draws one micro-batch per micro-step, in lockstep
                x, _ = loader.next_batch()
                rows += [tuple(r) for r in x.tolist()]
        out.append((sorted(loaders[0].take_consumed().tolist()), sorted(rows)))
    return out


def roundtrip(state):
    """What the trainer does: the state goes through the checkpoint's client state."""
    return json.loads(json.dumps(state))


# ---------------------------------------------------------------- the same samples on any world size


def test_same_global_batch_reads_the_same_samples_on_1_2_4_ranks(run_dir):
    steps_per_epoch = ranks(run_dir, 4, 4, 1)[0].sampler.epoch_length // 16
    steps = 2 * steps_per_epoch + 3  # across two epoch boundaries
    runs = {layout: take_steps(ranks(run_dir, *layout), layout[1], steps) for layout in LAYOUTS}
    reference = runs[LAYOUTS[0]]
    for layout, got in runs.items():
        assert got == reference, layout
    # Each step reads a whole 16-sample global batch, and one epoch reads no sample twice.
    assert all(len(ids) == 16 == len(set(ids)) for ids, _ in reference)
    first_epoch = [i for ids, _ in reference[:steps_per_epoch] for i in ids]
    assert len(first_epoch) == len(set(first_epoch)) == steps_per_epoch * 16
    # Step k is perm[k*G : (k+1)*G] of the epoch's seeded permutation.
    perm = np.random.default_rng([7, 0]).permutation(ranks(run_dir, 4, 4, 1)[0].num_samples)
    assert reference[1][0] == sorted(perm[16:32].tolist())
    # The ranks of a micro-step read disjoint parts of it.
    a, b = ranks(run_dir, 4, 2, 2)
    assert not set(a.sample_indices().tolist()) & set(b.sample_indices().tolist())


@pytest.mark.parametrize("before, after", [((4, 2, 2), (4, 4, 1)), ((4, 2, 2), (4, 1, 4)), ((8, 2, 1), (2, 2, 4))])
def test_state_saved_on_one_world_size_continues_on_another(run_dir, before, after):
    steps_per_epoch = ranks(run_dir, 4, 4, 1)[0].sampler.epoch_length // 16
    total = steps_per_epoch + 4
    reference = take_steps(ranks(run_dir, *before), before[1], total)
    for cut in (3, steps_per_epoch - 1, steps_per_epoch + 1):  # mid-epoch, at and past a boundary
        first = ranks(run_dir, *before)
        head = take_steps(first, before[1], cut)
        states = [roundtrip(loader.state_dict()) for loader in first]
        assert all(s == states[0] for s in states)  # the walk is global: every rank saves the same state
        resumed = ranks(run_dir, *after)
        for loader in resumed:
            loader.load_state_dict(states[0])
        tail = take_steps(resumed, after[1], total - cut)
        # The same samples at every step: none skipped, none read twice across the change.
        assert head + tail == reference, cut


def test_mixture_reads_the_same_samples_on_any_world_size_and_across_a_resume(two_sources):
    steps = 30
    runs = {layout: take_steps(mixture_ranks(two_sources, *layout), layout[1], steps) for layout in LAYOUTS[:3]}
    reference = runs[LAYOUTS[0]]
    assert all(got == reference for got in runs.values())
    sources_read = {i >> 40 for ids, _ in reference for i in ids}
    assert sources_read == {0, 1}  # both sources served
    # Saved on 2 ranks after 11 steps, continued on 1 and on 4.
    first = mixture_ranks(two_sources, 4, 2, 2)
    head = take_steps(first, 2, 11)
    state = roundtrip(first[0].state_dict())
    for layout in ((4, 4, 1), (4, 1, 4)):
        resumed = mixture_ranks(two_sources, *layout)
        for loader in resumed:
            loader.load_state_dict(state)
        assert head + take_steps(resumed, layout[1], steps - 11) == reference, layout
    # No source sample read twice within its epoch.
    ids = [i for step, _ in reference for i in step]
    assert len(ids) == len(set(ids))


def test_mixture_source_choice_is_a_pure_function_of_seed_and_chunk(two_sources):
    one = mixture_ranks(two_sources, 4, 4, 1)[0]
    four = mixture_ranks(two_sources, 4, 1, 4)
    assert [one.source_at(k) for k in range(50)] == [four[2].source_at(k) for k in range(50)]
    take_steps(four, 1, 10)
    real = four[0].realised_proportions()
    # 40 chunks of 4 samples: the shares count the chunks each source got.
    picks = [one.source_at(k) for k in range(40)]
    assert real == {n: picks.count(n) / 40 for n in ("books", "web")}


# ---------------------------------------------------------------- skipped ranges


def test_skipped_ranges_are_never_served_and_travel_in_the_state(run_dir):
    reference = take_steps(ranks(run_dir, 4, 2, 2), 2, 8)
    loaders = ranks(run_dir, 4, 2, 2)
    head = take_steps(loaders, 2, 2)
    assert head == reference[:2] and loaders[0].position == 32
    # A rollback after step 4 went wrong: skip what steps 3 and 4 read (positions 32..63).
    for loader in loaders:
        loader.skip(32, 64)
    state = roundtrip(loaders[0].state_dict())
    assert state["skipped"] == [[32, 64]]
    resumed = ranks(run_dir, 4, 4, 1)  # and continue on one rank
    resumed[0].load_state_dict(state)
    tail = take_steps(resumed, 4, 4)
    assert tail == reference[4:8]  # steps 3 and 4's samples never come back
    window = {i for ids, _ in reference[2:4] for i in ids}
    assert not window & {i for ids, _ in tail for i in ids}


def test_an_unaligned_skip_shifts_the_walk_by_exactly_its_positions(run_dir):
    loader = ranks(run_dir, 4, 1, 1)[0]
    loader.skip(5, 7)
    loader.skip(6, 9)  # overlapping ranges merge
    assert loader.sampler.skipped == [(5, 9)]
    loader.recording = True
    for _ in range(3):
        loader.next_batch()
    served = loader.take_consumed()
    assert served.tolist() == loader.sampler.ids_at(np.r_[0:5, 9:16]).tolist()
    assert served_positions(0, 6, [(2, 3), (4, 6)]).tolist() == [0, 1, 3, 6, 7, 8]
    assert merge_ranges([[10, 12], [0, 2], [2, 5]]) == [(0, 5), (10, 12)]
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        loader.skip(9, 9)


def test_mixture_skip_uses_up_the_window_unseen(two_sources):
    reference = take_steps(mixture_ranks(two_sources, 4, 2, 2), 2, 8)
    loaders = mixture_ranks(two_sources, 4, 2, 2)
    take_steps(loaders, 2, 2)
    for loader in loaders:
        loader.skip(32, 64)
    state = roundtrip(loaders[0].state_dict())
    resumed = mixture_ranks(two_sources, 4, 4, 1)
    resumed[0].load_state_dict(state)
    assert take_steps(resumed, 4, 4) == reference[4:8]


# ---------------------------------------------------------------- refusals


def test_another_global_batch_is_refused_naming_the_numbers(run_dir, two_sources):
    state = ranks(run_dir, 4, 4, 2)[0].state_dict()
    with pytest.raises(ValueError, match=r"global batch of 32 samples = 4 x 4 x 2 ranks; this run's is "
                                         r"16 samples = 4 x 4 x 1 rank\..*= 32"):
        ranks(run_dir, 4, 4, 1)[0].load_state_dict(state)
    mixed = mixture_ranks(two_sources, 4, 2, 2)[0].state_dict()
    with pytest.raises(ValueError, match="global batch of 16 samples = 4 x 2 x 2 ranks; this run's is 8 samples"):
        mixture_ranks(two_sources, 4, 1, 2)[0].load_state_dict(mixed)
    per_rank = {"mixture": mixed["mixture"], "step": 3, "seed": 3, "counts": mixed["counts"], "sources": {}}
    with pytest.raises(ValueError, match="saved by the per-rank loader"):
        mixture_ranks(two_sources, 4, 2, 2)[0].load_state_dict(per_rank)


def test_state_of_the_per_rank_walk_continues_where_it_was(run_dir):
    # Rank r of w read perm[r::w]: after 3 micro-batches of 4 on 2 ranks, the first 24 positions.
    loader = ranks(run_dir, 4, 1, 1)[0]
    loader.load_state_dict({"epoch": 0, "cursor": 12, "seed": 7, "world_size": 2})
    assert loader.position == 24 and loader.epoch == 0
    perm = np.random.default_rng([7, 0]).permutation(loader.num_samples)
    assert loader.sample_indices().tolist() == perm[24:28].tolist()


def test_keep_global_batch_changes_accumulation_or_refuses_with_the_nearest_settings():
    saved = BatchLayout(micro_batch_size=8, grad_accum_steps=4, world_size=2)
    assert keep_global_batch(saved, 8, 1) == BatchLayout(8, 8, 1)
    assert keep_global_batch(saved, 4, 4) == BatchLayout(4, 4, 4)
    assert keep_global_batch(saved, 8, 8).grad_accum_steps == 1
    with pytest.raises(GlobalBatchRefused) as refused:
        keep_global_batch(saved, 8, 3)
    assert str(refused.value) == (
        "global batch 64 samples = 8 x 4 x 2 ranks (micro_batch_size x grad_accum_steps x ranks); on 3 ranks with "
        "micro_batch_size 8 no grad_accum_steps fits (64 is not a multiple of 8 x 3 = 24): "
        "use 2 ranks (grad_accum_steps 4), or 4 ranks (grad_accum_steps 2)"
    )
    with pytest.raises(GlobalBatchRefused, match=r"use 8 ranks \(grad_accum_steps 1\), or micro_batch_size 4 "
                                                 r"with grad_accum_steps 1 on 16 ranks"):
        keep_global_batch(saved, 8, 16)


def test_build_train_loader_takes_the_global_batch_from_the_config(run_dir):
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import PipelineConfig

    cfg = PipelineConfig.model_validate({
        "data": {"sample_corpus": True}, "model": {"block_size": BLOCK},
        "train": {"micro_batch_size": 4, "grad_accum_steps": 3},
        "runtime": {"runs_root": str(run_dir.parent), "run_name": run_dir.name},
    })
    loader = build_train_loader(cfg, RunPaths(run_dir), rank=1, world_size=2)
    assert loader.layout == BatchLayout(4, 3, 2) and loader.state_dict()["global_batch"] == 24


def test_sample_digest_names_the_set():
    digest = sample_digest
    assert digest(np.array([3, 1, 2])) == digest(np.array([1, 2, 3])) != digest(np.array([1, 2, 4]))
    assert 0 <= sample_digest(np.arange(10)) < 2**48


# ---------------------------------------------------------------- through the launcher


MIXTURE = {"web": 0.6, "books": 0.4}


def launch_cfg(paths, **train):
    from pretrain_pipeline.config import merge_tree
    from synthetic import synthetic_run_config

    return synthetic_run_config(paths.root, merge_tree({
        "micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 6, "log_every": 1, "device": "cpu",
        "precision": "fp32", "zero": {"stage": 0}, "launch": {"nproc_per_node": 1},
        "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
        "validation": {"every": 100, "batches": 1}, "checkpoint": {"every": 3}, "data_mixture": MIXTURE,
    }, train))


@pytest.mark.integration
def test_mixture_resumed_on_two_ranks_keeps_the_global_batch_and_reads_the_same_samples(tmp_path, monkeypatch):
    """A two-source train.data_mixture on 1 rank x accumulation 2, resumed on 2 ranks: the launch picks
    accumulation 1, and every later step reads the uninterrupted run's samples (hashes of the global
    ids, which name the source) with its loss (fp32, ZeRO-0 resumes anywhere)."""
    from pretrain.checkpoint import load_client_state
    from pretrain.launch import launch_training
    from pretrain.tracking import losses_by_step, metrics_by_step
    from pretrain.trainer import SAMPLE_HASH_ENV
    from pretrain_pipeline.artifacts import RunPaths, read_json

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    monkeypatch.setenv(SAMPLE_HASH_ENV, "1")
    straight, moved = RunPaths(tmp_path / "runs" / "straight"), RunPaths(tmp_path / "runs" / "moved")
    make_synthetic_run(straight.root)
    for copy in (moved.root, *(tmp_path / "runs" / source for source in MIXTURE)):  # one tokenizer, as a mixture needs
        shutil.copytree(straight.root, copy)
    launch_training(launch_cfg(straight), straight, log=lambda _: None)
    launch_training(launch_cfg(moved, max_steps=3), moved, log=lambda _: None)
    # 3 ranks: 8 samples = 4 x 2 x 1 rank fits no accumulation; refused before any process starts.
    before = (moved.train / "launcher.log").read_text()
    refusal = (r"global batch 8 samples = 4 x 2 x 1 rank .*on 3 ranks with micro_batch_size 4 no "
               r"grad_accum_steps fits .*use 2 ranks \(grad_accum_steps 1\)")
    with pytest.raises(ValueError, match=refusal):
        launch_training(launch_cfg(moved, launch={"nproc_per_node": 3}), moved, log=lambda _: None)
    assert (moved.train / "launcher.log").read_text() == before
    lines: list[str] = []
    launch_training(launch_cfg(moved, launch={"nproc_per_node": 2}), moved, log=lines.append)
    assert any("resuming step_000003 written with a global batch of 8 samples = 4 x 2 x 1 rank: grad_accum_steps 1 "
               "keeps it on 2 rank(s) (8 samples = 4 x 1 x 2 ranks; configured 2)" in x for x in lines)
    assert "grad_accum_steps: 1" in moved.config.read_text()  # what the ranks ran with
    assert read_json(moved.train / "summary.json")["world_size"] == 2
    hashes = {p: {s: r["data/sample_hash"] for s, r in metrics_by_step(p.metrics, "data/sample_hash").items()}
              for p in (straight, moved)}
    assert sorted(hashes[moved]) == list(range(1, 7)) and hashes[moved] == hashes[straight]
    data = load_client_state(moved.checkpoints)["data"]
    assert data["mixture"] == MIXTURE and min(data["counts"].values()) > 0  # both sources were read
    assert len(set(hashes[straight].values())) == 6
    expected, got = losses_by_step(straight.metrics), losses_by_step(moved.metrics)
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-4)
