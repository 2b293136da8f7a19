"""Our GPT as a Hugging Face ``transformers`` model: GPT-2 or Llama family, chosen by the config.

- learned positions + LayerNorm + GELU MLP  -> ``GPT2LMHeadModel``: our module names are GPT-2's,
  so the mapping transposes the linear weights (HF GPT-2 uses Conv1D, ``x @ W``) and fills absent
  biases (``bias: false``) with zeros.
- RoPE + RMSNorm + SwiGLU                  -> ``LlamaForCausalLM``: our rope is rotate-half (Llama's
  layout), so the fused ``c_attn`` is split into q/k/v and the rest is a rename. Biases map to
  Llama's ``attention_bias`` / ``mlp_bias``.

Any other mix has no exact transformers counterpart and is refused rather than approximated.
"""

from __future__ import annotations

import torch

from pretrain.model import NORM_EPS, GPT, swiglu_hidden
from pretrain_pipeline.config import ModelConfig

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
FAMILIES = {
    ("learned", "layernorm", "gelu"): "gpt2",
    ("rope", "rmsnorm", "swiglu"): "llama",
}


def hf_family(cfg: ModelConfig) -> str:
    key = (cfg.position, cfg.norm, cfg.mlp)
    if key not in FAMILIES:
        raise NotImplementedError(
            f"no transformers architecture matches position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}; "
            "export supports learned+layernorm+gelu (GPT-2) and rope+rmsnorm+swiglu (Llama)"
        )
    return FAMILIES[key]


def hf_config(model: GPT | ModelConfig, bos_id: int, eos_id: int, pad_id: int, vocab_size: int | None = None):
    """The transformers config of our model (or of a model config plus ``vocab_size``)."""
    c = model.config if isinstance(model, GPT) else model
    vocab_size = vocab_size or model.vocab_size
    special = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=c.tie_embeddings,
                   architectures=[HF_CLASSES[hf_family(c)]])  # written to config.json for AutoModel
    if hf_family(c) == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, n_inner=4 * c.n_embd,
            activation_function="gelu",  # exact erf GELU, as F.gelu in our MLP
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            layer_norm_epsilon=NORM_EPS, **special,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=c.n_embd, intermediate_size=swiglu_hidden(c.n_embd),
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        head_dim=c.n_embd // c.n_head, max_position_embeddings=c.block_size, hidden_act="silu",
        rms_norm_eps=NORM_EPS, rope_theta=c.rope_theta, attention_bias=c.bias, mlp_bias=c.bias,
        attention_dropout=c.dropout, **special,
    )


def _gpt2_tensors(name: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return [(name, value.t().contiguous() if name.endswith(CONV1D) else value)]


def _gpt2_zero_biases(c: ModelConfig) -> dict[str, torch.Tensor]:
    """HF GPT-2 always has biases; ``bias: false`` means they are zero (norms included)."""
    if c.bias:
        return {}
    sizes = {"ln_1.bias": c.n_embd, "ln_2.bias": c.n_embd, "attn.c_attn.bias": 3 * c.n_embd,
             "attn.c_proj.bias": c.n_embd, "mlp.c_fc.bias": 4 * c.n_embd, "mlp.c_proj.bias": c.n_embd}
    out = {f"transformer.h.{i}.{name}": torch.zeros(size) for i in range(c.n_layer) for name, size in sizes.items()}
    out["transformer.ln_f.bias"] = torch.zeros(c.n_embd)
    return out


LLAMA_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_gate": "mlp.gate_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def _llama_tensors(name: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    if name == "transformer.wte.weight":
        return [("model.embed_tokens.weight", value)]
    if name == "transformer.ln_f.weight":
        return [("model.norm.weight", value)]
    if name == "lm_head.weight":
        return [(name, value)]
    if name.startswith("transformer.h."):
        _, _, i, rest = name.split(".", 3)
        prefix = f"model.layers.{i}."
        if rest.startswith("attn.c_attn."):
            # c_attn's output is [q; k; v] along dim 0 (see CausalSelfAttention.split).
            kind = rest.rsplit(".", 1)[1]
            return [(f"{prefix}self_attn.{part}.{kind}", t.clone())  # own memory: saved on their own
                    for part, t in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0))]
        for src, dst in LLAMA_RENAMES.items():
            if rest.startswith(src):
                return [(prefix + dst + rest[len(src):], value)]
    raise KeyError(f"no Llama name for {name}")


def hf_tensors(cfg: ModelConfig, name: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One of our tensors under its transformers name(s): the per-tensor step of the mapping, so
    a writer can stream a checkpoint tensor by tensor. A tied ``lm_head`` maps to nothing."""
    if cfg.tie_embeddings and name == "lm_head.weight":
        return []
    return _gpt2_tensors(name, value) if hf_family(cfg) == "gpt2" else _llama_tensors(name, value)


def hf_extra_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Tensors transformers has and we do not (GPT-2's biases when ``bias: false``)."""
    return _gpt2_zero_biases(cfg) if hf_family(cfg) == "gpt2" else {}
