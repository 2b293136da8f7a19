"""Our model as one GGUF file (llama.cpp's format), written with the ``gguf`` package.

Tensors go through the Hugging Face mapping (``pretrain/hf_convert.py``) and then the ``gguf``
package's own HF -> GGUF name table, the route llama.cpp's ``convert_hf_to_gguf.py`` takes, so the
names are the ones llama.cpp loads. Two layout rules of that converter apply:

- Llama q/k projections: HF (and our model) rotate dims ``(i, i + d/2)`` of each head together;
  llama.cpp's rope rotates ``(2i, 2i + 1)``, the original Meta layout. The rows of each head are
  interleaved back (the inverse of the permutation in transformers' ``convert_llama_weights_to_hf``),
  and transformers' GGUF reader undoes it again on load.
- GPT-2: llama.cpp stores ``nn.Linear``-shaped weights (out, in), which is what we hold.

Only the Llama family is exported (``check_gguf_supported``): GGUF's gpt2 graph uses the tanh GELU.

The file is streamed: tensor infos are planned from shapes alone (meta tensors), then each tensor
is built from the consolidated checkpoint, written and dropped, so memory holds one tensor at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.hf_convert import hf_extra_tensors, hf_family, hf_tensors
from pretrain.model import NORM_EPS, swiglu_hidden
from pretrain_pipeline.config import ModelConfig

PAD_SCORE = -1000.0  # llama.cpp's score for padding pieces past the tokenizer's vocabulary


def check_gguf_supported(cfg: ModelConfig) -> str:
    """The GGUF architecture for ``cfg``, or a clear refusal: we only write what can be checked to
    give our logits (through transformers' GGUF reader) and what llama.cpp computes the same way."""
    family = hf_family(cfg)
    if family == "gpt2":
        raise NotImplementedError(
            "GGUF export of the GPT-2 family is not supported: llama.cpp's gpt2 graph and transformers' GGUF "
            "reader (GPT2Config activation_function='gelu_new') use the tanh-approximate GELU, our MLP uses the "
            "exact erf GELU, so the GGUF model would not compute our logits. Use the Llama family "
            "(position=rope, norm=rmsnorm, mlp=swiglu) or set export.gguf: false"
        )
    if cfg.bias:
        raise NotImplementedError(
            "GGUF export of a Llama-family model with bias=true is not supported: transformers' GGUF reader has "
            "no attention_bias/mlp_bias for llama and would drop the biases, so the export cannot be checked; "
            "set model.bias: false or export.gguf: false"
        )
    return "llama"


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows of each head -> interleaved (Meta/llama.cpp) rows: new row ``2i + j``
    of a head is old row ``j * d/2 + i``. Works for weights (rows, in) and biases (rows,)."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, state: Mapping[str, Any], meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, fp32 tensor) for every tensor of the file, one checkpoint tensor built at a time.
    ``meta=True`` yields shape-only tensors (for planning the header) and reads nothing."""
    import gguf

    arch = {"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[hf_family(cfg)]
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    done: set[int] = set()

    def mapped(hf_items):
        for hf_name, t in hf_items:
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise KeyError(f"no GGUF name for {hf_name}")
            if hf_family(cfg) == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
                t = permute_rope_rows(t, cfg.n_head)
            yield gguf_name, t

    for name, value in state.items():
        if id(value) in done:  # a tied weight appears once
            continue
        done.add(id(value))
        t = torch.empty(tuple(value.shape), device="meta") if meta else value.contiguous().detach().float()
        if hf_family(cfg) == "llama":
            yield from mapped(hf_tensors(cfg, name, t))
        elif not (cfg.tie_embeddings and name == "lm_head.weight"):
            yield from mapped([(name, t)])  # our GPT-2 names are HF's, in llama.cpp's (out, in) layout
        del t
    extra = hf_extra_tensors(cfg)
    yield from mapped((k, v.to("meta") if meta else v) for k, v in extra.items())


def sentencepiece_vocab(spm_path: Path, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types as llama.cpp's "llama" (SentencePiece) tokenizer reads them;
    SentencePiece's piece types are numbered as GGUF's token types. Model rows past the
    tokenizer's vocabulary become unused ``[PADi]`` pieces."""
    import gguf
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    if len(proto.pieces) > vocab_size:
        raise ValueError(f"{spm_path} has {len(proto.pieces)} pieces, more than the model's {vocab_size} rows")
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(PAD_SCORE)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def write_gguf(
    path: Path, cfg: ModelConfig, state: Mapping[str, Any], spm_path: Path, *, name: str, bos_id: int,
    eos_id: int, pad_id: int, dtype: str = "f32", allow_inexact: bool = False,
) -> Path:
    """Write ``path`` from a (lazy) consolidated state dict. ``dtype`` "f16" stores matrices in
    half precision and 1-D tensors (norms) in fp32, as llama.cpp's MOSTLY_F16 files do.
    ``allow_inexact`` skips the architecture check (only to show why it exists)."""
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    arch = gguf.MODEL_ARCH_NAMES[{"llama": gguf.MODEL_ARCH.LLAMA, "gpt2": gguf.MODEL_ARCH.GPT2}[hf_family(cfg)]]
    if not allow_inexact:
        check_gguf_supported(cfg)
    vocab_size = int(state["transformer.wte.weight"].shape[0])
    matrix_dtype = {"f32": np.float32, "f16": np.float16}[dtype]
    file_type = gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16

    w = gguf.GGUFWriter(None, arch)
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head)
    if arch == "llama":
        w.add_feed_forward_length(swiglu_hidden(cfg.n_embd))
        w.add_vocab_size(vocab_size)
        w.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(NORM_EPS)
    else:
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_layer_norm_eps(NORM_EPS)

    tokens, scores, types = sentencepiece_vocab(spm_path, vocab_size)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(spm_path).read_bytes())
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    w.add_unk_token_id(spm.SentencePieceProcessor(model_file=str(spm_path)).unk_id())
    w.add_pad_token_id(pad_id)
    # Our tokenizer adds neither BOS nor EOS (documents end in EOS in the shards).
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)

    def as_numpy(t: torch.Tensor) -> np.dtype:
        return np.dtype(matrix_dtype if t.dim() >= 2 else np.float32)

    for gguf_name, t in gguf_tensors(cfg, state, meta=True):
        np_dtype = as_numpy(t)
        w.add_tensor_info(gguf_name, tuple(t.shape), np_dtype, t.numel() * np_dtype.itemsize)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, t in gguf_tensors(cfg, state):
            w.write_tensor_data(t.numpy().astype(as_numpy(t), copy=False))
    finally:
        w.close()
    return path


def f16_rounded_(model: torch.nn.Module) -> torch.nn.Module:
    """Round ``model``'s matrices to fp16 in place: what an f16 GGUF holds, for an exact check."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    return model


@torch.no_grad()
def check_gguf(gguf_path: Path, model: torch.nn.Module, sample: torch.Tensor, atol: float) -> float:
    """Load the file with transformers' GGUF reader and compare its logits with ``model``'s."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    diff = float((model(sample)[0] - hf(sample).logits).abs().max())
    if not diff <= atol:
        raise RuntimeError(f"{gguf_path} disagrees with our model: max |logit diff| {diff:.3e} > {atol}")
    return diff
