"""GGUF export: what transformers' GGUF reader rebuilds from our file computes our logits.

Random tiny models (perturbed from init, as in tests/test_export_hf.py) and a real SentencePiece
model with the pipeline's special ids; the trained-checkpoint path through ``export`` is covered
by tests/test_export_zero3.py.
"""

from __future__ import annotations

import pytest
import torch

from pretrain.model import NORM_EPS, GPT, swiglu_hidden
from pretrain_pipeline.config import ModelConfig
from test_export_hf import GPT2, LLAMA  # tests/ is on sys.path (rootdir conftest)

VOCAB = 300  # model rows; the tokenizer has fewer pieces, so the padding rows are exercised
SPM_VOCAB = 290
SPECIAL = dict(bos_id=1, eos_id=2, pad_id=3)


def tiny(block_size: int = 48, **kw) -> GPT:
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=block_size, **kw), vocab_size=VOCAB).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    from synthetic import synthetic_documents, train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("tok"), synthetic_documents(300, seed=0), vocab_size=SPM_VOCAB)


def write(model: GPT, spm_model, path, **kw):
    from pretrain.gguf_export import write_gguf

    return write_gguf(path / "model.gguf", model.config, model.state_dict(), spm_model, name="tiny", **SPECIAL, **kw)


def tokens(seed: int, length: int = 48) -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "variant",
    [dict(LLAMA, bias=False, rope_theta=500000.0), dict(LLAMA, bias=False, tie_embeddings=False, rope_theta=50000.0)],
    ids=["tied", "untied"],
)
def test_llama_gguf_read_by_transformers_gives_our_logits(variant, spm_model, tmp_path):
    from pretrain.gguf_export import check_gguf

    ours = tiny(**variant)
    path = write(ours, spm_model, tmp_path)
    assert check_gguf(path, ours, tokens(1), atol=1e-4) <= 1e-4


def test_f16_gguf_holds_our_matrices_rounded_to_f16(spm_model, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    from pretrain.gguf_export import check_gguf, f16_rounded_

    ours = tiny(**LLAMA, bias=False)
    path = write(ours, spm_model, tmp_path, dtype="f16")
    kinds = {(len(t.shape), t.tensor_type) for t in GGUFReader(path).tensors}
    assert kinds == {(1, GGMLQuantizationType.F32), (2, GGMLQuantizationType.F16)}
    x = tokens(2)
    # Against the f16-rounded weights the check is as sharp as in f32 ...
    assert check_gguf(path, f16_rounded_(tiny(**LLAMA, bias=False)), x, atol=1e-4) <= 1e-4
    # ... and the rounding is real: the unrounded model is measurably different.
    with pytest.raises(RuntimeError, match="disagrees"):
        check_gguf(path, ours, x, atol=1e-6)


def test_gguf_metadata_and_vocabulary_read_back(spm_model, tmp_path):
    import sentencepiece as spm
    from gguf import GGUFReader, TokenType

    ours = tiny(**LLAMA, bias=False, rope_theta=500000.0)
    reader = GGUFReader(write(ours, spm_model, tmp_path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert meta["general.file_type"] == 0  # ALL_F32
    expected = {
        "llama.context_length": 48, "llama.embedding_length": 64, "llama.block_count": 2,
        "llama.feed_forward_length": swiglu_hidden(64), "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 4, "llama.rope.dimension_count": 16, "llama.vocab_size": VOCAB,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": True,
    }
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(NORM_EPS)

    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    pieces, scores, types = (meta[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert len(pieces) == len(scores) == len(types) == VOCAB
    assert pieces[:SPM_VOCAB] == [sp.id_to_piece(i) for i in range(SPM_VOCAB)]
    assert scores[:SPM_VOCAB] == pytest.approx([sp.get_score(i) for i in range(SPM_VOCAB)])

    def kind(i: int) -> TokenType:
        if sp.is_unknown(i):
            return TokenType.UNKNOWN
        if sp.is_control(i):
            return TokenType.CONTROL
        return TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL

    assert types[:SPM_VOCAB] == [kind(i) for i in range(SPM_VOCAB)]
    assert types.count(TokenType.BYTE) == 256
    assert pieces[SPM_VOCAB:] == [f"[PAD{i}]" for i in range(SPM_VOCAB, VOCAB)]
    assert set(types[SPM_VOCAB:]) == {TokenType.UNUSED}

    names = {t.name for t in reader.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_gate.weight"} <= names
    assert len(names) == 2 + 2 * 9


def test_architectures_gguf_cannot_reproduce_are_refused():
    from pretrain.gguf_export import check_gguf_supported

    assert check_gguf_supported(ModelConfig(**LLAMA, bias=False)) == "llama"
    with pytest.raises(NotImplementedError, match="tanh-approximate GELU"):
        check_gguf_supported(ModelConfig(**GPT2))
    with pytest.raises(NotImplementedError, match="bias=true"):
        check_gguf_supported(ModelConfig(**LLAMA, bias=True))
    with pytest.raises(NotImplementedError, match="no transformers architecture"):
        check_gguf_supported(ModelConfig(position="rope", norm="layernorm", mlp="gelu"))


@pytest.mark.parametrize("variant", [dict(GPT2), dict(GPT2, bias=False, tie_embeddings=False)], ids=["bias", "nobias"])
def test_gpt2_gguf_differs_only_by_the_gelu_which_is_why_it_is_refused(variant, spm_model, tmp_path):
    """Written anyway (allow_inexact), a GPT-2 GGUF loads in transformers with the tanh GELU, as
    llama.cpp computes it, and misses our logits; with our exact GELU put back it matches, so the
    mapping is right and the refusal is about the activation alone. (Context 1024: transformers'
    GGUF reader leaves GPT-2's n_positions at its default.)"""
    from transformers import AutoModelForCausalLM

    ours = tiny(block_size=1024, **variant)
    path = write(ours, spm_model, tmp_path, allow_inexact=True)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.activation_function == "gelu_new"
    x = tokens(3)
    with torch.no_grad():
        assert (ours(x)[0] - hf(x).logits).abs().max() > 1e-4
        for block in hf.transformer.h:
            block.mlp.act = torch.nn.GELU()  # exact erf GELU, as in our MLP
        assert (ours(x)[0] - hf(x).logits).abs().max() <= 1e-4
