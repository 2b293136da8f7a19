"""The tokenizer report: the figures a team reads to accept a tokenizer, next to its model.

``tokenizer/report.json`` and ``tokenizer/report.md``: bytes per token and tokens per word
(overall, per language, per source), the byte-fallback and ``<unk>`` rates, the share of the
vocabulary the validation text uses, the longest pieces and the size of the training sample.

Cheap by construction, no text is read or encoded again. Per-document figures come from what the
stages already wrote: token counts are the shards' list offsets, bytes their ``n_bytes``, words and
labels the clean parts' ``n_words`` (whitespace-separated words), ``language`` and ``source``.
Piece-level figures need the ids themselves: they are counted on the validation split (documents
picked by a seeded hash, so a uniform sample of the corpus), whole shards at a time until
``MAX_COUNTED_TOKENS``, a bincount per shard.

Every token count leaves out the ``</s>`` the shard stage appends to each document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.shards import SPLITS, TOKEN_COLUMN, assign_splits, read_shard_tokens
from data_prep.tokenizer import MODEL_FILE, clean_parts
from pretrain_pipeline.artifacts import RunPaths, atomic_write_json, atomic_write_text, fingerprint, read_json, sha256_file
from pretrain_pipeline.stage import completed_record

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
TOP_PIECES = 20
# Validation tokens counted piece by piece, at most (whole shards, so up to one shard more).
MAX_COUNTED_TOKENS = 50_000_000
LABELS = ("language", "source")
NO_LABEL = "(none)"
# SentencePiece piece types (sentencepiece_model.proto).
NORMAL, UNKNOWN, CONTROL, BYTE = 1, 2, 3, 6


def write_tokenizer_report(paths: RunPaths) -> Path:
    """Write ``report.json`` and ``report.md`` into ``tokenizer/``, unless they are current.

    The report carries its fingerprint (its settings, the tokenizer's and the manifest's sha256,
    the clean stage's fingerprint): a retrained tokenizer or rewritten shards make it stale.
    """
    completed_record(paths.shards, "shards")
    manifest_path = paths.shards / "manifest.json"
    manifest = read_json(manifest_path)
    model_sha = sha256_file(paths.tokenizer / MODEL_FILE)
    if model_sha != manifest["tokenizer_sha256"]:
        raise ValueError(
            f"{manifest_path}: shards written with tokenizer {manifest['tokenizer_sha256'][:12]}, but "
            f"{paths.tokenizer / MODEL_FILE} is {model_sha[:12]}; run the tokenize stage again"
        )
    settings = {"top_pieces": TOP_PIECES, "max_counted_tokens": MAX_COUNTED_TOKENS}
    inputs = {
        "tokenizer_sha256": model_sha,
        "manifest_sha256": sha256_file(manifest_path),
        "clean_fingerprint": manifest["clean_fingerprint"],
    }
    stamp = fingerprint("tokenizer-report", settings, inputs)
    out = paths.tokenizer / REPORT_JSON
    if out.exists() and read_json(out).get("fingerprint") == stamp and (paths.tokenizer / REPORT_MD).exists():
        return out
    report = {"fingerprint": stamp, "settings": settings, "inputs": inputs, **tokenizer_report(paths, manifest)}
    atomic_write_json(out, report)
    atomic_write_text(paths.tokenizer / REPORT_MD, report_markdown(report))
    return out


def tokenizer_report(paths: RunPaths, manifest: dict[str, Any]) -> dict[str, Any]:
    """The report's figures (see the module docstring for where each comes from)."""
    proto = model_proto(paths.tokenizer / MODEL_FILE)
    types = np.array([p.type for p in proto.pieces], dtype=np.int8)
    counts, fallback, capped = validation_piece_counts(paths.shards, manifest, types)
    docs = with_fallback(document_table(paths, manifest), manifest, fallback)
    meta = read_json(paths.tokenizer / "meta.json")
    return {
        "vocab_size": len(types),
        "overall": _ratios(_sums(docs)),
        **{f"by_{label}": grouped(docs, label) for label in LABELS},
        "validation_pieces": piece_rates(counts, types, len(fallback), capped),
        "longest_pieces": longest_pieces(proto, counts, TOP_PIECES),
        "training_sample": training_sample(meta, docs.num_rows),
    }


def model_proto(model_path: Path) -> Any:
    """The SentencePiece model file parsed: each piece with its type (NORMAL, BYTE, ...)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto


def _shard_paths(shards_dir: Path, manifest: dict[str, Any], split: str) -> list[Path]:
    return [shards_dir / s["file"] for s in manifest["splits"][split]]


def _shard_documents(path: Path) -> pa.Table:
    """id, text tokens and text bytes of each document of one shard (token values not read)."""
    table = pa.ipc.open_stream(pa.memory_map(str(path), "r")).read_all()
    tokens = pc.subtract(pc.list_value_length(table.column(TOKEN_COLUMN)), 1)  # minus the appended </s>
    return pa.table({"id": table.column("id"), "tokens": tokens.cast(pa.int64()), "bytes": table.column("n_bytes")})


def document_table(paths: RunPaths, manifest: dict[str, Any]) -> pa.Table:
    """One row per document: tokens, bytes, words, language, source (train documents, then validation).

    The shards hold each split's documents in clean order; the split of each clean row is
    recomputed from the manifest's seed and fraction and checked against the shards' ids.
    """
    parts = clean_parts(paths)
    wanted = ["id", "n_words", *LABELS]
    clean = pa.concat_tables(
        [pq.read_table(p, columns=[c for c in wanted if c in pq.read_schema(p).names]) for p in parts],
        promote_options="default",
    )
    ids = clean.column("id").to_pylist()
    is_val = np.array([s == "val" for s in assign_splits(ids, manifest["seed"], manifest["val_fraction"])], dtype=bool)
    rows = np.concatenate([np.flatnonzero(~is_val), np.flatnonzero(is_val)])
    encoded = pa.concat_tables(
        [_shard_documents(p) for split in SPLITS for p in _shard_paths(paths.shards, manifest, split)]
    )
    clean = clean.take(pa.array(rows))  # now in shard order: train documents, then validation
    if encoded.num_rows != clean.num_rows or not encoded.column("id").equals(clean.column("id")):
        raise ValueError(f"{paths.shards / 'manifest.json'}: the shards do not hold the clean corpus's documents; "
                         "run the tokenize stage again")
    n = clean.num_rows
    columns = {
        "tokens": encoded.column("tokens"),
        "bytes": encoded.column("bytes"),
        "words": clean.column("n_words") if "n_words" in clean.column_names else pa.nulls(n, pa.int64()),
        **{label: pc.fill_null(clean.column(label), NO_LABEL) if label in clean.column_names else pa.array([NO_LABEL] * n)
           for label in LABELS},
    }
    return pa.table(columns)


def _sums(table: pa.Table) -> dict[str, int]:
    return {
        "documents": table.num_rows,
        **{k: int(pc.sum(table.column(k)).as_py() or 0) for k in ("bytes", "tokens", "words")},
    }


def _ratios(sums: dict[str, int]) -> dict[str, Any]:
    return {
        **sums,
        "bytes_per_token": sums["bytes"] / sums["tokens"] if sums["tokens"] else None,
        "tokens_per_word": sums["tokens"] / sums["words"] if sums["words"] else None,
    }


def grouped(docs: pa.Table, label: str) -> list[dict[str, Any]]:
    """Bytes per token and tokens per word of each value of ``label``, most bytes first, and the
    byte-fallback rate of its counted validation documents."""
    summed = ("bytes", "tokens", "words", "fallback_tokens", "counted_tokens")
    sums = docs.group_by(label).aggregate([*((k, "sum") for k in summed), ("bytes", "count")])
    rows = []
    for r in sums.to_pylist():
        rows.append({
            label: r[label],
            **_ratios({"documents": r["bytes_count"], "bytes": r["bytes_sum"], "tokens": r["tokens_sum"],
                       "words": r["words_sum"] or 0}),
            "byte_fallback_rate": r["fallback_tokens_sum"] / r["counted_tokens_sum"] if r["counted_tokens_sum"] else None,
        })
    return sorted(rows, key=lambda r: (-r["bytes"], r[label]))


def validation_piece_counts(
    shards_dir: Path, manifest: dict[str, Any], types: np.ndarray
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Over the validation split's tokens, whole shards in order until ``MAX_COUNTED_TOKENS``:
    the count of each id, each counted document's byte-fallback tokens, and whether the cap
    stopped before the end."""
    counts = np.zeros(len(types), dtype=np.int64)
    fallback: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    shards = _shard_paths(shards_dir, manifest, "val")
    for i, path in enumerate(shards):
        tokens, offsets = read_shard_tokens(path)
        counts += np.bincount(tokens, minlength=len(types))[: len(types)]
        running = np.concatenate([[0], np.cumsum(types[tokens] == BYTE)])
        fallback.append(np.diff(running[offsets]))
        if counts.sum() >= MAX_COUNTED_TOKENS:
            return counts, np.concatenate(fallback), i + 1 < len(shards)
    return counts, np.concatenate(fallback), False


def with_fallback(docs: pa.Table, manifest: dict[str, Any], fallback: np.ndarray) -> pa.Table:
    """``docs`` plus the byte-fallback and text tokens of each counted validation document (0 elsewhere)."""
    first = sum(s["documents"] for s in manifest["splits"]["train"])  # validation rows follow the train rows
    rows = slice(first, first + len(fallback))
    fallback_tokens, counted_tokens = np.zeros(docs.num_rows, dtype=np.int64), np.zeros(docs.num_rows, dtype=np.int64)
    fallback_tokens[rows] = fallback
    counted_tokens[rows] = docs.column("tokens").to_numpy()[rows]
    docs = docs.append_column("fallback_tokens", pa.array(fallback_tokens))
    return docs.append_column("counted_tokens", pa.array(counted_tokens))


def piece_rates(counts: np.ndarray, types: np.ndarray, documents: int, capped: bool) -> dict[str, Any]:
    """Byte-fallback and ``<unk>`` shares of the counted text tokens, and the share of the
    vocabulary they use (control pieces, the appended ``</s>`` among them, left out)."""
    text = counts[types != CONTROL]
    tokens = int(text.sum())
    byte_tokens, unknown_tokens = int(counts[types == BYTE].sum()), int(counts[types == UNKNOWN].sum())
    used = int((text > 0).sum())
    return {
        "split": "val",
        "documents": documents,
        "tokens": tokens,
        "capped": capped,
        "byte_fallback_tokens": byte_tokens,
        "byte_fallback_rate": byte_tokens / tokens if tokens else None,
        "unknown_tokens": unknown_tokens,
        "unknown_rate": unknown_tokens / tokens if tokens else None,
        "vocab_used": used,
        "vocab_used_share": used / len(types),
    }


def piece_text(piece: str) -> str:
    """The text a piece stands for (SentencePiece writes a space as U+2581)."""
    return piece.replace("\u2581", " ")


def longest_pieces(proto: Any, counts: np.ndarray, top: int) -> list[dict[str, Any]]:
    """The ``top`` learnt pieces with the most UTF-8 bytes (ties: lower id first), with how often
    the validation text used each."""
    pieces = [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type == NORMAL]
    ranked = sorted(pieces, key=lambda item: (-len(piece_text(item[1]).encode("utf-8")), item[0]))[:top]
    return [{"id": i, "piece": p, "bytes": len(piece_text(p).encode("utf-8")), "val_count": int(counts[i])}
            for i, p in ranked]


def training_sample(meta: dict[str, Any], corpus_documents: int) -> dict[str, Any]:
    """Lines, bytes and documents the tokenizer was trained on (from its meta.json).

    The documents are known when the stage recorded them, or when the sample took every line
    (fewer lines than ``input_sentence_size``): then it is every document of the corpus.
    """
    lines = meta.get("training_lines")
    documents = meta.get("training_documents")
    took_all = lines is not None and lines < meta.get("settings", {}).get("input_sentence_size", 0)
    if documents is None and took_all and not meta.get("from_run"):
        documents = corpus_documents
    return {
        "lines": lines,
        "bytes": meta.get("training_bytes"),
        "documents": documents,
        "corpus_documents": corpus_documents,
        "from_run": (meta.get("from_run") or {}).get("run"),
    }


# --------------------------------------------------------------------------------------------
# Markdown


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.3%}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("`", "'").replace("\n", "\\n")


def _group_table(rows: list[dict[str, Any]], label: str) -> list[str]:
    lines = [f"| {label} | documents | bytes | tokens | bytes/token | tokens/word | byte fallback (val) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {_cell(r[label])} | {_num(r['documents'])} | {_num(r['bytes'])} | {_num(r['tokens'])} "
              f"| {_num(r['bytes_per_token'])} | {_num(r['tokens_per_word'])} | {_percent(r['byte_fallback_rate'])} |"
              for r in rows]
    return lines + [""]


def report_markdown(report: dict[str, Any], level: int = 2) -> str:
    """The report as markdown; ``level`` is the heading level of its title."""
    h = "#" * level
    overall, pieces, sample = report["overall"], report["validation_pieces"], report["training_sample"]
    capped = f" (first {MAX_COUNTED_TOKENS:,} tokens)" if pieces["capped"] else ""
    source = f" (of run {sample['from_run']!r})" if sample["from_run"] else ""
    lines = [
        f"{h} Tokenizer report", "",
        f"Vocabulary {report['vocab_size']:,}, tokenizer sha256 `{report['inputs']['tokenizer_sha256'][:16]}`.", "",
        "| | |", "|---|---|",
        f"| bytes per token | {_num(overall['bytes_per_token'])} |",
        f"| tokens per word | {_num(overall['tokens_per_word'])} |",
        f"| byte-fallback rate | {_percent(pieces['byte_fallback_rate'])} ({_num(pieces['byte_fallback_tokens'])} tokens) |",
        f"| unknown-piece rate | {_percent(pieces['unknown_rate'])} ({_num(pieces['unknown_tokens'])} tokens) |",
        f"| vocabulary used on validation | {_percent(pieces['vocab_used_share'])} ({_num(pieces['vocab_used'])} ids) |",
        f"| documents / bytes / tokens | {_num(overall['documents'])} / {_num(overall['bytes'])} / {_num(overall['tokens'])} |",
        f"| training sample{source} | {_num(sample['lines'])} lines, {_num(sample['bytes'])} bytes, "
        f"{_num(sample['documents'])} of {_num(sample['corpus_documents'])} documents |",
        "",
        f"Piece rates counted on {_num(pieces['documents'])} validation documents, {_num(pieces['tokens'])} tokens"
        f"{capped}; token counts leave out the `</s>` ending each document.", "",
    ]
    for label in LABELS:
        lines += [f"{h}# By {label}", "", *_group_table(report[f"by_{label}"], label)]
    lines += [f"{h}# Longest pieces", "", "| id | piece | bytes | uses on validation |", "|---|---|---|---|"]
    lines += [f"| {p['id']} | `{_cell(p['piece'])}` | {p['bytes']} | {_num(p['val_count'])} |"
              for p in report["longest_pieces"]]
    return "\n".join(lines) + "\n"
