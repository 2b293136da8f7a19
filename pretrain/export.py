"""The trained model as a Hugging Face model folder: safetensors, tokenizer, model card.

GPT-2 family only for now (learned positions, LayerNorm, GELU MLP): our module names are GPT-2's,
so the mapping is a transpose of the linear weights (HF GPT-2 uses Conv1D, ``x @ W``). The
export is reloaded with ``AutoModelForCausalLM`` and must reproduce our logits before it is kept.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.evaluate import load_model
from pretrain.model import NORM_EPS, GPT
from pretrain_pipeline import __version__
from pretrain_pipeline.artifacts import (
    RunPaths,
    atomic_path,
    fingerprint,
    mark_stage_done,
    read_json,
    read_stage_record,
    sha256_file,
    stage_is_current,
)
from pretrain_pipeline.config import ModelConfig, PipelineConfig

LOGITS_ATOL = 1e-4
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass
class ExportResult:
    hf_dir: str
    checkpoint_tag: str
    max_abs_logit_diff: float
    params: int
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_gpt2_compatible(cfg: ModelConfig) -> None:
    unsupported = {
        "position": (cfg.position, "learned"),
        "norm": (cfg.norm, "layernorm"),
        "mlp": (cfg.mlp, "gelu"),
    }
    bad = {k: v for k, (v, want) in unsupported.items() if v != want}
    if bad:
        raise NotImplementedError(
            f"Hugging Face export supports the GPT-2 family only (learned positions, layernorm, gelu); "
            f"this model has {bad}. A Llama mapping for rope/rmsnorm/swiglu is not written yet."
        )


def gpt2_config(model: GPT, bos_id: int, eos_id: int, pad_id: int):
    from transformers import GPT2Config

    c = model.config
    return GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=4 * c.n_embd,
        activation_function="gelu",  # exact erf GELU, as F.gelu in our MLP
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=NORM_EPS,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=c.tie_embeddings,
    )


def to_gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names; missing biases (``bias: false``) become zeros."""
    c = model.config
    ours = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in ours.items():
        out[key] = value.t().contiguous() if key.endswith(CONV1D) else value.clone()
    zeros = {"ln_1.bias": c.n_embd, "ln_2.bias": c.n_embd, "attn.c_attn.bias": 3 * c.n_embd,
             "attn.c_proj.bias": c.n_embd, "mlp.c_fc.bias": 4 * c.n_embd, "mlp.c_proj.bias": c.n_embd}
    for i in range(c.n_layer):
        for name, size in zeros.items():
            out.setdefault(f"transformer.h.{i}.{name}", torch.zeros(size))
    out.setdefault("transformer.ln_f.bias", torch.zeros(c.n_embd))
    if c.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def build_hf_tokenizer(spm_path: Path, bos: str, eos: str, unk: str, pad: str):
    """A fast tokenizer that splits text exactly as our SentencePiece model does.

    transformers converts the .model file to a BPE ``tokenizers`` graph; we then move the dummy
    prefix and SentencePiece's whitespace clean-up into the normalizer and wrap it in the generic
    fast tokenizer, so ``tokenizer.json`` alone reproduces it (the Llama class would rebuild its own
    pre-tokenizer on load and drop these rules).
    """
    import shutil
    import tempfile

    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, normalizers
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_path.read_bytes())
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        raise NotImplementedError(f"SentencePiece normalization {norm.name!r} is not reproduced in the export")
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(spm_path, Path(tmp) / "tokenizer.model")
        converted = LlamaTokenizer.from_pretrained(tmp, legacy=False, add_bos_token=False, add_eos_token=False)
        backend = copy.deepcopy(converted.backend_tokenizer)
    steps = []
    if norm.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("\u2581"))
    steps.append(normalizers.Replace(" ", "\u2581"))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False,
    )


def model_card(cfg: PipelineConfig, paths: RunPaths, model: GPT, tag: str, manifest, diff: float) -> str:
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, pretrain-pipeline]",
        "---",
        f"# {cfg.runtime.run_name}",
        "",
        f"A GPT-2-style causal language model trained from scratch with pretrain-pipeline {__version__} "
        "(DeepSpeed ZeRO), exported from checkpoint "
        f"`{tag}`. The reloaded export matches the training model's logits within {diff:.2e}.",
        "",
        "## Architecture",
        f"- {model.num_params(non_embedding=False):,} parameters ({model.num_params():,} without position embeddings)",
        f"- {cfg.model.n_layer} layers, {cfg.model.n_head} heads, width {cfg.model.n_embd}, context {cfg.model.block_size}",
        f"- vocabulary {model.vocab_size}, tied embeddings: {cfg.model.tie_embeddings}, biases: {cfg.model.bias}",
        "",
        "## Training",
        "```json",
        json.dumps(cfg.train.model_dump(mode="json"), indent=2, sort_keys=True),
        "```",
    ]
    summary_path = paths.train / "summary.json"
    if summary_path.exists():
        s = read_json(summary_path)
        lines += [f"Trained {s.get('steps')} steps on {s.get('tokens_seen'):,} tokens; final train loss {s.get('final_loss'):.4f}."]
    lines += [
        "",
        "## Data lineage",
        f"- shard manifest sha256: `{sha256_file(manifest.path)}`",
        f"- tokenizer (SentencePiece) sha256: `{manifest.raw['tokenizer_sha256']}`",
        f"- train tokens in manifest: {sum(e['tokens'] for e in manifest.shard_entries('train')):,}",
    ]
    eval_path = paths.eval / "eval.json"
    if eval_path.exists():
        r = read_json(eval_path)["result"]
        lines += [
            "",
            "## Evaluation (held-out split)",
            f"- loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, bits per byte {r['bits_per_byte']:.4f} "
            f"over {r['tokens']:,} tokens (checkpoint `{r['checkpoint_tag']}`)",
        ]
    lines += [
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("path/to/hf")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/hf")',
        "```",
        "Note: the tokenizer does not add BOS/EOS; text that literally contains `<s>`, `</s>`, `<pad>` "
        "or `<unk>` is read as those special tokens, unlike the SentencePiece model used in training.",
        "",
    ]
    return "\n".join(lines)


@torch.no_grad()
def verify_export(hf_dir: Path, model: GPT, sample: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, _ = model(sample)
    theirs = hf(sample).logits
    diff = float((ours - theirs).abs().max())
    if not diff <= LOGITS_ATOL:
        raise RuntimeError(f"exported model disagrees with ours: max |logit diff| {diff:.3e} > {LOGITS_ATOL}")
    return diff


def export(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> ExportResult:
    from transformers import GenerationConfig, GPT2LMHeadModel

    check_gpt2_compatible(cfg.model)
    from pretrain.checkpoint import latest_tag

    tag = latest_tag(paths.checkpoints)
    train_fp = (read_stage_record(paths.train) or {}).get("fingerprint")
    eval_fp = (read_stage_record(paths.eval) or {}).get("fingerprint")
    fp = fingerprint(cfg.export.model_dump(mode="json"), train_fp, eval_fp, tag)
    if not force and stage_is_current(paths.export, fp):
        return ExportResult(**{**(read_stage_record(paths.export) or {})["result"], "skipped": True})

    model, tag, manifest = load_model(cfg, paths, tag)
    hf_model = GPT2LMHeadModel(gpt2_config(model, manifest.bos_id, manifest.eos_id, manifest.pad_id))
    missing, unexpected = hf_model.load_state_dict(to_gpt2_state_dict(model), strict=False)
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GPT-2 mapping incomplete: missing {missing}, unexpected {unexpected}")
    if cfg.model.tie_embeddings:
        hf_model.tie_weights()
    sample = torch.randint(0, model.vocab_size, (2, min(16, cfg.model.block_size)), generator=torch.Generator().manual_seed(0))

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
    special = {
        "bos": sp.id_to_piece(manifest.bos_id),
        "eos": sp.id_to_piece(manifest.eos_id),
        "unk": sp.id_to_piece(sp.unk_id()),
        "pad": sp.id_to_piece(manifest.pad_id),
    }
    hf_dir = paths.export / "hf"
    paths.export.mkdir(parents=True, exist_ok=True)
    with atomic_path(hf_dir) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        GenerationConfig(
            bos_token_id=manifest.bos_id, eos_token_id=manifest.eos_id, pad_token_id=manifest.pad_id,
            do_sample=cfg.eval.temperature > 0, temperature=cfg.eval.temperature or None,
            top_k=cfg.eval.top_k or None, max_new_tokens=cfg.eval.max_new_tokens,
        ).save_pretrained(tmp)
        tok = build_hf_tokenizer(manifest.tokenizer_path, **special)
        tok.model_max_length = cfg.model.block_size
        tok.save_pretrained(tmp)
        # The generic class name loads in transformers 4.x as well as 5.x (which aliases it).
        tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
        diff = verify_export(tmp, model, sample)
        (tmp / "README.md").write_text(model_card(cfg, paths, model, tag, manifest, diff))
    result = ExportResult(
        hf_dir=str(hf_dir), checkpoint_tag=tag, max_abs_logit_diff=diff, params=model.num_params(non_embedding=False)
    )
    mark_stage_done(paths.export, fp, {"result": result.to_dict(), "checkpoint_tag": tag})
    return result
