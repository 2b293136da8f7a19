"""A GPT in one file (after nanoGPT), shaped by ``pretrain_pipeline.config.ModelConfig``.

Module names follow GPT-2's (``transformer.h.0.attn.c_attn`` ...) so the Hugging Face export is a
rename-free mapping. Parallelism lives elsewhere (``pretrain/engine.py``); this is plain PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain_pipeline.config import ModelConfig

NORM_EPS = 1e-5  # GPT-2's layer_norm_epsilon; the export copies it.


def resolve_vocab_size(cfg: ModelConfig, tokenizer_vocab_size: int) -> int:
    """``model.vocab_size`` 0 means the tokenizer's size; a larger value pads the embedding."""
    return cfg.vocab_size or tokenizer_vocab_size


def full_numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ds_numel: DeepSpeed ZeRO-3's unpartitioned size


def swiglu_hidden(n_embd: int) -> int:
    # 2/3 of 4*d keeps the parameter count of the gelu MLP; a multiple of 64 keeps matmuls aligned.
    return 64 * math.ceil(8 * n_embd / 3 / 64)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(cfg.n_embd, eps=NORM_EPS, bias=cfg.bias)


def rope_cache(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate-half convention (as in Llama on the Hugging Face side), so a later Llama export is a copy.
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = torch.cat([cos, cos], dim=-1).to(x.dtype)
    sin = torch.cat([sin, sin], dim=-1).to(x.dtype)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scaled = True
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:
            cos, sin = rope[0][:T], rope[1][:T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        hidden = swiglu_hidden(cfg.n_embd) if self.swiglu else 4 * cfg.n_embd
        self.c_fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        if self.swiglu:
            self.c_gate = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.c_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scaled = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            h = F.silu(self.c_gate(x)) * self.c_fc(x)
        else:
            h = F.gelu(self.c_fc(x))  # exact erf gelu = HF activation_function "gelu"
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = cfg
        self.vocab_size = vocab_size
        self.block_size = cfg.block_size
        self.activation_checkpointing = False
        layers: dict[str, nn.Module] = {"wte": nn.Embedding(vocab_size, cfg.n_embd)}
        if cfg.position == "learned":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        layers["drop"] = nn.Dropout(cfg.dropout)
        layers["h"] = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        layers["ln_f"] = make_norm(cfg)
        self.transformer = nn.ModuleDict(layers)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if cfg.position == "rope":
            cos, sin = rope_cache(cfg.n_embd // cfg.n_head, cfg.block_size, cfg.rope_theta)
            # Not persistent: derived from the config, so checkpoints hold only learned weights.
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 init; projections into the residual stream are scaled so its variance does not
        # grow with depth (2 residual adds per layer).
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual_scaled", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied ones once); position embeddings excluded by default, as in nanoGPT.

        Counts full sizes under ZeRO-3 too, where a partitioned parameter's own ``numel()`` is 0.
        """
        n = sum(full_numel(p) for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= full_numel(self.transformer.wpe.weight)
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the matmuls plus attention scores (PaLM appendix B)."""
        cfg = self.config
        return 6 * self.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.block_size}")
        x = self.transformer.wte(idx)
        rope = None
        if "wpe" in self.transformer:
            x = x + self.transformer.wpe(torch.arange(T, device=idx.device))
        else:
            rope = (self.rope_cos, self.rope_sin)
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Append up to ``max_new_tokens`` to ``idx`` (B, T); temperature 0 is greedy."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size :])
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return idx
