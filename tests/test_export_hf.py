"""GPT-2 and Llama mappings, greedy generation, ONNX and the converted tokenizer, without training.

Weights are random (perturbed away from init so zero biases and unit norms are not trivially
matched); the trained-checkpoint path is covered by tests/test_export_zero3.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.hf_convert import hf_config, hf_extra_tensors, hf_family, hf_tensors
from pretrain.model import GPT
from pretrain_pipeline.config import ModelConfig, TokenizerConfig

GPT2 = dict(position="learned", norm="layernorm", mlp="gelu")
LLAMA = dict(position="rope", norm="rmsnorm", mlp="swiglu")
VARIANTS = {
    "gpt2": dict(GPT2),
    "gpt2-nobias-untied": dict(GPT2, bias=False, tie_embeddings=False),
    "llama": dict(LLAMA, bias=False, rope_theta=500000.0),
    "llama-bias-untied": dict(LLAMA, bias=True, tie_embeddings=False),
}


def random_model(**kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=48, **kw), vocab_size=300).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights (fp32, CPU) under the transformers names of ``hf_family(model.config)``."""
    out: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        out.update(hf_tensors(model.config, name, value.detach().float().cpu().clone()))
    return {**out, **hf_extra_tensors(model.config)}


def to_hf_model(model: GPT, bos_id: int, eos_id: int, pad_id: int):
    """A transformers model (eval mode, fp32) holding exactly our weights; every weight is checked."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model, bos_id, eos_id, pad_id)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (model.config.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"{hf_family(model.config)} mapping incomplete: missing {missing}, unexpected {unexpected}")
    if model.config.tie_embeddings:
        hf.tie_weights()
    return hf.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_hf_model_matches_our_logits_and_greedy_tokens(variant, tmp_path):
    from transformers import AutoModelForCausalLM

    ours = random_model(**VARIANTS[variant])
    to_hf_model(ours, 1, 2, 3).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("GPT2LMHeadModel" if variant.startswith("gpt2") else "LlamaForCausalLM")
    x = torch.randint(0, 300, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x)[0] - hf(x).logits).abs().max().item()
    assert diff <= 1e-4

    prompt = x[:2, :5]
    mine = ours.generate(prompt, 40, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=3)
    assert theirs.tolist() == mine.tolist()


def test_a_wrong_mapping_is_caught():
    # The check above is sharp enough to see a rope theta that differs from ours.
    ours = random_model(**VARIANTS["llama"])
    hf = to_hf_model(ours, 1, 2, 3)
    shifted = GPT(ours.config.model_copy(update={"rope_theta": 10000.0}), 300).eval()
    shifted.load_state_dict(ours.state_dict())
    x = torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (shifted(x)[0] - hf(x).logits).abs().max() > 1e-4


def test_architectures_without_a_transformers_twin_are_refused():
    with pytest.raises(NotImplementedError, match="position=rope, norm=layernorm"):
        hf_family(ModelConfig(position="rope", norm="layernorm", mlp="gelu"))
    assert hf_family(ModelConfig(**LLAMA)) == "llama" and hf_family(ModelConfig()) == "gpt2"


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_onnx_export_matches_under_onnxruntime(variant, tmp_path):
    from pretrain.onnx_export import check_onnx, export_onnx

    hf = to_hf_model(random_model(**VARIANTS[variant]), 1, 2, 3)
    path = export_onnx(hf, tmp_path / "model.onnx", torch.randint(0, 300, (2, 16)))
    # Other batch and length than traced: the graph is dynamic in both.
    for shape in ((1, 7), (4, 48)):
        x = torch.randint(0, 300, shape, generator=torch.Generator().manual_seed(sum(shape)))
        assert check_onnx(path, hf, x) <= 1e-3


# --- tokenizer on real text ----------------------------------------------------------------


@pytest.fixture(scope="module")
def real_docs(tmp_path_factory) -> list[str]:
    """Docstrings of the installed standard library: real English with code, digits and indentation."""
    from data_prep.sample_corpus import build_sample_corpus

    path = tmp_path_factory.mktemp("corpus") / "sample.jsonl"
    build_sample_corpus(path, max_docs=1500, seed=0)
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pipeline_tokenizer(real_docs, tmp_path_factory) -> Path:
    """A SentencePiece model trained with the pipeline's own trainer settings."""
    import sentencepiece as spm

    from data_prep.tokenizer import trainer_settings

    out = tmp_path_factory.mktemp("tok")
    settings = trainer_settings(TokenizerConfig(vocab_size=2000))
    settings = {k: v for k, v in settings.items() if v != []}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(real_docs[:1000]), model_prefix=str(out / "tokenizer"), num_threads=2,
        minloglevel=2, **settings,
    )
    return out / "tokenizer.model"


def test_autotokenizer_ids_equal_sentencepiece_on_real_text(real_docs, pipeline_tokenizer, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from pretrain.export import build_hf_tokenizer

    build_hf_tokenizer(pipeline_tokenizer, bos="<s>", eos="</s>", unk="<unk>", pad="<pad>").save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(pipeline_tokenizer))
    held_out = real_docs[1000:]
    lines = [line for doc in held_out for line in doc.splitlines() if line.strip()][:400]
    texts = lines + held_out[:100] + ["  two  spaces ", "digits 12345 and ünïcödé → ✓", "tab\there\n\nnewlines"]
    assert len(lines) == 400
    mismatches = [t for t in texts if tok(t, add_special_tokens=False).input_ids != sp.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:3]!r}"
    for t in held_out[:50]:
        assert tok.decode(sp.encode(t)) == sp.decode(sp.encode(t))


SYMBOLS = ["<|endoftext|>", "<|end", "[MASK]"]  # "<|end" a prefix of another: the longest must win


def test_literal_special_tokens_and_user_symbols_tokenize_as_in_sentencepiece(real_docs, tmp_path):
    """SentencePiece spells out a literal `<s>` in text (only its own ids are control tokens) and
    cuts user-defined symbols out of the normalized text; the saved export must do both."""
    import random

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from data_prep.tokenizer import trainer_settings
    from pretrain.export import build_hf_tokenizer

    settings = trainer_settings(TokenizerConfig(vocab_size=2000, user_defined_symbols=SYMBOLS))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(real_docs[:1000]), model_prefix=str(tmp_path / "sp"), num_threads=2, minloglevel=2,
        **{k: v for k, v in settings.items() if v != []},
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    hf_tok = build_hf_tokenizer(tmp_path / "sp.model", bos="<s>", eos="</s>", unk="<unk>", pad="<pad>")
    hf_tok.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["split_special_tokens"] is True
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.split_special_tokens

    literals = ["<s>", "</s>", "<unk>", "<pad>", *SYMBOLS]
    rng = random.Random(0)
    lines = [line for doc in real_docs[1000:] for line in doc.splitlines() if line.strip()][:200]
    texts = [
        "a <s> b</s>c", "<unk> and <pad>", "<s>", " </s> ", "<<s>>", "<|endoftext|>x", "x<|endoftext|> [MASK]  y",
        "  [MASK]  a<|end<|endoftext|>", "[MASK ] <|end of", *literals,
    ]
    for line in lines:  # a literal at a random place (start, middle, end) of each real line
        at = rng.choice([0, len(line) // 2, len(line)])
        texts.append(line[:at] + rng.choice(literals) + line[at:])
    assert [sp.encode(s) for s in SYMBOLS] == [[sp.piece_to_id("\u2581"), sp.piece_to_id(s)] for s in SYMBOLS]
    mismatches = [(t, sp.encode(t), tok(t).input_ids) for t in texts if tok(t).input_ids != sp.encode(t)]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ, e.g. {mismatches[:2]!r}"
    assert all(tok.decode(sp.encode(t)) == sp.decode(sp.encode(t)) for t in texts)
