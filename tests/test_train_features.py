"""Training options of issue 5 and the NaN policy of issue 9, each on the real code path.

Unit tests: the WSD schedule, model presets (parameter counts of published models from a
meta-device build), activation checkpointing through the model, config refusals. Integration
tests launch real DeepSpeed ranks on CPU (gloo) over tiny synthetic shards: activation
checkpointing under ZeRO-3 and torch.compile against an eager run, a 3:1 data mixture of two
sources tokenized by the real stages with one shared tokenizer across a resume, and a run that
diverges (stop) or meets injected NaN losses (skip).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pretrain.engine import lr_at
from pretrain.model import GPT
from pretrain.tracking import losses_by_step, metrics_by_step
from pretrain_pipeline.artifacts import RunPaths, read_json, sha256_file
from pretrain_pipeline.config import ConfigError, ModelConfig, TrainConfig, build_config, merge_tree
from synthetic import make_synthetic_run, synthetic_documents  # tests/ is on sys.path (rootdir conftest)

# ----------------------------------------------------------------------------- unit


def test_wsd_schedule_warms_up_holds_then_decays_to_min_lr():
    tc = TrainConfig(max_steps=100, optimizer={"lr": 1e-3},
                     schedule={"min_lr": 1e-4, "warmup_steps": 10, "kind": "wsd", "decay_fraction": 0.2})
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warmup as for cosine
    assert all(lr == pytest.approx(1e-3) for lr in lrs[10:80])  # stable phase at the peak
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # decay over the last 20 steps
    assert lrs[90] == pytest.approx(1e-4 + 0.5 * 9e-4)  # linear: halfway down at half the decay
    assert lr_at(100, tc) == pytest.approx(1e-4) and lr_at(1000, tc) == pytest.approx(1e-4)

    sqrt = tc.model_copy(update={"schedule": tc.schedule.model_copy(update={"wsd_decay": "1-sqrt"})})
    assert lr_at(90, sqrt) == pytest.approx(1e-4 + (1 - math.sqrt(0.5)) * 9e-4)
    assert lr_at(79, sqrt) == pytest.approx(1e-3) and lr_at(100, sqrt) == pytest.approx(1e-4)
    assert lr_at(90, sqrt) < lr_at(90, tc)  # 1-sqrt drops faster early in the decay


def test_wsd_refuses_warmup_overlapping_the_decay():
    with pytest.raises(ValueError, match="wsd.*exceed max_steps"):
        TrainConfig(max_steps=100, schedule={"kind": "wsd", "warmup_steps": 90, "decay_fraction": 0.2})


# Published totals (tied embeddings, vocab 50257, 1024 positions), as Hugging Face reports them.
GPT2_PARAMS = {"gpt2-124m": 124_439_808, "gpt2-350m": 354_823_168, "gpt2-774m": 774_030_080, "gpt2-1.5b": 1_557_611_200}


@pytest.mark.parametrize("preset", sorted(GPT2_PARAMS))
def test_gpt2_presets_have_the_published_parameter_counts(preset):
    with torch.device("meta"):  # shapes only: no memory for 1.5B parameters
        model = GPT(ModelConfig(preset=preset), 50257)
    assert model.num_params(non_embedding=False) == GPT2_PARAMS[preset]


def test_llama_7b_preset_shape():
    cfg = ModelConfig(preset="llama-7b")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (32, 32, 4096, 4096)
    assert (cfg.norm, cfg.position, cfg.mlp, cfg.bias, cfg.tie_embeddings) == ("rmsnorm", "rope", "swiglu", False, False)
    with torch.device("meta"):
        model = GPT(cfg, 32000)
    # Llama-2-7B has 6,738,415,616; our SwiGLU width rounds 8d/3 to 10944 instead of 11008.
    assert model.num_params(non_embedding=False) == pytest.approx(6_738_415_616, rel=0.005)


def test_explicit_fields_win_over_the_preset():
    cfg = build_config(
        {"data": {"sample_corpus": True}, "model": {"preset": "gpt2-350m", "block_size": 256, "n_layer": 4}}
    ).model
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (4, 16, 1024, 256)
    # The resolved config (what runs write to config.yaml) reloads to the same shape.
    assert ModelConfig.model_validate(cfg.model_dump()) == cfg
    assert ModelConfig(preset="tiny").n_embd == 64 and ModelConfig().n_embd == 768
    with pytest.raises(ConfigError, match="model.preset"):
        build_config({"data": {"sample_corpus": True}, "model": {"preset": "gpt5"}})


@pytest.mark.parametrize("name", ["../other", "a/b", "/abs", "..", "x/../y"])
def test_data_mixture_names_must_be_plain_run_names(name):
    with pytest.raises(ConfigError, match="not a plain run name"):
        build_config({"data": {"sample_corpus": True}, "train": {"data_mixture": {name: 1.0}}})


@pytest.mark.parametrize("variant", [{}, {"norm": "rmsnorm", "position": "rope", "mlp": "swiglu", "bias": False}])
def test_activation_checkpointing_gives_the_same_loss_and_grads(variant, monkeypatch):
    torch.manual_seed(0)
    model = GPT(ModelConfig(preset="tiny", block_size=32, dropout=0.0, **variant), 320).train()
    x, y = torch.randint(0, 320, (4, 32)), torch.randint(0, 320, (4, 32))
    # Count that the Block loop really goes through torch's checkpoint (the real one does the work).
    calls, real = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for checkpointing in (False, True):
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = checkpointing
        calls.clear()
        _, loss = model(x, y)
        loss.backward()
        assert len(calls) == (2 if checkpointing else 0)
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- integration helpers


def make_cfg(paths: RunPaths, **train):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"preset": "tiny", "block_size": 32},
            "train": merge_tree({
                "micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 4, "log_every": 1, "device": "cpu",
                "zero": {"stage": 1}, "launch": {"nproc_per_node": 1}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 0, "kind": "constant"}, "validation": {"every": 1000, "batches": 1},
                "checkpoint": {"every": 1000},
            }, train),
            "tracking": {"wandb_mode": "disabled"},
            "runtime": {"run_name": paths.root.name, "runs_root": str(paths.root.parent)},
        }
    )


@pytest.fixture()
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))


def new_run(tmp_path: Path, name: str) -> RunPaths:
    paths = RunPaths(tmp_path / "runs" / name)
    make_synthetic_run(paths.root)
    return paths


# ----------------------------------------------------------------------------- activation checkpointing, compile


@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory):
    """The same 4 steps on 1 rank: eager and with activation checkpointing under ZeRO-3, and compiled.

    The compiled run uses ZeRO-1, the stage to compile with (under ZeRO-3 dynamo recompiles around
    DeepSpeed's parameter hooks); on one rank the stages differ only in partitioning, not in math.
    """
    import os

    from pretrain.launch import launch_training

    root = tmp_path_factory.mktemp("features")
    old = os.environ.get("PRETRAIN_PIPELINE_STATE")
    os.environ["PRETRAIN_PIPELINE_STATE"] = str(root / "state")
    out = {}
    try:
        for name, extra in {"eager": {}, "ckpt": {"activation_checkpointing": True}, "compiled": {"compile": True, "zero": {"stage": 1}}}.items():
            paths = new_run(root, name)
            lines: list[str] = []
            launch_training(make_cfg(paths, **merge_tree({"zero": {"stage": 3, "keep_stage_on_one_rank": True}}, extra)), paths, log=lines.append)
            out[name] = (paths, lines)
    finally:
        if old is None:
            os.environ.pop("PRETRAIN_PIPELINE_STATE", None)
        else:
            os.environ["PRETRAIN_PIPELINE_STATE"] = old
    return out


@pytest.mark.integration
def test_activation_checkpointing_under_zero3_trains_like_eager(zero3_runs):
    eager, _ = zero3_runs["eager"]
    ckpt, lines = zero3_runs["ckpt"]
    assert any("activation checkpointing" in line for line in lines)
    # ZeRO-3 partitions every parameter (numel 0 on the rank), yet the count stays the model's.
    assert read_json(ckpt.train / "summary.json")["params"] == read_json(zero3_runs["compiled"][0].train / "summary.json")["params"] > 0
    a, b = losses_by_step(eager.metrics), losses_by_step(ckpt.metrics)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4] and a[4] < a[1]
    # Same loss at every step: the recomputed forward gives the same gradients, so the same updates.
    assert b == pytest.approx(a, rel=1e-6)


@pytest.mark.integration
def test_compiled_run_trains_like_eager(zero3_runs):
    eager, _ = zero3_runs["eager"]
    compiled, lines = zero3_runs["compiled"]
    assert any("compiled" in line for line in lines)
    a, c = losses_by_step(eager.metrics), losses_by_step(compiled.metrics)
    assert sorted(c) == [1, 2, 3, 4]
    # Inductor fuses and reorders float ops: close, not bitwise.
    assert c == pytest.approx(a, rel=1e-4)
    # Parameter names stay unprefixed (no _orig_mod.), so eval and export read compiled checkpoints.
    from pretrain.checkpoint import load_consolidated_state_dict

    assert load_consolidated_state_dict(compiled.checkpoints).keys() == load_consolidated_state_dict(eager.checkpoints).keys()


# ----------------------------------------------------------------------------- data mixture


def tokenized_source(tmp_path: Path, name: str, seed: int, n_docs: int, **tokenizer) -> RunPaths:
    """A named source through the real clean and tokenize stages (what the CLI runs) on its own corpus."""
    from pretrain_pipeline import stages

    raw = tmp_path / "raw" / f"{name}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    docs = synthetic_documents(n_docs, seed)
    raw.write_text("".join(json.dumps({"id": f"{name}-{i}", "text": t}) + "\n" for i, t in enumerate(docs)))
    cfg = build_config(
        {
            # The grammar's short, similar sentences are what near-dup and quality rules drop.
            "data": {"inputs": [str(raw)], "language": {"enabled": False}, "gopher_repetition": {"enabled": False},
                     "gopher_quality": {"min_stop_words": 0}, "fineweb": {"enabled": False}, "minhash_dedup": False},
            "tokenizer": {"vocab_size": 320, "val_fraction": 0.1, **tokenizer},
            "runtime": {"run_name": name, "runs_root": str(tmp_path / "runs"), "num_cpus": 2},
        }
    )
    stages.clean(cfg, log=lambda _: None)
    stages.tokenize(cfg, log=lambda _: None)
    return RunPaths(cfg.run_dir())


@pytest.mark.integration
def test_data_mixture_3_to_1_trains_logs_shares_and_survives_resume(ray_cluster, state_dir, tmp_path):
    from pretrain.data import build_train_loader
    from pretrain.launch import launch_training

    # Two corpora, one tokenizer: web trains it, books reuses it (tokenizer.from_run).
    web = tokenized_source(tmp_path, "web", seed=0, n_docs=680)
    books = tokenized_source(tmp_path, "books", seed=5, n_docs=400, from_run="web")
    assert read_json(books.tokenizer / "meta.json")["from_run"]["run"] == "web"
    assert sha256_file(books.tokenizer / "tokenizer.model") == sha256_file(web.tokenizer / "tokenizer.model")
    mix = {"web": 3, "books": 1}
    common = dict(data_mixture=mix, grad_accum_steps=2, checkpoint={"every": 5})
    first = launch_training(make_cfg(web, max_steps=10, **common), web, log=lambda _: None)
    assert first.steps == 10
    lines: list[str] = []
    cfg = make_cfg(web, max_steps=20, **common)
    result = launch_training(cfg, web, log=lines.append)
    assert any("resumed from" in x and "step_000010" in x for x in lines) and result.steps == 20

    # Which source serves micro-batch k is a pure function of (seed, k): recount it independently.
    loader = build_train_loader(cfg, web)
    picks = [loader.source_at(k) for k in range(40)]
    recs = metrics_by_step(web.metrics)
    for step in (10, 20):  # before and after the resume: the counts travelled in the checkpoint
        for name in mix:
            assert recs[step][f"data/share/{name}"] == pytest.approx(picks[: 2 * step].count(name) / (2 * step))
    assert recs[20]["data/share/web"] == pytest.approx(0.75, abs=0.15) and recs[20]["data/share/books"] > 0
    assert result.final_loss < recs[1]["train/loss"] - 0.5


def test_data_mixture_with_a_foreign_tokenizer_is_refused_before_training(tmp_path):
    from pretrain.data import DataIntegrityError, build_train_loader

    web = new_run(tmp_path, "web")
    make_synthetic_run(tmp_path / "runs" / "code", n_train_docs=60, n_val_docs=10, vocab_size=300, seed=1)
    with pytest.raises(DataIntegrityError, match="different tokenizers"):
        build_train_loader(make_cfg(web, data_mixture={"web": 1, "code": 1}), web)


# ----------------------------------------------------------------------------- non-finite loss


@pytest.mark.integration
def test_diverging_run_stops_on_every_rank_and_keeps_the_last_good_checkpoint(state_dir, tmp_path):
    from pretrain.checkpoint import latest_tag, list_tags, load_client_state, load_consolidated_state_dict
    from pretrain.launch import TrainingFailed, launch_training

    paths = new_run(tmp_path, "diverge")
    # One AdamW step at lr 1e30 without clipping moves every weight by ~1e30: the next forward
    # overflows fp32 and the loss is NaN. (Moderately high LRs only saturate the loss on this data.)
    cfg = make_cfg(paths, launch={"nproc_per_node": 2}, optimizer={"lr": 1e30, "grad_clip": 0.0}, max_steps=6,
                   checkpoint={"every": 1, "keep_last": 2})
    with pytest.raises(TrainingFailed) as info:
        launch_training(cfg, paths, log=lambda _: None)
    # The launcher's error names its log; torchrun's failure report fills the tail it quotes.
    assert str(paths.train / "launcher.log") in str(info.value)
    assert "exitcode  : 4" in str(info.value)
    msg = (paths.train / "launcher.log").read_text()
    # torchrun's report: the first rank to finish returned EXIT_NONFINITE; the other one returned it
    # too or was still exiting when torchrun sent SIGTERM (-15). Neither raised.
    import re

    root_cause = msg.split("Root Cause (first observed failure):")[1]
    assert "exitcode  : 4 " in root_cause
    assert set(re.findall(r"exitcode  : (-?\d+)", msg)) <= {"4", "-15"} and "Traceback" not in msg.split("error:")[0]
    assert "[pretrain] error: non-finite loss at step" in msg and "train.recovery.nonfinite_loss=stop" in msg
    bad_step = int(msg.split("non-finite loss at step ")[1].split()[0])
    assert bad_step == 2
    good = f"step_{bad_step - 1:06d}"
    assert f"latest checkpoint {good} is the last good state" in msg
    # Nothing was saved after the bad step: the last good checkpoint is the latest, and it loads.
    assert latest_tag(paths.checkpoints) == good and list_tags(paths.checkpoints)[-1] == good
    assert load_client_state(paths.checkpoints)["step"] == bad_step - 1
    assert load_consolidated_state_dict(paths.checkpoints)
    assert not (paths.train / "summary.json").exists()
    assert all(math.isfinite(v) for v in losses_by_step(paths.metrics).values()) and max(losses_by_step(paths.metrics)) == bad_step - 1


@pytest.mark.integration
def test_skip_drops_nonfinite_micro_batches_on_every_rank_and_finishes(state_dir, tmp_path, monkeypatch):
    from pretrain.faults import FAULT_NONFINITE_ENV
    from pretrain.launch import launch_training

    paths = new_run(tmp_path, "skip")
    # Rank 0 alone sees NaN losses at its micro-batches 3 and 4; rank 1's are finite, so only the
    # all-reduced verdict keeps the two ranks' DeepSpeed accumulation in step (else: a hang).
    monkeypatch.setenv(FAULT_NONFINITE_ENV, "3,4")
    cfg = make_cfg(paths, launch={"nproc_per_node": 2}, zero={"stage": 2}, grad_accum_steps=2, max_steps=6,
                   recovery={"nonfinite_loss": "skip", "max_skipped_batches": 2})
    lines: list[str] = []
    result = launch_training(cfg, paths, log=lines.append)
    assert result.steps == 6 and math.isfinite(result.final_loss)
    recs = metrics_by_step(paths.metrics)
    assert [recs[s]["train/skipped_batches"] for s in range(1, 7)] == [0, 2, 2, 2, 2, 2]
    assert all(math.isfinite(r["train/loss"]) for r in recs.values()) and recs[6]["train/loss"] < recs[1]["train/loss"]
    assert sum("non-finite loss, micro-batch skipped" in x for x in lines) == 2
    # The skipped micro-batches were replaced: 6 steps x 2 good + 2 skipped = 14 drawn per rank.
    from pretrain.checkpoint import load_client_state

    from pretrain.data import ShardDataset

    state = load_client_state(paths.checkpoints)
    walk = ShardDataset(paths.shards, "train", 32, 8, rank=0, world_size=2, seed=cfg.train.seed, grad_accum_steps=2)
    for _ in range(6 * 2 + 2):
        walk.next_batch()
    assert state["skipped_batches"] == 2 and state["data"] == walk.state_dict()


@pytest.mark.integration
def test_skip_stops_once_over_the_cap(state_dir, tmp_path, monkeypatch):
    from pretrain.faults import FAULT_NONFINITE_ENV
    from pretrain.launch import TrainingFailed, launch_training

    from pretrain.checkpoint import latest_tag, load_client_state, load_consolidated_state_dict

    paths = new_run(tmp_path, "cap")
    # Steps 1 and 2 train (micro-batches 0, 1) and are saved; step 3 meets three NaN losses in a row.
    monkeypatch.setenv(FAULT_NONFINITE_ENV, "2,3,4")
    cfg = make_cfg(paths, max_steps=6, recovery={"nonfinite_loss": "skip", "max_skipped_batches": 2},
                   checkpoint={"every": 1})
    with pytest.raises(TrainingFailed, match="exitcode  : 4"):
        launch_training(cfg, paths, log=lambda _: None)
    log = (paths.train / "launcher.log").read_text()
    assert ("non-finite loss at step 3 (micro-batch 1 of 1, lr 0.003); stopped without saving (3 skipped "
            "micro-batches > train.recovery.max_skipped_batches=2); latest checkpoint step_000002 is the last good state") in log
    assert latest_tag(paths.checkpoints) == "step_000002" and load_client_state(paths.checkpoints)["step"] == 2
    # The NaN never reached backward: the saved weights are all finite.
    assert all(torch.isfinite(t).all() for t in load_consolidated_state_dict(paths.checkpoints).values())


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_nan_gradients_with_a_finite_loss_stop_without_saving(state_dir, tmp_path, monkeypatch, zero_stage):
    """A finite loss whose gradients are NaN: without ZeRO our own check drops them before the
    torch optimizer steps; under ZeRO DeepSpeed skips the update itself. Either way the run stops
    (train.recovery.nonfinite_loss: stop) and the last good checkpoint is the latest, with finite weights."""
    from pretrain.checkpoint import latest_tag, load_client_state, load_consolidated_state_dict
    from pretrain.faults import FAULT_NONFINITE_GRAD_ENV
    from pretrain.launch import TrainingFailed, launch_training

    paths = new_run(tmp_path, f"nangrad{zero_stage}")
    monkeypatch.setenv(FAULT_NONFINITE_GRAD_ENV, "2")  # step 3's only micro-batch
    # On one rank fp32 ZeRO-1 runs as ZeRO-0 unless kept (pretrain.engine.effective_zero_stage).
    cfg = make_cfg(paths, zero={"stage": zero_stage, "keep_stage_on_one_rank": True}, max_steps=5,
                   checkpoint={"every": 1, "keep_last": 5})
    with pytest.raises(TrainingFailed, match="exitcode  : 4"):
        launch_training(cfg, paths, log=lambda _: None)
    log = (paths.train / "launcher.log").read_text()
    assert ("non-finite gradients at step 3 (finite loss, lr 0.003); the update was not applied; stopped "
            "without saving (train.recovery.nonfinite_loss=stop); latest checkpoint step_000002 is the last good state") in log
    assert latest_tag(paths.checkpoints) == "step_000002" and load_client_state(paths.checkpoints)["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_consolidated_state_dict(paths.checkpoints).values())
    assert sorted(losses_by_step(paths.metrics)) == [1, 2]


@pytest.mark.integration
def test_nan_gradients_with_a_finite_loss_are_skipped_and_the_weights_stay_finite(state_dir, tmp_path, monkeypatch):
    from pretrain.checkpoint import load_client_state, load_consolidated_state_dict
    from pretrain.faults import FAULT_NONFINITE_GRAD_ENV
    from pretrain.launch import launch_training

    paths = new_run(tmp_path, "nangradskip")
    # Step 2's boundary (micro-batch 3 of 0..3, two per step) has NaN gradients: both of its
    # micro-batches are skipped and step 2 is redone with the next two.
    monkeypatch.setenv(FAULT_NONFINITE_GRAD_ENV, "3")
    # No clipping: the NaN check and train/grad_norm then come from the unclipped total norm.
    cfg = make_cfg(paths, grad_accum_steps=2, max_steps=4, recovery={"nonfinite_loss": "skip", "max_skipped_batches": 2},
                   optimizer={"grad_clip": 0.0})
    lines: list[str] = []
    result = launch_training(cfg, paths, log=lines.append)
    assert result.steps == 4 and math.isfinite(result.final_loss)
    assert [metrics_by_step(paths.metrics)[s]["train/skipped_batches"] for s in range(1, 5)] == [0, 2, 2, 2]
    # ZeRO-0 (what ZeRO-1 runs as on one fp32 rank) clips in our engine, which also reports the norm.
    assert all(0 < metrics_by_step(paths.metrics)[s]["train/grad_norm"] < math.inf for s in range(1, 5))
    assert sum("non-finite gradients, update not applied" in x for x in lines) == 1
    assert load_client_state(paths.checkpoints)["skipped_batches"] == 2
    assert all(torch.isfinite(t).all() for t in load_consolidated_state_dict(paths.checkpoints).values())
