"""Shard stage: clean corpus -> token ids (tasks, one SentencePiece per worker) -> Arrow shards.

Each task reads a run of row groups of the clean Parquet parts and encodes them; a document too
big for one task is cut at newlines into pieces encoded by several tasks and joined back. The
driver takes the results in clean order (at most two tasks per CPU ahead of it) and writes the
shards. The tasks run through a ``data_prep.ray_runtime`` runner (``encode_runner`` picks it): a
process pool on this machine for a local corpus under ``LOCAL_POOL_MAX_BYTES`` (no Ray start-up),
else plain Ray tasks wherever the cluster has CPUs; ``LocalRunner`` runs them in process (tests).
Plain tasks, not a Ray Data ``map_batches``: the work is already cut by the Parquet footers and the
results must come back in order, so Ray Data would add only its executor's start-up and background
threads that can outlive ``ray.shutdown()`` after a failed write and end the driver process.

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

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.ray_runtime import UnitRunner, process_pool_runner, ray_runner
from data_prep.tokenizer import EOS_ID, MODEL_FILE, _cpu_count, clean_parts, clean_stage_fingerprint
from pretrain_pipeline.artifacts import RunPaths, atomic_write_json, naming_file, read_json, sha256_file
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.stage import PARTIAL_FINGERPRINT, Stage, completed_record

log = logging.getLogger(__name__)

FORMAT = "arrow-ipc-stream"
TOKEN_COLUMN = "input_ids"
SPLITS = ("train", "val")
PROGRESS_DIR = ".done"  # per-shard completion records inside the work directory
# SentencePiece threads per encode task: each task holds one Ray CPU, so one thread. More would
# let a lone last task use idle cores, but oversubscribes every core while all tasks run (and
# would beat a same-threads baseline only by taking CPU from whatever else shares the node).
ENCODE_THREADS = 1
MAX_TASK_BYTES = 64 << 20  # uncompressed Parquet bytes of text per encode task, at most
MIN_PIECE_BYTES = 1 << 20  # a document is cut into pieces only when larger than this
TASKS_PER_CPU = 2  # each task takes 1/(TASKS_PER_CPU * cpus) of the text not yet assigned
# Encode tasks started ahead of the writer, per CPU: enough to keep every CPU busy while the writer
# works, few enough that a slow writer bounds the encoded tables held in memory.
IN_FLIGHT_PER_CPU = 2
# A corpus smaller than this on a local machine is encoded by a process pool, without Ray: Ray's
# start-up (seconds, tens of them on a loaded machine) then costs more than its one gain, the
# retry of a killed worker (a pool's failure leaves finished shards for the rerun to keep).
LOCAL_POOL_MAX_BYTES = 4 << 30


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

    @classmethod
    def from_manifest(cls, path: Path, **extra: Any) -> "ShardsResult":
        totals = read_json(path)["totals"]
        train, val = totals["train"], totals["val"]
        return cls(path, train["tokens"], val["tokens"], train["documents"], val["documents"],
                   train["shards"] + val["shards"], **extra)


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
# Encoding (Ray tasks)


def token_type(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 65535 else pa.uint32()


def shard_schema(vocab_size: int) -> pa.Schema:
    return pa.schema([(TOKEN_COLUMN, pa.list_(token_type(vocab_size))), ("id", pa.string()), ("n_bytes", pa.int64())])


# SentencePiece processors of this worker process, by (model path, sha256, continuation). Workers
# live across tasks, so each loads the model on its first task and reuses it; the sha256 in the
# key means a retrained model at the same path is never served from a stale entry.
_PROCESSORS: dict[tuple[str, str, bool], Any] = {}


def _processor(model_path: str, model_sha256: str, continuation: bool = False) -> Any:
    """The model's processor; ``continuation=True``: the same model without the dummy prefix
    space, for the pieces of a split document after its first (they continue a line)."""
    key = (model_path, model_sha256, continuation)
    if key not in _PROCESSORS:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        if not continuation:
            _PROCESSORS.clear()  # one model per worker is all a run needs
            _PROCESSORS[key] = spm.SentencePieceProcessor(model_file=model_path)
        else:
            proto = sentencepiece_model_pb2.ModelProto()
            proto.ParseFromString(_processor(model_path, model_sha256).serialized_model_proto())
            proto.normalizer_spec.add_dummy_prefix = False
            _PROCESSORS[key] = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    return _PROCESSORS[key]


def splits_at_newlines(model_path: str | Path) -> bool:
    """Whether a document may be cut after any newline and its pieces encoded apart.

    No piece of the model holds a newline (SentencePiece learns from lines, so none of ours
    does) and the dummy space is a prefix: then merges never cross a newline, and a piece that
    starts a line, encoded without the dummy prefix, gives the ids it has inside the whole text.
    Byte fallback must be on (below).
    """
    from sentencepiece import sentencepiece_model_pb2

    try:
        data = Path(model_path).read_bytes()
    except OSError:
        return False  # the encode tasks fail on it too, each naming its unit
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    # Without byte fallback a run of unknown characters (a newline among them) is one <unk>, and a
    # cut inside the run would make it two.
    return (
        proto.trainer_spec.byte_fallback
        and not proto.trainer_spec.treat_whitespace_as_suffix
        and not any("\n" in p.piece for p in proto.pieces)
    )


def line_cuts(text: str, n_pieces: int) -> list[int]:
    """Character offsets cutting ``text`` into ``n_pieces`` pieces of about equal length, each
    ending just after a newline (or at the end): ``text[cuts[i]:cuts[i + 1]]`` is piece i."""
    cuts = [0]
    for i in range(1, n_pieces):
        at = text.find("\n", max(cuts[-1], len(text) * i // n_pieces))
        cuts.append(len(text) if at < 0 else at + 1)
    return cuts + [len(text)]


def _np_token_type(vocab_size: int) -> type:
    return np.uint16 if token_type(vocab_size) == pa.uint16() else np.uint32


def _encoded_table(values: np.ndarray, offsets: np.ndarray, ids: pa.Array, n_bytes: pa.Array, vocab_size: int) -> pa.Table:
    tokens = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.Table.from_arrays([tokens, ids, n_bytes], schema=shard_schema(vocab_size))


def _token_lists_table(encoded: list[list[int]], ids: pa.Array, n_bytes: pa.Array, vocab_size: int) -> pa.Table:
    # Flat values + offsets straight from the id lists (C-level iteration, no per-document numpy).
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(encoded), dtype=_np_token_type(vocab_size), count=int(offsets[-1]))
    return _encoded_table(values, offsets, ids, n_bytes, vocab_size)


def _read_rows(segment: dict[str, Any]) -> pa.Table:
    part = pq.ParquetFile(segment["part"])
    if "groups" in segment:
        return part.read_row_groups(segment["groups"], columns=["id", "text"])
    table = part.read_row_group(segment["group"], columns=["id", "text"])
    start, end = segment.get("rows") or (segment["row"], segment["row"] + 1)
    return table.slice(start, end - start)


def encode_row_groups(item: str, model_path: str, model_sha256: str, vocab_size: int, num_threads: int) -> list:
    """Task: encode one work item (segments of the clean parts, see ``work_items``).

    A whole-document segment gives a table of the shard schema; a piece of a split document gives
    ``(token ids, (id, n_bytes) on its last piece else None)``, joined back in order by the driver.
    """
    out: list = []
    for segment in json.loads(item):
        table = _read_rows(segment)
        text = table.column("text")
        if "piece" not in segment:
            sp = _processor(model_path, model_sha256)
            # add_eos appends the model's </s>, which the tokenizer stage pins to EOS_ID.
            encoded = sp.encode(text.to_pylist(), add_eos=True, num_threads=num_threads)
            n_bytes = pc.binary_length(text).cast(pa.int64()).combine_chunks()
            out.append(_token_lists_table(encoded, table.column("id").combine_chunks(), n_bytes, vocab_size))
            continue
        doc, i, n = text[0].as_py(), segment["piece"], segment["of"]
        cuts = line_cuts(doc, n)
        ids = _processor(model_path, model_sha256, continuation=i > 0).encode(doc[cuts[i] : cuts[i + 1]], add_eos=i == n - 1)
        last = (table.column("id")[0].as_py(), len(doc.encode("utf-8"))) if i == n - 1 else None
        out.append((np.asarray(ids, dtype=_np_token_type(vocab_size)), last))
    return out


def _row_groups(parts: list[Path]) -> list[tuple[str, int, int, int]]:
    """(part, row group, uncompressed bytes, rows) of every row group, in clean order."""
    return [
        (str(p), g, meta.row_group(g).total_byte_size, meta.row_group(g).num_rows)
        for p in parts
        for meta in [pq.ParquetFile(p).metadata]
        for g in range(meta.num_row_groups)
    ]


def _segments(groups: list[tuple[str, int, int, int]], piece_bytes: int) -> Iterator[tuple[dict[str, Any], int]]:
    """(segment, bytes) in clean order: whole row groups, except that a row group over
    ``piece_bytes`` is looked into and a document over ``piece_bytes`` in it cut into pieces."""
    for part, g, n, rows in groups:
        if not piece_bytes or n <= piece_bytes:
            yield {"part": part, "groups": [g]}, n
            continue
        text = pq.ParquetFile(part).read_row_group(g, columns=["text"]).column("text")
        sizes = pc.binary_length(text).to_numpy()
        start = 0
        for row in np.flatnonzero(sizes > piece_bytes).tolist() + [rows]:
            if row > start:
                yield {"part": part, "group": g, "rows": [start, row]}, int(sizes[start:row].sum())
            if row < rows:
                of = -(-int(sizes[row]) // piece_bytes)
                for i in range(of):
                    yield {"part": part, "group": g, "row": row, "piece": i, "of": of}, int(sizes[row]) // of
            start = row + 1


def work_items(parts: list[Path], cpus: int, split_documents: bool = True) -> list[str]:
    """Segments of the clean parts grouped into encode tasks ("guided" sizes), in clean order.

    Each task costs a scheduling round trip that leaves its core idle, so tasks are large: each
    takes 1/``TASKS_PER_CPU * cpus`` of the text still unassigned (at most ``MAX_TASK_BYTES``).
    Sizes shrink towards the end, so the cores finish close together instead of one waiting on a
    big last task; for the same reason a document larger than an eighth of a CPU's share is cut
    at newlines into pieces, each a task of its own. Sizes come from the Parquet footers (a
    row group is read only when it is larger than a piece). An item is a JSON list of segments.
    """
    groups = _row_groups(parts)
    remaining = sum(n for _, _, n, _ in groups)
    piece_bytes = max(MIN_PIECE_BYTES, min(MAX_TASK_BYTES, remaining // (8 * cpus))) if split_documents else 0
    items: list[list[dict]] = []
    size = target = 0
    for segment, n in _segments(groups, piece_bytes):
        if size >= target or "piece" in segment or (items and "piece" in items[-1][-1]):
            items.append([])
            size, target = 0, min(MAX_TASK_BYTES, remaining // (TASKS_PER_CPU * cpus))
        last = items[-1][-1] if items[-1] else {}
        if "groups" in segment and "groups" in last and last["part"] == segment["part"]:
            last["groups"] += segment["groups"]  # consecutive row groups of a part: one read
        else:
            items[-1].append(segment)
        size += n
        remaining -= n
    return [json.dumps(item) for item in items]


def _row_group_rows(part: Path) -> list[int]:
    meta = pq.ParquetFile(part).metadata
    return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def encode_parts(parts: list[Path], model_path: str, model_sha256: str, vocab_size: int, runner: UnitRunner) -> Iterator[pa.Table]:
    """The clean parts encoded, one table per row group, in clean order.

    The tasks cut the corpus by the CPUs there are; the tables are cut back to row groups, so what
    the writers see (and the shards they write) depends on the corpus alone. Close the iterator
    while the runner's Ray is up: that cancels the tasks not yet consumed.
    """
    items = work_items(parts, runner.cpus(), split_documents=splits_at_newlines(model_path))
    encoded = runner.map(
        encode_row_groups,
        items,
        shared=(model_path, model_sha256, vocab_size, ENCODE_THREADS),
        describe=_describe_item,
        desc="tokenize",
        window=IN_FLIGHT_PER_CPU * runner.cpus(),
    )
    with contextlib.closing(encoded):
        tables = _joined(itertools.chain.from_iterable(encoded), vocab_size)
        yield from _per_row_group(tables, [n for part in parts for n in _row_group_rows(part)])


def _joined(results: Iterator[Any], vocab_size: int) -> Iterator[pa.Table]:
    """Tables as they come; the pieces of a split document joined back into its one-row table."""
    pieces: list[np.ndarray] = []
    for result in results:
        if isinstance(result, pa.Table):
            yield result
            continue
        ids, last = result
        pieces.append(ids)
        if last is not None:
            doc_id, n_bytes = last
            values = np.concatenate(pieces)
            offsets = np.array([0, len(values)], dtype=np.int32)
            yield _encoded_table(values, offsets, pa.array([doc_id], pa.string()), pa.array([n_bytes], pa.int64()), vocab_size)
            pieces = []


def _describe_item(item: str) -> str:
    def where(s: dict[str, Any]) -> str:
        if "groups" in s:
            return f"{s['part']} row groups {s['groups'][0]}-{s['groups'][-1]}"
        if "rows" in s:
            return f"{s['part']} row group {s['group']} rows {s['rows'][0]}-{s['rows'][1] - 1}"
        return f"{s['part']} row group {s['group']} row {s['row']} piece {s['piece'] + 1}/{s['of']}"

    return "shards: encoding " + "; ".join(where(s) for s in json.loads(item))


def _per_row_group(blocks: Iterator[pa.Table], sizes: list[int]) -> Iterator[pa.Table]:
    """Re-cut an ordered stream of tables into consecutive tables of ``sizes`` rows (zero-copy
    slices); rows beyond ``sum(sizes)`` come out as one more table, for the caller's count check."""
    want = iter(sizes)
    pending: list[pa.Table] = []
    have = 0
    need = next(want, None)
    for block in blocks:
        start = 0
        while need is not None and block.num_rows - start >= need - have:
            pending.append(block.slice(start, need - have))
            start += need - have
            yield pending[0] if len(pending) == 1 else pa.concat_tables(pending)
            pending, have, need = [], 0, next(want, None)
        if start < block.num_rows:
            pending.append(block.slice(start))
            have += block.num_rows - start
    if pending:
        yield pa.concat_tables(pending)


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
        # Serialise in memory, then hash and write the same buffer: the shard is hashed without
        # reading it back from disk.
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self.schema) as writer:
            for batch in table.to_batches(max_chunksize=table.num_rows):
                writer.write_batch(batch)
        data = memoryview(sink.getvalue())
        tmp = path.with_name(f".{name}.tmp")
        try:
            with naming_file(path), open(tmp, "wb") as f:
                f.write(data)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not stay full of half a shard
            raise
        os.replace(tmp, path)
        self.shards.append(
            {
                "file": name,
                "tokens": int(pc.sum(pc.list_value_length(table.column(TOKEN_COLUMN))).as_py()),
                "documents": table.num_rows,
                "bytes": len(data),
                "text_bytes": int(pc.sum(table.column("n_bytes")).as_py()),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        # The completion record is written after the rename: a record always names a whole shard.
        atomic_write_json(self.out_dir / PROGRESS_DIR / f"{name}.json", self.shards[-1])


def _split_table(table: pa.Table, is_val: np.ndarray) -> dict[str, pa.Table]:
    mask = pa.array(is_val, type=pa.bool_())
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


def _split_of_every_document(parts: list[Path], seed: int, val_fraction: float) -> tuple[pa.Array, np.ndarray]:
    """(clean ids in order, val mask): from the ids alone, so the empty-split fallback sees the
    whole corpus while the encoding streams."""
    ids = _clean_ids(parts)
    splits = assign_splits(ids, seed, val_fraction)
    return pa.array(ids, type=pa.string()), np.array([s == "val" for s in splits], dtype=bool)


def _finished_shards(work: Path) -> dict[str, dict[str, Any]]:
    """Completion records of the shards an interrupted run left in ``work`` (the stage's resumable
    output, so the same fingerprint); any other file there, unrecorded or half-written, is removed."""
    (work / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    records = {p.name[: -len(".json")]: read_json(p) for p in (work / PROGRESS_DIR).glob("*.arrow.json")}
    for stray in work.iterdir():
        if stray.is_file() and stray.name not in records and stray.name != PARTIAL_FINGERPRINT:
            stray.unlink()
    return records


def _tokenizer_model(paths: RunPaths) -> tuple[Path, dict[str, Any]]:
    """The tokenizer stage's model and its meta.json, the model checked against the meta."""
    completed_record(paths.tokenizer, "tokenizer")
    meta = read_json(paths.tokenizer / "meta.json")
    model_path = paths.tokenizer / MODEL_FILE
    sha = sha256_file(model_path)
    if sha != meta["sha256"]:
        raise ValueError(f"{model_path}: sha256 {sha[:12]} does not match meta.json ({meta['sha256'][:12]})")
    if int(meta["eos_id"]) != EOS_ID:
        raise ValueError(f"{paths.tokenizer / 'meta.json'}: eos_id {meta['eos_id']}, expected {EOS_ID}; retrain the tokenizer")
    return model_path, meta


def _manifest(cfg: PipelineConfig, paths: RunPaths, meta: dict[str, Any], clean_fp: str, shards: dict[str, list]) -> dict[str, Any]:
    """What the training loader reads: the shards per split, their token type and the tokenizer."""
    tok = cfg.tokenizer
    return {
        "format": FORMAT,
        "token_column": TOKEN_COLUMN,
        "dtype": str(token_type(int(meta["vocab_size"]))),
        "vocab_size": int(meta["vocab_size"]),
        "eos_id": int(meta["eos_id"]),
        "bos_id": int(meta["bos_id"]),
        "pad_id": int(meta["pad_id"]),
        "unk_id": int(meta["unk_id"]),
        "tokenizer_sha256": meta["sha256"],
        "tokenizer_path": os.path.relpath(paths.tokenizer / MODEL_FILE, paths.root),
        "val_fraction": tok.val_fraction,
        "seed": tok.seed,
        "config": tok.model_dump(mode="json"),
        "clean_fingerprint": clean_fp,
        "splits": shards,
        "totals": {s: _totals(shards[s]) for s in SPLITS},
    }


@contextlib.contextmanager
def encode_runner(cfg: PipelineConfig, paths: RunPaths) -> Iterator[UnitRunner]:
    """Where the encode tasks run: the Ray this process has joined, the configured cluster, or a
    local Ray for a big corpus; else a process pool, whose workers start now (and warm up while
    the tokenizer trains, when the caller opens this first)."""
    ray = sys.modules.get("ray")  # not imported here when nothing else has
    on_ray = cfg.runtime.ray_address or (ray is not None and ray.is_initialized())
    if not on_ray:
        groups = _row_groups(sorted(paths.clean.glob("part-*.parquet")))
        on_ray = sum(n for _, _, n, _ in groups) >= LOCAL_POOL_MAX_BYTES
    if on_ray:
        with ray_runner(cfg.runtime) as runner:
            yield runner
    else:
        with process_pool_runner(cfg.runtime.num_cpus or _cpu_count(), preload=(__name__, "sentencepiece")) as runner:
            yield runner


def write_shards(cfg: PipelineConfig, paths: RunPaths, force: bool = False, runner: UnitRunner | None = None) -> ShardsResult:
    """Encode the clean corpus into shards on ``runner`` (by default ``encode_runner``'s)."""
    start = time.monotonic()
    tok = cfg.tokenizer
    parts = clean_parts(paths)
    clean_fp = clean_stage_fingerprint(paths)
    model_path, meta = _tokenizer_model(paths)
    tok_sha = meta["sha256"]
    stage = Stage("shards", paths.shards, tok.model_dump(mode="json"), tok_sha, clean_fp, force=force)
    manifest_path = paths.shards / "manifest.json"
    if stage.current() and manifest_path.exists():
        log.info("shards: tokenizer, corpus and settings unchanged, skipping (%s)", paths.shards)
        return ShardsResult.from_manifest(manifest_path, skipped=True)

    vocab_size = int(meta["vocab_size"])
    schema = shard_schema(vocab_size)
    target_bytes = int(tok.shard_size_mb * (1 << 20))

    # Finished shards are recorded in the resumable output, so a rerun with the same fingerprint
    # writes only the missing ones (it re-encodes, which is deterministic, to find the boundaries).
    given = contextlib.nullcontext(runner) if runner else encode_runner(cfg, paths)
    with stage.outputs(paths.shards, resumable=True) as (tmp,), given as runner, ThreadPoolExecutor(1) as side:
        # Decided on a side thread while the first encode tasks run.
        split_of = side.submit(_split_of_every_document, parts, tok.seed, tok.val_fraction)
        finished = _finished_shards(tmp)
        writers = {s: ShardWriter(tmp, s, schema, target_bytes, finished) for s in SPLITS}
        row = 0
        # A shard closes at the first row group that fills it, so its boundaries (and bytes)
        # depend on the corpus alone.
        batches = encode_parts(parts, str(model_path.resolve()), tok_sha, vocab_size, runner)
        # Closed here, error or not, while Ray is up: its tasks are cancelled now, not when garbage
        # collection gets to it after ray.shutdown() (a Ray call then ends the whole process).
        with contextlib.closing(batches):
            for batch in batches:
                clean_ids, is_val = split_of.result()
                n = batch.num_rows
                if not batch.column("id").equals(pa.chunked_array([clean_ids.slice(row, n)])):
                    raise RuntimeError(f"shards: encode tasks returned documents out of clean order near row {row}")
                for split, table in _split_table(batch, is_val[row : row + n]).items():
                    writers[split].add(table)
                row += n
        if row != len(split_of.result()[1]):
            raise RuntimeError(f"shards: encoded {row} documents but the clean corpus has {len(split_of.result()[1])}")
        for w in writers.values():
            w.flush()

        atomic_write_json(tmp / "manifest.json", _manifest(cfg, paths, meta, clean_fp, {s: writers[s].shards for s in SPLITS}))
        shutil.rmtree(tmp / PROGRESS_DIR)
        reused = sum(w.reused for w in writers.values())
        if reused:
            log.info("shards: resumed, kept %d finished shard(s) from an interrupted run", reused)

    result = ShardsResult.from_manifest(manifest_path, elapsed_s=round(time.monotonic() - start, 3))
    stage.done({**result.to_dict(), "manifest_sha256": sha256_file(manifest_path)})
    log.info("shards: %s", result)
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
