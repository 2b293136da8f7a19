"""Held-out loss, perplexity and bits-per-byte of the last checkpoint, a few samples, and the
configured lm-evaluation-harness tasks (``eval.lm_eval_tasks``) through our adapter.

Runs in one process, without DeepSpeed's launcher: the checkpoint is consolidated to fp32 first.
The scored windows are the first ``eval.max_tokens`` targets of the val stream, in order and
non-overlapping, so numbers from different runs with the same data are comparable.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.checkpoint import TAG_RE, latest_tag, load_consolidated_state_dict
from pretrain.data import Manifest, TokenStream, load_manifest
from pretrain.device import resolve_device
from pretrain.model import GPT, resolve_vocab_size
from pretrain_pipeline.artifacts import RunPaths, atomic_write_json, read_json, read_stage_record, sha256_file
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.errors import MissingInput, UserError
from pretrain_pipeline.stage import Stage


@dataclass
class EvalResult:
    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    checkpoint_tag: str
    samples: list[dict[str, str]] = field(default_factory=list)
    lm_eval: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value
    heldout: dict[str, Any] = field(default_factory=dict)  # eval.heldout_inputs: bits_per_byte, bytes, tokens, ...
    eval_path: str = ""
    checkpoint_sha256: str = ""
    wandb: str | None = None
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(cfg: PipelineConfig, paths: RunPaths, tag: str | None = None) -> tuple[GPT, str, Manifest]:
    """Our GPT with the consolidated weights of checkpoint ``tag`` (latest by default), in eval mode."""
    manifest = load_manifest(paths.shards)
    tag = tag or latest_tag(paths.checkpoints)
    if tag is None:
        raise MissingInput(f"no checkpoint in {paths.checkpoints}: run the train stage first")
    model = GPT(cfg.model, resolve_vocab_size(cfg.model, manifest.vocab_size))
    state = load_consolidated_state_dict(paths.checkpoints, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head may be stored under either name; anything else missing is a real mismatch.
    missing = [k for k in missing if not (cfg.model.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {tag} does not fit the model config: missing {missing}, unexpected {unexpected}")
    return model.eval(), tag, manifest


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of the weights themselves (names, dtypes, shapes, bytes): the same for any ZeRO stage
    or world size that wrote them, unlike a hash of the checkpoint files."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def log_to_wandb(cfg: PipelineConfig, paths: RunPaths, result: "EvalResult", step: int) -> str | None:
    """Eval results into the training run's W&B run (resumed by id), offline unless configured."""
    from pretrain.tracking import Tracker

    if not cfg.eval.wandb or cfg.tracking.wandb_mode == "disabled":
        return None
    summary_path = paths.train / "summary.json"
    run_id = read_json(summary_path).get("wandb_run_id") if summary_path.exists() else None
    tracker = Tracker(cfg.tracking, paths.eval, {"eval": cfg.eval.model_dump(mode="json")}, resume_id=run_id,
                      run_name=cfg.runtime.run_name)
    try:
        metrics = {"eval/loss": result.loss, "eval/perplexity": result.perplexity,
                   "eval/bits_per_byte": result.bits_per_byte, "eval/tokens": result.tokens,
                   **({"eval/heldout_bits_per_byte": result.heldout["bits_per_byte"]} if result.heldout else {}),
                   **{f"lm_eval/{task}/{name}": v for task, m in result.lm_eval.items() for name, v in m.items()}}
        tracker.log(metrics, step=step)
        tracker.summary({**metrics, "eval/checkpoint_tag": result.checkpoint_tag,
                         **{f"eval/sample_{i}": s["prompt"] + s["completion"] for i, s in enumerate(result.samples)}})
        return tracker.offline_dir or tracker.run_id
    finally:
        tracker.finish()


def token_byte_lengths(sp) -> np.ndarray:
    """UTF-8 bytes each piece stands for; control tokens count 0, byte-fallback tokens 1."""
    lengths = np.zeros(sp.get_piece_size(), dtype=np.int64)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i):
            continue
        lengths[i] = 1 if sp.is_byte(i) else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return lengths


def scored_bytes(targets: np.ndarray, previous: np.ndarray, lengths: np.ndarray, eos_id: int, sp) -> int:
    """Bytes of the text the targets spell; the dummy-prefix space a document starts with is not text."""
    total = int(lengths[targets].sum())
    starts = previous == eos_id
    if starts.any():
        first_pieces = targets[starts]
        total -= sum(1 for t in first_pieces if sp.id_to_piece(int(t)).startswith("\u2581"))
    return total


@torch.no_grad()
def score(model: GPT, stream: TokenStream, max_tokens: int, micro_batch: int, eos_id: int, sp, device: str) -> dict[str, float]:
    bs = model.block_size
    n_windows = min((len(stream) - 1) // bs, max(1, math.ceil(max_tokens / bs)))
    if n_windows < 1:
        raise ValueError(f"the val split has {len(stream)} tokens, fewer than one window of {bs + 1}")
    lengths = token_byte_lengths(sp)
    nats, tokens, nbytes = 0.0, 0, 0
    for start in range(0, n_windows, micro_batch):
        windows = [stream.slice(w * bs, w * bs + bs + 1) for w in range(start, min(start + micro_batch, n_windows))]
        chunk = torch.from_numpy(np.stack(windows).astype(np.int64)).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        nats += float(loss)
        tokens += y.numel()
        # The first window's first token has no predecessor in the stream; treat it as a document start.
        prev = x.cpu().numpy().ravel().copy()
        if start == 0:
            prev[0] = eos_id
        nbytes += scored_bytes(y.cpu().numpy().ravel(), prev, lengths, eos_id, sp)
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": nats / (math.log(2) * max(nbytes, 1)),
        "tokens": tokens,
        "bytes": nbytes,
    }


def read_heldout(cfg: PipelineConfig) -> tuple[list[str], str]:
    """The texts of ``eval.heldout_inputs`` in file order, and one sha256 over the files; a row that is
    not a document is an error naming its file and line (held-out text is scored as given)."""
    from data_prep.readers import expand_inputs, read_file

    texts, h = [], hashlib.sha256()
    for path in expand_inputs(cfg.eval.heldout_inputs):
        h.update(f"{path.name}|{sha256_file(path)}\n".encode())
        for row in read_file(path, cfg.data.text_field, cfg.data.id_field):
            if row["quarantine"]:
                raise UserError(f"eval.heldout_inputs: {row['source']} line {row['line']}: {row['quarantine']}")
            texts.append(row["text"])
    if not texts:
        raise UserError(f"eval.heldout_inputs: no documents in {cfg.eval.heldout_inputs}")
    return texts, h.hexdigest()


@torch.no_grad()
def score_texts(model: GPT, sp, texts: list[str], eos_id: int, micro_batch: int, device: str) -> dict[str, float]:
    """Bits per UTF-8 byte of whole documents: every token of every text is scored once (as in
    training, each document follows an EOS; EOS targets are not text and are not scored), and the
    nats are divided by the texts' own bytes, so any two tokenizers are measured on the same bytes."""
    stream = np.array([t for ids in sp.encode(texts) for t in (eos_id, *ids)], dtype=np.int64)
    bs = model.block_size
    # Windows of bs targets overlapping by one token; the tail is padded with EOS, which is never scored.
    n_windows = max(1, math.ceil((len(stream) - 1) / bs))
    stream = np.concatenate([stream, np.full(n_windows * bs + 1 - len(stream), eos_id, dtype=np.int64)])
    nats, tokens = 0.0, 0
    for start in range(0, n_windows, micro_batch):
        windows = [stream[w * bs: w * bs + bs + 1] for w in range(start, min(start + micro_batch, n_windows))]
        chunk = torch.from_numpy(np.stack(windows)).to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits, _ = model(x)
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        scored = y.flatten() != eos_id
        nats += float(losses[scored].sum())
        tokens += int(scored.sum())
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"bits_per_byte": nats / (math.log(2) * nbytes), "nats": nats, "tokens": tokens, "bytes": nbytes,
            "documents": len(texts)}


def generate_samples(model: GPT, sp, cfg: PipelineConfig, eos_id: int, device: str) -> list[dict[str, str]]:
    """Completions of ``eval.prompts``, each primed with EOS: every training document follows one
    (shards hold doc, EOS, doc, EOS, ...; BOS never occurs), and the lm-eval adapter does the same."""
    ec = cfg.eval
    samples = []
    for i, prompt in enumerate(ec.prompts):
        generator = torch.Generator(device=device).manual_seed(ec.seed + i)
        ids = [eos_id] + sp.encode(prompt)
        out = model.generate(
            torch.tensor([ids], device=device), ec.max_new_tokens, temperature=ec.temperature,
            top_k=ec.top_k or None, generator=generator, eos_id=eos_id,
        )
        samples.append({"prompt": prompt, "completion": sp.decode(out[0, len(ids):].tolist())})
    return samples


def task_files_sha256(include_path: str | None) -> str | None:
    """Hash of every file under the local lm-eval task directory: an edited task YAML or data file
    makes the evaluate stage stale, as a changed task list does."""
    if include_path is None:
        return None
    root = Path(include_path)
    if not root.is_dir():
        raise FileNotFoundError(f"eval.lm_eval_include_path: {root} is not a directory")
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root).as_posix()}|{sha256_file(path)}\n".encode())
    return h.hexdigest()


def run_lm_eval(cfg: PipelineConfig, model: GPT, sp, eos_id: int, device: str) -> dict[str, dict[str, float]]:
    """``eval.lm_eval_tasks`` on the model in memory, through our lm-eval adapter: task -> metric
    (``acc``, ``acc_stderr``, or ``acc/<filter>`` for a filter other than lm-eval's ``none``) -> value."""
    import lm_eval

    from data_prep.benchmarks import resolve_tasks
    from pretrain.lm_eval_adapter import PretrainPipelineLM

    ec = cfg.eval
    lm = PretrainPipelineLM.from_model(model, sp, eos_id, batch_size=ec.micro_batch_size, device=device)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(ec.lm_eval_tasks), task_manager=resolve_tasks(list(ec.lm_eval_tasks), ec.lm_eval_include_path)[0],
        limit=ec.lm_eval_limit, log_samples=False,
    )
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            # lm-eval writes "N/A" for a stderr it did not compute, and an "alias" string.
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "," in key:
                name, filt = key.split(",", 1)
                results.setdefault(task, {})[name if filt == "none" else f"{name}/{filt}"] = float(value)
    return results


def evaluate(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> EvalResult:
    import sentencepiece as spm

    train_record = read_stage_record(paths.train) or {}
    tag = latest_tag(paths.checkpoints)
    tasks_sha = task_files_sha256(cfg.eval.lm_eval_include_path) if cfg.eval.lm_eval_tasks else None
    heldout_texts, heldout_sha = read_heldout(cfg) if cfg.eval.heldout_inputs else ([], None)
    stage = Stage("evaluate", paths.eval, cfg.eval.model_dump(mode="json"), train_record.get("fingerprint"), tag,
                  tasks_sha, *filter(None, [heldout_sha]), force=force)
    if stage.current():
        return EvalResult(**{**read_json(paths.eval / "eval.json")["result"], "skipped": True})

    # train.device: cuda is only a preference here: evaluation may run where the training GPUs are not.
    device = resolve_device("cpu" if cfg.train.device == "cpu" else "auto")
    model, tag, manifest = load_model(cfg, paths, tag)
    model.to(device)
    manifest.verify(("val",))
    sp = spm.SentencePieceProcessor(model_file=str(manifest.tokenizer_path))
    stream = TokenStream(manifest.shard_paths("val"))
    metrics = score(model, stream, cfg.eval.max_tokens, cfg.eval.micro_batch_size, manifest.eos_id, sp, device)
    samples = generate_samples(model, sp, cfg, manifest.eos_id, device)
    lm_eval_results = run_lm_eval(cfg, model, sp, manifest.eos_id, device) if cfg.eval.lm_eval_tasks else {}
    heldout = {}
    if heldout_texts:
        heldout = {**score_texts(model, sp, heldout_texts, manifest.eos_id, cfg.eval.micro_batch_size, device),
                   "sha256": heldout_sha}
    result = EvalResult(
        loss=metrics["loss"], perplexity=metrics["perplexity"], bits_per_byte=metrics["bits_per_byte"],
        tokens=int(metrics["tokens"]), bytes=int(metrics["bytes"]), checkpoint_tag=tag, samples=samples,
        lm_eval=lm_eval_results, heldout=heldout,
        eval_path=str(paths.eval / "eval.json"), checkpoint_sha256=weights_sha256(model),
    )
    step_match = TAG_RE.match(tag)
    result.wandb = log_to_wandb(cfg, paths, result, int(step_match.group(1)) if step_match else 0)
    atomic_write_json(
        paths.eval / "eval.json",
        {
            "result": result.to_dict(),
            "checkpoint_tag": tag,
            "checkpoint_sha256": result.checkpoint_sha256,
            "config_sha256": cfg.fingerprint(),
            "eval_config_sha256": cfg.eval.fingerprint(),
            "fingerprint": stage.fingerprint,
            "train_fingerprint": train_record.get("fingerprint"),
            "model_config_fingerprint": cfg.model.fingerprint(),
            "manifest": str(manifest.path),
            "manifest_sha256": sha256_file(manifest.path),
            "tokenizer_sha256": manifest.raw.get("tokenizer_sha256"),
            "lm_eval_task_files_sha256": tasks_sha,
            "bits_per_byte_method": "UTF-8 bytes of the scored target pieces (byte tokens count 1, "
            "control tokens 0, the dummy-prefix space at each document start excluded)",
        },
    )
    stage.done({"checkpoint_tag": tag, "loss": result.loss, "bits_per_byte": result.bits_per_byte})
    return result
