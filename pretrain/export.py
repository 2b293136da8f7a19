"""The trained model as a Hugging Face model folder: safetensors, tokenizer, model card, ONNX, GGUF.

The architecture (GPT-2 or Llama family) follows the model config (``pretrain/hf_convert.py``).
The consolidated checkpoint is streamed into safetensors shards (and the optional GGUF file,
``pretrain/gguf_export.py``) one tensor at a time. The export is reloaded with
``AutoModelForCausalLM`` and must reproduce our logits before it is kept; the ONNX graph must
reproduce the HF logits under onnxruntime, the GGUF file ours through transformers' GGUF reader.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.evaluate import load_model
from pretrain.hf_convert import hf_config, hf_extra_tensors, hf_family, hf_tensors
from pretrain.model import GPT
from pretrain_pipeline import __version__
from pretrain_pipeline.artifacts import RunPaths, naming_file, read_json, read_stage_record, sha256_file
from pretrain_pipeline.config import ModelConfig, PipelineConfig
from pretrain_pipeline.errors import MissingInput
from pretrain_pipeline.stage import Stage

LOGITS_ATOL = 1e-4


@dataclass
class ExportResult:
    hf_dir: str
    checkpoint_tag: str
    max_abs_logit_diff: float
    params: int
    family: str = ""
    onnx_path: str | None = None
    onnx_max_abs_logit_diff: float | None = None
    gguf_path: str | None = None
    gguf_max_abs_logit_diff: float | None = None
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_hf_tokenizer(spm_path: Path, bos: str, eos: str, unk: str, pad: str):
    """A fast tokenizer that splits text exactly as our SentencePiece model does.

    transformers converts the .model file to a BPE ``tokenizers`` graph; we then move the dummy
    prefix and SentencePiece's whitespace clean-up into the normalizer and wrap it in the generic
    fast tokenizer, so ``tokenizer.json`` alone reproduces it (the Llama class would rebuild its own
    pre-tokenizer on load and drop these rules).

    Text is text, as in SentencePiece: a literal ``<s>`` or ``</s>`` is spelled out, never read as
    the control token (``split_special_tokens``, saved in tokenizer_config.json). User-defined
    symbols are cut out of the *normalized* string, as SentencePiece does, rather than as added
    tokens, which ``tokenizers`` splits off before normalizing (each piece after one would get a
    dummy prefix of its own).
    """
    import re
    import shutil
    import tempfile

    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
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
    symbols = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    if symbols:
        graph = json.loads(backend.to_str())
        graph["added_tokens"] = [t for t in graph["added_tokens"] if t["special"]]
        # A segment that is a whole vocabulary entry (a symbol) maps to it; there are no merges to build one.
        graph["model"]["ignore_merges"] = True
        backend = Tokenizer.from_str(json.dumps(graph))
        longest_first = sorted(symbols, key=len, reverse=True)  # SentencePiece matches the longest symbol
        backend.pre_tokenizer = pre_tokenizers.Split(
            Regex("|".join(re.escape(s) for s in longest_first)), behavior="isolated"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad,
        add_bos_token=False, add_eos_token=False, clean_up_tokenization_spaces=False, split_special_tokens=True,
    )


def _lineage(paths: RunPaths, manifest) -> list[str]:
    """Where the weights came from: corpus cleaning counts, tokenizer and shard hashes."""
    lines = [
        f"- shard manifest sha256: `{sha256_file(manifest.path)}`",
        f"- tokenizer (SentencePiece) sha256: `{manifest.raw['tokenizer_sha256']}`",
    ]
    for split in ("train", "val"):
        entries = manifest.shard_entries(split)
        lines.append(
            f"- {split}: {sum(e['tokens'] for e in entries):,} tokens, "
            f"{sum(e.get('documents', 0) for e in entries):,} documents in {len(entries)} shards"
        )
    clean = read_stage_record(paths.clean) or {}
    if "kept" in clean:
        lines.append(
            f"- cleaning: {clean.get('docs_in', '?'):,} documents read, {clean['kept']:,} kept, "
            f"dropped {clean.get('dropped', {})}, {clean.get('quarantined', 0):,} quarantined"
        )
    return lines


def model_card(
    cfg: PipelineConfig, paths: RunPaths, model: GPT, tag: str, manifest, diff: float, onnx_diff: float | None = None,
    gguf_diff: float | None = None,
) -> str:
    family = hf_family(cfg.model)
    c = cfg.model
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [{family}, pretrain-pipeline]",
        "---",
        f"# {cfg.runtime.run_name}",
        "",
        f"A {family}-architecture causal language model trained from scratch with pretrain-pipeline "
        f"{__version__} (DeepSpeed ZeRO-{cfg.train.zero.stage}), exported from checkpoint `{tag}`. "
        f"The reloaded export matches the training model's logits within {diff:.2e} (fp32).",
        "",
        "## Architecture",
        f"- transformers class: `{'GPT2LMHeadModel' if family == 'gpt2' else 'LlamaForCausalLM'}`",
        f"- {model.num_params(non_embedding=False):,} parameters ({model.num_params():,} without position embeddings)",
        f"- {c.n_layer} layers, {c.n_head} heads, width {c.n_embd}, context {c.block_size}",
        f"- positions {c.position}, norm {c.norm}, MLP {c.mlp}, biases {c.bias}, tied embeddings {c.tie_embeddings}",
        f"- vocabulary {model.vocab_size}",
        f"- model config sha256: `{cfg.model.fingerprint()}`",
        "",
        "## Training",
        "```json",
        json.dumps(cfg.train.model_dump(mode="json"), indent=2, sort_keys=True),
        "```",
    ]
    summary_path = paths.train / "summary.json"
    if summary_path.exists():
        s = read_json(summary_path)
        lines += [f"Trained {s.get('steps')} steps on {s.get('tokens_seen', 0):,} tokens; final train loss {s.get('final_loss'):.4f}."]
    lines += ["", "## Data lineage", *_lineage(paths, manifest)]
    eval_path = paths.eval / "eval.json"
    if eval_path.exists():
        saved = read_json(eval_path)
        r = saved["result"]
        lines += [
            "",
            "## Evaluation (held-out split)",
            f"- loss {r['loss']:.4f}, perplexity {r['perplexity']:.2f}, bits per byte {r['bits_per_byte']:.4f} "
            f"over {r['tokens']:,} tokens (checkpoint `{r['checkpoint_tag']}`)",
        ]
        if saved.get("checkpoint_sha256"):
            lines.append(f"- evaluated checkpoint sha256: `{saved['checkpoint_sha256']}`")
        for task, metrics in (r.get("lm_eval") or {}).items():
            lines.append(f"- lm-eval `{task}`: " + ", ".join(f"{name} {v:.4g}" for name, v in metrics.items()))
    if onnx_diff is not None:
        lines += ["", "## ONNX", f"`model.onnx` (input `input_ids`, output `logits`, no KV cache) matches the "
                  f"transformers model within {onnx_diff:.2e} under onnxruntime."]
    if gguf_diff is not None:
        lines += ["", "## GGUF", f"`../gguf/model.gguf` ({cfg.export.gguf_dtype}, llama.cpp's `llama` architecture, "
                  f"SentencePiece vocabulary) read back by transformers' GGUF loader matches our logits within "
                  f"{gguf_diff:.2e}" + (" (against our weights rounded to f16)." if cfg.export.gguf_dtype == "f16" else ".")]
    lines += [
        "",
        "## Use",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tok = AutoTokenizer.from_pretrained("path/to/hf")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/hf")',
        "```",
        "Note: the tokenizer does not add BOS/EOS, and text that literally contains `<s>`, `</s>`, `<pad>` "
        "or `<unk>` is spelled out as characters, as the SentencePiece model used in training does "
        "(`split_special_tokens: true` in tokenizer_config.json). Training documents each follow an EOS "
        "token: start a prompt with it (id `eos_token_id`) to match.",
        "",
    ]
    return "\n".join(lines)


def write_hf_weights(state: Mapping[str, Any], model_cfg: ModelConfig, out_dir: Path, max_shard_size: str) -> list[str]:
    """Stream a (lazy) consolidated state dict into transformers-named safetensors shards.

    One checkpoint tensor is built at a time and a shard is written as soon as the next tensor
    would overflow it, so memory holds at most one shard, never the whole model. File names and
    the index follow ``save_pretrained`` (``model.safetensors`` or ``model-0000i-of-0000n``).
    """
    from safetensors.torch import save_file
    from transformers.utils.hub import convert_file_size_to_int

    limit = convert_file_size_to_int(max_shard_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    total = 0

    def flush() -> None:
        with naming_file(out_dir / f".part-{len(parts)}"):
            save_file(shard, out_dir / f".part-{len(parts)}", metadata={"format": "pt"})
        parts.append(list(shard))
        shard.clear()

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal total
        t = t.contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer (ZeRO-1/2 flat groups): save only its own bytes
        if shard and sum(v.nbytes for v in shard.values()) + t.nbytes > limit:
            flush()
        shard[name] = t
        total += t.nbytes

    seen: set[int] = set()
    for name, value in state.items():
        if id(value) in seen:  # the second name of a tied weight
            continue
        seen.add(id(value))
        for hf_name, t in hf_tensors(model_cfg, name, value.contiguous().detach().float()):
            add(hf_name, t)
    for hf_name, t in hf_extra_tensors(model_cfg).items():
        add(hf_name, t)
    if shard:
        flush()
    if len(parts) == 1:
        (out_dir / ".part-0").rename(out_dir / "model.safetensors")
        return ["model.safetensors"]
    files = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    for i, file in enumerate(files):
        (out_dir / f".part-{i}").rename(out_dir / file)
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, names in zip(files, parts) for n in names}}
    with naming_file(out_dir / "model.safetensors.index.json"):
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def load_export(hf_dir: Path):
    """The export reloaded by transformers; a weight it lacks or does not expect is an error
    (from_pretrained would otherwise initialise it randomly and only warn)."""
    from transformers import AutoModelForCausalLM

    hf, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise RuntimeError(f"{hf_dir} does not fit its config.json: {problems}")
    return hf.eval()


@torch.no_grad()
def verify_export(hf_dir: Path, model: GPT, sample: torch.Tensor, hf=None) -> float:
    hf = hf if hf is not None else load_export(hf_dir)
    ours, _ = model(sample)
    theirs = hf(sample).logits
    diff = float((ours - theirs).abs().max())
    if not diff <= LOGITS_ATOL:
        raise RuntimeError(f"exported model disagrees with ours: max |logit diff| {diff:.3e} > {LOGITS_ATOL}")
    return diff


def hf_tokenizer_for(manifest):
    """The transformers tokenizer of the run's SentencePiece model, specials named as in SentencePiece."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
    return build_hf_tokenizer(
        manifest.tokenizer_path, bos=sp.id_to_piece(manifest.bos_id), eos=sp.id_to_piece(manifest.eos_id),
        unk=sp.id_to_piece(sp.unk_id()), pad=sp.id_to_piece(manifest.pad_id),
    )


def write_hf_files(cfg: PipelineConfig, manifest, vocab_size: int, out_dir: Path) -> None:
    """config.json, generation_config.json and the tokenizer files next to the weights in ``out_dir``."""
    from transformers import GenerationConfig

    # transformers writes several small files per call: a full disk is reported as the folder.
    with naming_file(out_dir):
        hf_config(cfg.model, manifest.bos_id, manifest.eos_id, manifest.pad_id, vocab_size).save_pretrained(out_dir)
        GenerationConfig(
            bos_token_id=manifest.bos_id, eos_token_id=manifest.eos_id, pad_token_id=manifest.pad_id,
            do_sample=cfg.eval.temperature > 0, temperature=cfg.eval.temperature or None,
            top_k=cfg.eval.top_k or None, max_new_tokens=cfg.eval.max_new_tokens,
        ).save_pretrained(out_dir)
        tok = hf_tokenizer_for(manifest)
        tok.model_max_length = cfg.model.block_size
        tok.save_pretrained(out_dir)
        # The generic class name loads in transformers 4.x as well as 5.x (which aliases it).
        tok_cfg = json.loads((out_dir / "tokenizer_config.json").read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def check_exports(
    cfg: PipelineConfig, model: GPT, hf_dir: Path, gguf_file: Path | None, sample: torch.Tensor, vocab_size: int
) -> tuple[float, float | None, float | None]:
    """Max |logit diff| against our model of the HF folder, of its ONNX graph (written here, from the
    reloaded HF model) and of the GGUF file; each must be within ``LOGITS_ATOL``."""
    hf_model = load_export(hf_dir)
    diff = verify_export(hf_dir, model, sample, hf=hf_model)
    onnx_diff = gguf_diff = None
    if cfg.export.onnx:
        from pretrain.onnx_export import check_onnx, export_onnx

        with naming_file(hf_dir / "onnx" / "model.onnx"):
            onnx_path = export_onnx(hf_model, hf_dir / "onnx" / "model.onnx", sample, opset=cfg.export.onnx_opset)
        # A different shape from the traced one, so a graph frozen to the example fails here.
        check_sample = torch.randint(0, vocab_size, (3, min(11, cfg.model.block_size)), generator=torch.Generator().manual_seed(1))
        onnx_diff = check_onnx(onnx_path, hf_model, check_sample)
    del hf_model
    if gguf_file is not None:
        from pretrain.gguf_export import check_gguf, f16_rounded_

        # An f16 file holds our matrices rounded to f16: compare with exactly that, as sharply as f32.
        # (In place: the caller uses the model only for its shape after this.)
        reference = f16_rounded_(model) if cfg.export.gguf_dtype == "f16" else model
        gguf_diff = check_gguf(gguf_file, reference, sample, LOGITS_ATOL)
    return diff, onnx_diff, gguf_diff


def export(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> ExportResult:
    """Write export/hf (and export/gguf), then check each against our model.

    The consolidated checkpoint is streamed into the files first (one tensor at a time); only then
    are our model and each reloaded export held, for the logit checks: two model copies at most.
    """
    import shutil

    from pretrain.checkpoint import latest_tag, load_consolidated_state_dict
    from pretrain.data import load_manifest
    from pretrain.model import resolve_vocab_size

    family = hf_family(cfg.model)  # refuse an unexportable architecture before any work
    if cfg.export.gguf:
        from pretrain.gguf_export import check_gguf_supported

        check_gguf_supported(cfg.model)
    tag = latest_tag(paths.checkpoints)
    train_fp = (read_stage_record(paths.train) or {}).get("fingerprint")
    eval_fp = (read_stage_record(paths.eval) or {}).get("fingerprint")
    stage = Stage("export", paths.export, cfg.export.model_dump(mode="json"), train_fp, eval_fp, tag, force=force)
    if record := stage.current():
        return ExportResult(**{**record["result"], "skipped": True})
    if tag is None:
        raise MissingInput(f"no checkpoint in {paths.checkpoints}: run the train stage first")

    manifest = load_manifest(paths.shards)
    vocab_size = resolve_vocab_size(cfg.model, manifest.vocab_size)
    sample = torch.randint(0, vocab_size, (2, min(16, cfg.model.block_size)), generator=torch.Generator().manual_seed(0))
    hf_dir, gguf_dir = paths.export / "hf", paths.export / "gguf"
    # No GGUF: nothing to rename into place (a stale one is removed below).
    with stage.outputs(hf_dir, gguf_dir if cfg.export.gguf else None) as (tmp, gguf_tmp):
        gguf_file = gguf_tmp / "model.gguf" if gguf_tmp else None
        state = load_consolidated_state_dict(paths.checkpoints, tag, lazy=True)
        write_hf_weights(state, cfg.model, tmp, cfg.export.max_shard_size)
        if gguf_file:
            from pretrain.gguf_export import write_gguf

            with naming_file(gguf_file):
                write_gguf(
                    gguf_file, cfg.model, state, manifest.tokenizer_path, name=cfg.runtime.run_name,
                    bos_id=manifest.bos_id, eos_id=manifest.eos_id, pad_id=manifest.pad_id, dtype=cfg.export.gguf_dtype,
                )
        del state
        write_hf_files(cfg, manifest, vocab_size, tmp)
        model, tag, manifest = load_model(cfg, paths, tag)
        params = model.num_params(non_embedding=False)
        diff, onnx_diff, gguf_diff = check_exports(cfg, model, tmp, gguf_file, sample, vocab_size)
        card = model_card(cfg, paths, model, tag, manifest, diff, onnx_diff, gguf_diff)
        with naming_file(tmp / "README.md"):
            (tmp / "README.md").write_text(card)
    if not cfg.export.gguf and gguf_dir.exists():  # an earlier export's file would look current
        shutil.rmtree(gguf_dir)
    result = ExportResult(
        hf_dir=str(hf_dir), checkpoint_tag=tag, max_abs_logit_diff=diff, params=params,
        family=family, onnx_path=str(hf_dir / "onnx" / "model.onnx") if onnx_diff is not None else None,
        onnx_max_abs_logit_diff=onnx_diff, gguf_path=str(gguf_dir / "model.gguf") if gguf_diff is not None else None,
        gguf_max_abs_logit_diff=gguf_diff,
    )
    stage.done({"result": result.to_dict(), "checkpoint_tag": tag})
    return result
