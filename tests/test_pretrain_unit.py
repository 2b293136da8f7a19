"""Fast tests of pretrain/: model, loader, schedule, checksums, export mapping. No launcher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pretrain.checkpoint import latest_tag, list_tags, prune_checkpoints
from pretrain.data import DataIntegrityError, ShardDataset, TokenStream, load_manifest
from pretrain.engine import deepspeed_config, lr_at, param_groups
from pretrain.model import GPT
from pretrain_pipeline.config import ModelConfig, TrainConfig
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, **kw})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_synthetic_run(root, n_train_docs=300, n_val_docs=40)
    return root


# ---------------------------------------------------------------- model


@pytest.mark.parametrize(
    "variant",
    [{}, {"bias": False, "tie_embeddings": False}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}],
)
def test_forward_shapes_loss_and_causality(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant), vocab_size=100).eval()
    idx = torch.randint(0, 100, (3, 16))
    logits, loss = model(idx, torch.randint(0, 100, (3, 16)))
    assert logits.shape == (3, 16, 100)
    assert abs(loss.item() - math.log(100)) < 0.3  # init predicts ~uniformly
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 100
    assert torch.allclose(model(changed)[0][:, :10], logits[:, :10], atol=1e-6)
    assert not torch.allclose(model(changed)[0][:, 10:], logits[:, 10:])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("variant", [{}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu"}])
def test_model_learns_a_batch(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant), vocab_size=50)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 50, (4, 17))
    first = None
    for _ in range(30):
        _, loss = model(x[:, :-1], x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first - 1.0


def test_param_count_formula_and_flops():
    d, L, V, T = 32, 2, 100, 16
    model = GPT(tiny(), vocab_size=V)
    per_layer = 12 * d * d + 13 * d  # qkv+proj+mlp weights and biases, two layernorms
    assert model.num_params() == V * d + L * per_layer + 2 * d
    assert model.num_params(non_embedding=False) == model.num_params() + T * d
    untied = GPT(tiny(tie_embeddings=False), vocab_size=V)
    assert untied.num_params() == model.num_params() + V * d
    assert model.flops_per_token() == 6 * model.num_params() + 12 * L * d * T


def test_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=128, block_size=16), vocab_size=64)
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / math.sqrt(16)) < 0.001


def test_generate_greedy_is_deterministic_and_sampling_uses_generator():
    torch.manual_seed(0)
    model = GPT(tiny(), vocab_size=60).eval()
    prompt = torch.tensor([[5, 6, 7]])
    a = model.generate(prompt, 20, temperature=0)
    b = model.generate(prompt, 20, temperature=0)
    assert a.shape == (1, 23) and torch.equal(a, b)
    s1 = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(1))
    s2 = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1, s2)


# ---------------------------------------------------------------- optimisation


def test_lr_schedule():
    tc = TrainConfig(max_steps=110, optimizer={"lr": 1e-3}, schedule={"min_lr": 1e-4, "warmup_steps": 10})
    lrs = [lr_at(s, tc) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(110, tc) == pytest.approx(1e-4) and lr_at(500, tc) == pytest.approx(1e-4)
    assert lr_at(60, tc) == pytest.approx(5.5e-4)  # halfway down the cosine
    assert lr_at(50, TrainConfig(optimizer={"lr": 1e-3}, schedule={"warmup_steps": 0, "kind": "constant"})) == 1e-3


def test_weight_decay_groups():
    model = GPT(tiny(), vocab_size=100)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"])
    assert any(p is model.transformer.wte.weight for p in no_decay["params"])
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == model.num_params(non_embedding=False)  # tied weight counted once


def test_deepspeed_config():
    tc = TrainConfig(zero={"stage": 3, "offload_optimizer": True, "offload_param": True}, precision="bf16",
                     micro_batch_size=4, grad_accum_steps=3, optimizer={"grad_clip": 0.5})
    ds = deepspeed_config(tc, world_size=2)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and "fp16" not in ds
    assert ds["zero_force_ds_cpu_optimizer"] is False and ds["gradient_clipping"] == 0.5
    assert "bf16" not in deepspeed_config(TrainConfig(), 1)


def test_deepspeed_config_reduction_knobs():
    # ZeRO-1 reduces whole gradients after backward (no per-parameter hook and bucket copies);
    # ZeRO-2/3 keep contiguous buckets for their partitioned gradients.
    keep = {"keep_stage_on_one_rank": True}
    for world in (1, 2):
        assert deepspeed_config(TrainConfig(zero={"stage": 1, **keep}), world)["zero_optimization"]["contiguous_gradients"] is False
        for stage in (2, 3):
            assert deepspeed_config(TrainConfig(zero={"stage": stage, **keep}), world)["zero_optimization"]["contiguous_gradients"] is True
    # One rank: "sum" skips the division by 1.0 (same gradients); more ranks average; ZeRO-3 refuses "sum".
    assert deepspeed_config(TrainConfig(zero={"stage": 1, **keep}), 1)["gradient_allreduce_op"] == "sum"
    assert deepspeed_config(TrainConfig(zero={"stage": 2}, precision="bf16"), 1)["gradient_allreduce_op"] == "sum"
    assert deepspeed_config(TrainConfig(zero={"stage": 2, **keep}), 1)["gradient_allreduce_op"] == "sum"
    assert "gradient_allreduce_op" not in deepspeed_config(TrainConfig(zero={"stage": 1}), 2)
    assert "gradient_allreduce_op" not in deepspeed_config(TrainConfig(zero={"stage": 3, **keep}), 1)
    assert "gradient_allreduce_op" not in deepspeed_config(TrainConfig(zero={"stage": 0}), 1)


def test_zero_on_one_rank_runs_as_zero0_in_fp32_and_zero1_in_bf16_unless_offloading_or_kept():
    from pretrain.engine import clips_in_engine, effective_zero_stage, zero_stage_note

    def ds(world, **train):
        return deepspeed_config(TrainConfig(**train), world)

    def stage(world, **train):
        return ds(world, **train)["zero_optimization"]["stage"]

    for configured in (1, 2, 3):
        assert stage(1, zero={"stage": configured}) == 0 == effective_zero_stage(TrainConfig(zero={"stage": configured}), 1)
        assert stage(1, zero={"stage": configured}, precision="bf16") == 1
        assert stage(2, zero={"stage": configured}) == configured
        assert stage(1, zero={"stage": configured, "keep_stage_on_one_rank": True}) == configured
        assert stage(1, zero={"stage": configured, "offload_optimizer": True}) == configured
        assert zero_stage_note(TrainConfig(zero={"stage": configured}), 1).startswith(f"{configured} (runs as 0")
    assert zero_stage_note(TrainConfig(zero={"stage": 3}, precision="fp16"), 1).startswith("3 (runs as 1")
    assert stage(1, zero={"stage": 3, "offload_param": True}) == 3
    assert stage(1, zero={"stage": 0}) == 0 and zero_stage_note(TrainConfig(zero={"stage": 0}), 1) == "0"
    assert zero_stage_note(TrainConfig(zero={"stage": 3}), 2) == "3"
    # ZeRO-0 in fp32 clips in our engine (torch's clip_grad_norm_, whose norm is also the metric),
    # so DeepSpeed's own clip is off; every other case leaves clipping to DeepSpeed.
    assert clips_in_engine(TrainConfig(zero={"stage": 1}), 1) and ds(1, zero={"stage": 1}, optimizer={"grad_clip": 0.7})["gradient_clipping"] == 0
    assert clips_in_engine(TrainConfig(zero={"stage": 0}), 2) and ds(2, zero={"stage": 0}, optimizer={"grad_clip": 0.7})["gradient_clipping"] == 0
    for world, train in ((2, {"zero": {"stage": 1}}), (1, {"zero": {"stage": 1}, "precision": "bf16"}),
                         (1, {"zero": {"stage": 0}, "precision": "bf16"}),
                         (1, {"zero": {"stage": 3, "keep_stage_on_one_rank": True}})):
        assert not clips_in_engine(TrainConfig(**train), world)
        assert ds(world, optimizer={"grad_clip": 0.7}, **train)["gradient_clipping"] == 0.7


# ---------------------------------------------------------------- data


def test_batches_are_shifted_windows(run_dir):
    ds = ShardDataset(run_dir / "shards", "train", block_size=16, micro_batch_size=4, seed=3)
    idx = ds.sample_indices().copy()
    x, y = ds.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    flat = np.concatenate([ds.stream.parts[0], ds.stream.parts[1]])
    assert np.array_equal(x[0].numpy(), flat[idx[0] * 16 : idx[0] * 16 + 16])


def test_token_stream_spans_shards(run_dir):
    m = load_manifest(run_dir / "shards")
    stream = TokenStream(m.shard_paths("train"))
    flat = np.concatenate(stream.parts)
    cut = len(stream.parts[0])
    assert np.array_equal(stream.slice(cut - 5, cut + 7), flat[cut - 5 : cut + 7])
    assert len(stream) == sum(e["tokens"] for e in m.shard_entries("train"))
    with pytest.raises(IndexError):
        stream.slice(len(stream) - 2, len(stream) + 1)


def test_loader_deterministic_disjoint_and_resumable(run_dir):
    def make(rank=0, world=1, seed=5):
        return ShardDataset(run_dir / "shards", "train", 16, 4, rank=rank, world_size=world, seed=seed, verify=False)

    a, b = make(), make()
    assert all(torch.equal(a.next_batch()[0], b.next_batch()[0]) for _ in range(5))
    assert not torch.equal(make(seed=6).next_batch()[0], make(seed=5).next_batch()[0])

    ranks = [make(r, 3) for r in range(3)]
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(ranks[0].sampler.epoch_length // 12):  # one epoch of micro-steps of 4 x 3 ranks
        for r, s in zip(ranks, seen):
            s.update(r.sample_indices().tolist())
            r.next_batch()
    assert all(len(s) == ranks[0].sampler.epoch_length // 3 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])

    # Resume mid-epoch and across an epoch boundary.
    for warm in (3, ranks[0].samples_per_rank // 4 + 2):
        first = make(1, 2)
        for _ in range(warm):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))
        expected = [first.next_batch()[0] for _ in range(first.samples_per_rank // 4 + 3)]
        resumed = make(1, 2)
        resumed.load_state_dict(state)
        got = [resumed.next_batch()[0] for _ in range(len(expected))]
        assert all(torch.equal(e, g) for e, g in zip(expected, got))
    assert first.epoch >= 1  # the walk did cross an epoch
    with pytest.raises(ValueError, match="global batch of 8 samples"):
        make(0, 3).load_state_dict(state)


def test_epochs_reshuffle(run_dir):
    ds = ShardDataset(run_dir / "shards", "train", 16, 4, seed=0, verify=False)
    e0 = ds.sampler.permutation(0).copy()
    for _ in range(ds.samples_per_rank // 4 + 1):
        ds.next_batch()
    assert ds.epoch == 1 and not np.array_equal(ds.sampler.permutation(1), e0)


def test_too_little_data_is_refused(run_dir):
    with pytest.raises(ValueError, match="need at least"):
        ShardDataset(run_dir / "shards", "val", block_size=2048, micro_batch_size=8, verify=False)


def test_checksum_mismatch_is_refused(tmp_path):
    make_synthetic_run(tmp_path, n_train_docs=60, n_val_docs=10)
    ShardDataset(tmp_path / "shards", "train", 16, 2)  # intact: accepted
    shard = tmp_path / "shards" / "train-00001.arrow"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataIntegrityError, match="train-00001.arrow"):
        ShardDataset(tmp_path / "shards", "train", 16, 2)
    ShardDataset(tmp_path / "shards", "val", 16, 2)  # val shards are still fine
    tok = tmp_path / "tokenizer" / "tokenizer.model"
    tok.write_bytes(tok.read_bytes() + b"\0")
    with pytest.raises(DataIntegrityError, match="tokenizer"):
        ShardDataset(tmp_path / "shards", "val", 16, 2)


# ---------------------------------------------------------------- eval, checkpoints, export pieces


def test_bits_per_byte_counts_the_text_bytes(run_dir):
    import sentencepiece as spm

    from pretrain.evaluate import scored_bytes, token_byte_lengths

    m = load_manifest(run_dir / "shards")
    sp = spm.SentencePieceProcessor(model_file=str(m.tokenizer_path))
    tokens = np.concatenate(TokenStream(m.shard_paths("val")).parts).astype(np.int64)
    prev = np.concatenate([[m.eos_id], tokens[:-1]])
    counted = scored_bytes(tokens, prev, token_byte_lengths(sp), m.eos_id, sp)
    assert counted == sum(e["text_bytes"] for e in m.shard_entries("val"))


def test_prune_keeps_newest(tmp_path):
    from pretrain.checkpoint import write_completion_record

    for step in (5, 10, 15, 20):
        (tmp_path / f"step_{step:06d}").mkdir()
        (tmp_path / f"step_{step:06d}" / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
        write_completion_record(tmp_path / f"step_{step:06d}")
    (tmp_path / "step_000007").mkdir()  # an interrupted save older than the newest complete tag
    (tmp_path / "step_000025").mkdir()  # one newer: a save still running (or killed) is left alone
    (tmp_path / "latest").write_text("step_000020")
    assert prune_checkpoints(tmp_path, keep=2) == ["step_000005", "step_000007", "step_000010"]
    assert list_tags(tmp_path) == ["step_000015", "step_000020"]
    assert latest_tag(tmp_path) == "step_000020"


@pytest.mark.parametrize("variant", [{}, {"bias": False, "tie_embeddings": False}])
def test_gpt2_mapping_reproduces_logits(tmp_path, variant):
    from transformers import GPT2LMHeadModel

    from pretrain.export import verify_export
    from pretrain.hf_convert import hf_config
    from test_export_hf import to_hf_state_dict  # tests/ is on sys.path (rootdir conftest)

    torch.manual_seed(0)
    model = GPT(tiny(**variant), vocab_size=80).eval()
    hf = GPT2LMHeadModel(hf_config(model, 1, 2, 3))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    hf.tie_weights()
    hf.save_pretrained(tmp_path / "ok")
    sample = torch.randint(0, 80, (2, 16))
    assert verify_export(tmp_path / "ok", model, sample) < 1e-4
    # A mapping that forgets the Conv1D transpose (square here, so it loads) must be caught.
    bad = to_hf_state_dict(model)
    bad["transformer.h.0.attn.c_proj.weight"] = model.transformer.h[0].attn.c_proj.weight.detach().clone()
    hf.load_state_dict(bad, strict=False)
    hf.save_pretrained(tmp_path / "bad")
    with pytest.raises(RuntimeError, match="disagrees"):
        verify_export(tmp_path / "bad", model, sample)


def test_export_refuses_models_no_transformers_class_matches():
    from pretrain.hf_convert import hf_family

    assert hf_family(tiny()) == "gpt2"
    assert hf_family(tiny(position="rope", norm="rmsnorm", mlp="swiglu")) == "llama"
    with pytest.raises(NotImplementedError, match="rope"):
        hf_family(tiny(position="rope"))


def test_hf_tokenizer_matches_sentencepiece(run_dir, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pretrain.export import build_hf_tokenizer
    from synthetic import synthetic_documents

    path = run_dir / "tokenizer" / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    build_hf_tokenizer(path, "<s>", "</s>", "<unk>", "<pad>").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    lines = synthetic_documents(20, seed=99) + [
        "", "  two  spaces  ", "trailing ", " lead", "a\nb \n c", "tabs\tand ünïcödé 日本語 123!", "x" * 50,
    ]
    for line in lines:
        assert tok.encode(line, add_special_tokens=True) == sp.encode(line), line
        assert tok.decode(sp.encode(line)) == sp.decode(sp.encode(line))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 3)


def test_deepspeed_config_zero3_host_work():
    # ZeRO-3: a transformer block is one leaf module (hooks and gathers per block, not per Linear);
    # reduce-scatter only where there is something to scatter (more than one rank).
    from deepspeed.utils import get_z3_leaf_modules, set_z3_leaf_modules

    from pretrain.model import Block

    for world in (1, 2):
        zero = deepspeed_config(TrainConfig(zero={"stage": 3, "keep_stage_on_one_rank": True}), world)["zero_optimization"]
        assert zero["leaf_module"]["classes"] == [f"{Block.__module__}.{Block.__qualname__}"]
        assert zero.get("reduce_scatter", True) is (world > 1)
        for stage in (0, 1, 2):
            other = deepspeed_config(TrainConfig(zero={"stage": stage}), world)["zero_optimization"]
            assert "leaf_module" not in other and "reduce_scatter" not in other
    model = GPT(tiny(), vocab_size=64)
    set_z3_leaf_modules(model, zero["leaf_module"]["classes"])  # the class name resolves to the model's blocks
    assert get_z3_leaf_modules(model) == list(model.transformer.h)


def test_a_checkpoint_of_another_stage_or_ranks_needs_conversion(tmp_path):
    from pretrain.checkpoint import zero_stages_of
    from pretrain.reshard import needs_conversion

    recorded = {"zero_stage": 1, "world_size": 2, "rng": [{}, {}]}
    assert not needs_conversion(recorded, 1, 2)
    assert needs_conversion(recorded, 1, 4) and needs_conversion(recorded, 0, 2) and needs_conversion(recorded, 3, 2)
    assert not needs_conversion({"zero_stage": 0, "world_size": 1}, 0, 2)  # ZeRO-0 state is whole
    # Older checkpoints: the stage is read off the files, the world size off the per-rank RNG states.
    layouts = {
        "zero0": (["mp_rank_00_model_states.pt"], [0]),
        "zero1": (["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], [1, 2]),
        "zero3": (["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"], [3]),
    }
    for name, (files, stages) in layouts.items():
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_bytes(b"")
        assert zero_stages_of(tmp_path / name) == stages
    legacy = {"rng": [{}], "zero_stages_from_files": [1, 2]}
    assert not needs_conversion(legacy, 1, 1) and not needs_conversion(legacy, 2, 1)  # one layout
    assert needs_conversion(legacy, 0, 1) and needs_conversion(legacy, 1, 2)
    assert not needs_conversion({"rng": [{}]}, 0, 1)  # nothing known: DeepSpeed decides


def test_loss_faults_corrupt_only_the_micro_batches_rank_0_is_told_to(monkeypatch):
    from pretrain.faults import FAULT_NONFINITE_ENV, FAULT_NONFINITE_GRAD_ENV, LossFaults

    monkeypatch.setenv(FAULT_NONFINITE_ENV, "1")
    monkeypatch.setenv(FAULT_NONFINITE_GRAD_ENV, "2")
    weight = torch.ones(3, requires_grad=True)
    other_rank = LossFaults(rank=1)
    assert all(torch.isfinite(other_rank.apply((weight * 2).sum())) for _ in range(4))
    faults = LossFaults(rank=0)
    losses = [faults.apply((weight * 2).sum()) for _ in range(4)]
    assert [bool(torch.isfinite(loss)) for loss in losses] == [True, False, True, True]
    losses[3].backward()  # an untouched micro-batch: finite gradients
    assert torch.equal(weight.grad, torch.full((3,), 2.0))
    weight.grad = None
    losses[2].backward()  # finite loss, NaN gradients
    assert torch.isnan(weight.grad).all()
