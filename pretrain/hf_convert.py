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


def hf_config(model: GPT, bos_id: int, eos_id: int, pad_id: int):
    c = model.config
    special = dict(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id, tie_word_embeddings=c.tie_embeddings)
    if hf_family(c) == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=model.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
            n_head=c.n_head, n_inner=4 * c.n_embd,
            activation_function="gelu",  # exact erf GELU, as F.gelu in our MLP
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            layer_norm_epsilon=NORM_EPS, **special,
        )
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=model.vocab_size, hidden_size=c.n_embd, intermediate_size=swiglu_hidden(c.n_embd),
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_head,
        head_dim=c.n_embd // c.n_head, max_position_embeddings=c.block_size, hidden_act="silu",
        rms_norm_eps=NORM_EPS, rope_theta=c.rope_theta, attention_bias=c.bias, mlp_bias=c.bias,
        attention_dropout=c.dropout, **special,
    )


def _gpt2_state_dict(model: GPT, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c = model.config
    out = {k: (v.t().contiguous() if k.endswith(CONV1D) else v.clone()) for k, v in ours.items()}
    zeros = {"ln_1.bias": c.n_embd, "ln_2.bias": c.n_embd, "attn.c_attn.bias": 3 * c.n_embd,
             "attn.c_proj.bias": c.n_embd, "mlp.c_fc.bias": 4 * c.n_embd, "mlp.c_proj.bias": c.n_embd}
    for i in range(c.n_layer):
        for name, size in zeros.items():
            out.setdefault(f"transformer.h.{i}.{name}", torch.zeros(size))
    out.setdefault("transformer.ln_f.bias", torch.zeros(c.n_embd))
    return out


LLAMA_RENAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_gate": "mlp.gate_proj",
    "mlp.c_fc": "mlp.up_proj",
    "mlp.c_proj": "mlp.down_proj",
}


def _llama_state_dict(model: GPT, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        if key == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "transformer.ln_f.weight":
            out["model.norm.weight"] = value
        elif key == "lm_head.weight":
            out[key] = value
        elif key.startswith("transformer.h."):
            _, _, i, rest = key.split(".", 3)
            prefix = f"model.layers.{i}."
            if rest.startswith("attn.c_attn."):
                # c_attn's output is [q; k; v] along dim 0 (see CausalSelfAttention.split).
                kind = rest.rsplit(".", 1)[1]
                for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part.clone()
                continue
            for src, dst in LLAMA_RENAMES.items():
                if rest.startswith(src):
                    out[prefix + dst + rest[len(src):]] = value
                    break
            else:
                raise KeyError(f"no Llama name for {key}")
        else:
            raise KeyError(f"no Llama name for {key}")
    return out


def to_hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights (fp32, CPU) under the transformers names of ``hf_family(model.config)``."""
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = _gpt2_state_dict(model, ours) if hf_family(model.config) == "gpt2" else _llama_state_dict(model, ours)
    if model.config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


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
