"""Shard stage: clean corpus -> token ids (Ray Data, one SentencePiece per worker) -> Arrow shards.

Each document becomes its token ids followed by ``</s>`` (id 2). A document goes to ``val`` when
``sha256(f"{seed}:{id}")`` read as a fraction of 2**64 is below ``val_fraction``, so the split does
not move when the corpus grows or is reordered. If that leaves ``val`` empty (tiny corpus) the
document with the lowest hash is moved there; likewise ``train`` is never left empty.

A shard is an Arrow IPC *stream* file holding ONE record batch with columns
``input_ids: list<uint16|uint32>``, ``id: string``, ``n_bytes: int64`` (UTF-8 bytes of the source
text, for bits-per-byte). One batch per file means the token stream (the list's flat child) and the
document boundaries (its offsets) are each one contiguous buffer: ``read_shard_tokens`` memory-maps
them without copying. ``datasets.Dataset.from_file`` opens the same files.

Output ``shards/``: train-00000.arrow …, val-00000.arrow …, manifest.json, _SUCCESS.json.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.ray_runtime import available_cpus, ray_session
from data_prep.tokenizer import EOS_ID, MODEL_FILE, clean_parts, clean_stage_fingerprint
from pretrain_pipeline.artifacts import (
    RunPaths,
    atomic_write_json,
    fingerprint,
    mark_stage_done,
    read_json,
    read_stage_record,
    sha256_file,
    stage_is_current,
)
from pretrain_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)

FORMAT = "arrow-ipc-stream"
TOKEN_COLUMN = "input_ids"
SPLITS = ("train", "val")
PROGRESS_DIR = ".done"  # per-shard completion records inside the work directory


@dataclass
class ShardsResult:
    manifest_path: Path
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int
    n_shards: int
    skipped: bool = False
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["manifest_path"] = str(self.manifest_path)
        return out


# --------------------------------------------------------------------------------------------
# Split


def split_hash(doc_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{doc_id}".encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 2**64


def assign_splits(ids: list[str], seed: int, val_fraction: float) -> list[str]:
    """``"train"``/``"val"`` per document, by seeded hash; neither split left empty when avoidable."""
    hashes = [split_hash(i, seed) for i in ids]
    splits = ["val" if h < val_fraction else "train" for h in hashes]
    if len(ids) >= 2 and val_fraction > 0:
        if "val" not in splits:
            splits[min(range(len(ids)), key=hashes.__getitem__)] = "val"
        if "train" not in splits:
            splits[max(range(len(ids)), key=hashes.__getitem__)] = "train"
    return splits


# --------------------------------------------------------------------------------------------
# Ray Data encoding


def token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65535 else pa.uint32()


def shard_schema(vocab_size: int) -> pa.Schema:
    return pa.schema([(TOKEN_COLUMN, pa.list_(token_type(vocab_size))), ("id", pa.string()), ("n_bytes", pa.int64())])


class Encoder:
    """Ray Data callable class: the SentencePiece model is loaded once per worker, not per batch."""

    def __init__(self, model_path: str, vocab_size: int) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        self.schema = shard_schema(vocab_size)
        self.np_type = np.uint16 if token_type(vocab_size) == pa.uint16() else np.uint32

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        # One work item = one row group of a clean part; reading it here (not in a separate read
        # operator) keeps a fixed actor pool from starving read tasks of CPUs on a small cluster.
        (part,), (row_group,) = batch["part"], batch["row_group"]
        table = pq.ParquetFile(str(part)).read_row_group(int(row_group), columns=["id", "text"])
        texts = table.column("text").to_pylist()
        encoded = self.sp.encode(texts)
        lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.empty(int(offsets[-1]), dtype=self.np_type)
        for ids, start, end in zip(encoded, offsets[:-1], offsets[1:]):
            flat[start : end - 1] = ids
            flat[end - 1] = EOS_ID
        tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        n_bytes = pa.array([len(t.encode("utf-8")) for t in texts], type=pa.int64())
        return pa.Table.from_arrays([tokens, table.column("id").combine_chunks(), n_bytes], schema=self.schema)


# --------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Buffers one split's rows and writes a shard (one record batch) every ~``target_bytes``."""

    def __init__(
        self, out_dir: Path, split: str, schema: pa.Schema, target_bytes: int, finished: dict[str, dict] | None = None
    ) -> None:
        self.out_dir = out_dir
        self.split = split
        self.schema = schema
        self.target_bytes = target_bytes
        self.pending: list[pa.Table] = []
        self.pending_bytes = 0
        self.shards: list[dict[str, Any]] = []
        # Shards a crashed earlier attempt (same fingerprint) finished: name -> manifest entry.
        # Shard boundaries are a pure function of the ordered corpus, so shard k of a rerun is
        # shard k of the crashed run, and an intact one is kept instead of rewritten.
        self.finished = finished or {}
        self.reused = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.pending.append(table)
        self.pending_bytes += table.nbytes
        if self.pending_bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending).combine_chunks()
        self.pending, self.pending_bytes = [], 0
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        path = self.out_dir / name
        done = self.finished.get(name)
        if done and done["documents"] == table.num_rows and path.exists() and sha256_file(path) == done["sha256"]:
            self.shards.append(done)
            self.reused += 1
            return
        tmp = path.with_name(f".{name}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, self.schema) as writer:
            for batch in table.to_batches(max_chunksize=table.num_rows):
                writer.write_batch(batch)
        os.replace(tmp, path)
        tokens = table.column(TOKEN_COLUMN)
        self.shards.append(
            {
                "file": name,
                "tokens": int(pc.list_value_length(tokens).to_numpy().sum()),
                "documents": table.num_rows,
                "bytes": path.stat().st_size,
                "text_bytes": int(table.column("n_bytes").to_numpy().sum()),
                "sha256": sha256_file(path),
            }
        )
        # The completion record is written after the rename: a record always names a whole shard.
        atomic_write_json(self.out_dir / PROGRESS_DIR / f"{name}.json", self.shards[-1])


def _split_table(table: pa.Table, splits: Iterable[str]) -> dict[str, pa.Table]:
    mask = pa.array([s == "val" for s in splits])
    return {"val": table.filter(mask), "train": table.filter(pc.invert(mask))}


def _totals(shards: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "tokens": sum(s["tokens"] for s in shards),
        "documents": sum(s["documents"] for s in shards),
        "text_bytes": sum(s["text_bytes"] for s in shards),
        "shards": len(shards),
    }


def _clean_ids(parts: list[Path]) -> list[str]:
    return [i for part in parts for i in pq.read_table(part, columns=["id"]).column("id").to_pylist()]


def shards_fingerprint(cfg: PipelineConfig, tokenizer_sha256: str, clean_fp: str) -> str:
    return fingerprint("shards", cfg.tokenizer.model_dump(mode="json"), tokenizer_sha256, clean_fp)


FINGERPRINT_FILE = ".fingerprint"


def _finished_shards(work: Path, fp: str) -> dict[str, dict[str, Any]]:
    """Completion records left in ``work`` by an interrupted run with the same fingerprint.

    Anything else there (another fingerprint, unrecorded or half-written files) is discarded.
    """
    if work.exists() and (
        not (work / FINGERPRINT_FILE).exists() or (work / FINGERPRINT_FILE).read_text().strip() != fp
    ):
        shutil.rmtree(work)
    (work / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    (work / FINGERPRINT_FILE).write_text(fp + "\n")
    records = {p.name[: -len(".json")]: read_json(p) for p in (work / PROGRESS_DIR).glob("*.arrow.json")}
    for stray in work.iterdir():
        if stray.is_file() and stray.name not in records and stray.name != FINGERPRINT_FILE:
            stray.unlink()
    return records


def write_shards(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> ShardsResult:
    start = time.monotonic()
    tok = cfg.tokenizer
    parts = clean_parts(paths)
    clean_fp = clean_stage_fingerprint(paths)
    tok_record = read_stage_record(paths.tokenizer)
    if tok_record is None:
        raise FileNotFoundError(f"{paths.tokenizer}: the tokenizer stage has not completed; run it first")
    meta = read_json(paths.tokenizer / "meta.json")
    model_path = paths.tokenizer / MODEL_FILE
    tok_sha = sha256_file(model_path)
    if tok_sha != meta["sha256"]:
        raise ValueError(f"{model_path}: sha256 {tok_sha[:12]} does not match meta.json ({meta['sha256'][:12]})")
    fp = shards_fingerprint(cfg, tok_sha, clean_fp)
    manifest_path = paths.shards / "manifest.json"
    if not force and stage_is_current(paths.shards, fp) and manifest_path.exists():
        log.info("shards: tokenizer, corpus and settings unchanged, skipping (%s)", paths.shards)
        m = read_json(manifest_path)
        return ShardsResult(
            manifest_path=manifest_path,
            train_tokens=m["totals"]["train"]["tokens"],
            val_tokens=m["totals"]["val"]["tokens"],
            train_docs=m["totals"]["train"]["documents"],
            val_docs=m["totals"]["val"]["documents"],
            n_shards=m["totals"]["train"]["shards"] + m["totals"]["val"]["shards"],
            skipped=True,
        )

    vocab_size = int(meta["vocab_size"])
    schema = shard_schema(vocab_size)
    # The split is decided up front from the ids alone (cheap), so the empty-split fallback can see
    # the whole corpus while the encoding streams.
    ids = _clean_ids(parts)
    splits = assign_splits(ids, tok.seed, tok.val_fraction)
    target_bytes = int(tok.shard_size_mb * (1 << 20))

    import ray

    # Shards go to a work directory that survives a crash; finished shards are recorded in it, so a
    # rerun with the same fingerprint writes only the missing ones (it re-encodes, which is
    # deterministic, to find the shard boundaries). On success the directory is renamed into place.
    tmp = paths.shards.with_name(f".{paths.shards.name}.partial")
    finished = _finished_shards(tmp, fp)
    with ray_session(cfg.runtime):
        writers = {s: ShardWriter(tmp, s, schema, target_bytes, finished) for s in SPLITS}
        items = [
            {"part": str(p), "row_group": g} for p in parts for g in range(pq.ParquetFile(p).num_row_groups)
        ]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            Encoder,
            fn_constructor_kwargs={"model_path": str(model_path.resolve()), "vocab_size": vocab_size},
            batch_format="numpy",
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=max(1, min(available_cpus(), len(items)))),
        )
        row = 0
        # preserve_order (set by ray_session) keeps clean order, so shards are deterministic.
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            n = batch.num_rows
            if batch.column("id").to_pylist() != ids[row : row + n]:
                raise RuntimeError(f"shards: Ray Data returned documents out of clean order near row {row}")
            for split, table in _split_table(batch, splits[row : row + n]).items():
                writers[split].add(table)
            row += n
        if row != len(splits):
            raise RuntimeError(f"shards: encoded {row} documents but the clean corpus has {len(splits)}")
        for w in writers.values():
            w.flush()

        manifest = {
            "format": FORMAT,
            "token_column": TOKEN_COLUMN,
            "dtype": str(token_type(vocab_size)),
            "vocab_size": vocab_size,
            "eos_id": int(meta["eos_id"]),
            "bos_id": int(meta["bos_id"]),
            "pad_id": int(meta["pad_id"]),
            "unk_id": int(meta["unk_id"]),
            "tokenizer_sha256": tok_sha,
            "tokenizer_path": os.path.relpath(model_path, paths.root),
            "val_fraction": tok.val_fraction,
            "seed": tok.seed,
            "config": tok.model_dump(mode="json"),
            "clean_fingerprint": clean_fp,
            "splits": {s: writers[s].shards for s in SPLITS},
            "totals": {s: _totals(writers[s].shards) for s in SPLITS},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        shutil.rmtree(tmp / PROGRESS_DIR)
        (tmp / FINGERPRINT_FILE).unlink()
        reused = sum(w.reused for w in writers.values())
        if reused:
            log.info("shards: resumed, kept %d finished shard(s) from an interrupted run", reused)
        if paths.shards.exists():
            shutil.rmtree(paths.shards)
        os.replace(tmp, paths.shards)

    totals = manifest["totals"]
    result = ShardsResult(
        manifest_path=manifest_path,
        train_tokens=totals["train"]["tokens"],
        val_tokens=totals["val"]["tokens"],
        train_docs=totals["train"]["documents"],
        val_docs=totals["val"]["documents"],
        n_shards=totals["train"]["shards"] + totals["val"]["shards"],
        elapsed_s=round(time.monotonic() - start, 3),
    )
    summary = result.to_dict()
    summary.pop("skipped")
    summary["manifest_sha256"] = sha256_file(manifest_path)
    mark_stage_done(paths.shards, fp, summary)
    log.info("shards: %s", summary)
    return result


# --------------------------------------------------------------------------------------------
# Reading (used by pretrain's data loader)


def read_shard_tokens(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(flat token ids, document offsets) of one shard, memory-mapped.

    ``tokens[offsets[i]:offsets[i+1]]`` is document i, ending with ``</s>``. Zero-copy for shards
    written here (one record batch); a multi-batch file from elsewhere is concatenated (copied).
    """
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_stream(source).read_all()
    column = table.column(TOKEN_COLUMN)
    if column.num_chunks == 0:
        dtype = np.uint16 if column.type.value_type == pa.uint16() else np.uint32
        return np.empty(0, dtype=dtype), np.zeros(1, dtype=np.int32)
    lists = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
    offsets = lists.offsets.to_numpy(zero_copy_only=True)
    values = lists.values
    if offsets[0] != 0 or offsets[-1] != len(values):
        # A sliced list array: view just its part of the child and rebase the offsets.
        values = values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
        offsets = offsets - offsets[0]
    return values.to_numpy(zero_copy_only=True), offsets
