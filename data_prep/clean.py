"""Clean stage: raw files -> repaired, filtered, deduplicated Parquet (Ray tasks).

    files ─(one Ray task per file, or per part of a big one)→ read, repair, language, filters,
          PII, MinHash band keys → clean/_work/<task key>.parquet + .keys.parquet + .done.json
    keys  ─one Ray task per key range→ edges (first copy, other copy) per equal key    (the shuffle)
    edges ─driver union-find→ exact / near-duplicate drops → sorted Parquet parts + stats

With fewer input files than CPUs every CPU still gets work: plain jsonl and Parquet files are cut
into parts of about ``1/cpus`` of the input, and a compressed jsonl file, which cannot be cut, is
read once by the driver (``readers.line_batches``) whose line batches are cleaned as units while
it reads on (``data.clean_batch_mb``); either way rows keep their file's line numbers, so the
outputs are those of one task per file.

Both task kinds are units handed to a ``data_prep.ray_runtime`` runner: plain Ray tasks, so a local
Ray and a multi-node cluster run the same code, or in process under ``LocalRunner`` (tests).
Not Ray Data: the unit of work is an input file (or a part of it: plain jsonl files bigger than
``data.clean_task_mb`` are cut at line starts, Parquet files at row groups, so one big file uses
every core) read by our own readers, whose quarantine rows need file and line numbers; a Ray
Data pipeline would only wrap those tasks and add its streaming executor's start-up cost.

A rerun after a crash finds the ``.done.json`` of every finished task and redoes only the others;
the shuffle and the final write are cheap next to stage 1. The final directory replaces
``clean/`` atomically, which also removes ``_work/``.

Output ``clean/``::

    part-00000.parquet …   kept documents in (source, line) order: id, text, source, line,
                           n_chars, n_words, language, language_score
    dropped.parquet        id, source, line, drop_reason, score (the filter's measured value,
                           when it has one), excerpt (the first data.dropped_excerpt_chars)
    quarantine.jsonl       records the readers could not parse: source, line, reason, excerpt
    stats.json             counts per reason and per file, languages, PII, length histogram
    _SUCCESS.json          fingerprint + summary; a rerun with the same inputs and config is skipped

Same inputs and ``data`` config give byte-identical files: rows are sorted before writing, the
kept copy of a duplicate cluster is the first in (source, line) order, no file holds a timestamp.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq

from data_prep.benchmarks import benchmark_ngrams
from data_prep.cleaner import PII_KINDS, clean_batch
from data_prep.filters import BenchmarkNgrams
from data_prep.minhash import EDGES_SCHEMA, KEYS_ROW_GROUP, KEYS_SCHEMA, MinHasher, duplicates_from_edges, edges_of_range, key_rows, ordinal
from data_prep.readers import BLANK_LINES, JSONL_SUFFIXES, FilePart, LineBatch, expand_inputs, line_batches, read_batch, read_file, split_file
from data_prep.ray_runtime import UnitRunner, ray_runner
from pretrain_pipeline.artifacts import (
    RunPaths,
    atomic_path,
    atomic_write_json,
    fingerprint,
    naming_file,
    read_json,
    sha256_file,
)
from pretrain_pipeline.config import DataConfig, PipelineConfig
from pretrain_pipeline.stage import Stage

log = logging.getLogger(__name__)

# Files up to this size are identified by content hash (a rebuilt but identical file is still
# "the same input"); bigger ones by size + mtime, so a huge corpus is not re-read just to hash it.
_HASH_INPUTS_UP_TO = 1 << 30
_READ_CHUNK_ROWS = 5_000
# Row groups of the clean parts are the unit of work of the shard stage's encoders.
ROW_GROUP_DOCS = 1000
# Rows of (ord, kind, key) per shuffle partition: bounds the memory of one edges task.
_ROWS_PER_PARTITION = 2_000_000
WORK_DIR = "_work"
_DROPPED_ROW_GROUP = 65536

WORK_SCHEMA = pa.schema(
    [
        ("ord", pa.uint64()),
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("quarantine", pa.string()),
        ("excerpt", pa.string()),
        ("drop_reason", pa.string()),
        ("drop_score", pa.float64()),
        ("n_chars", pa.int64()),
        ("n_words", pa.int64()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
        *[(f"pii_{k}", pa.int64()) for k in PII_KINDS],
    ]
)
KEPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("n_chars", pa.int64()),
        ("n_words", pa.int64()),
        ("language", pa.string()),
        ("language_score", pa.float64()),
    ]
)
DROPPED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("drop_reason", pa.string()),
        ("score", pa.float64()),
        ("excerpt", pa.string()),
    ]
)
# Bins of the word-count histogram in stats.json (the report plots it).
_HIST_EDGES = [0, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]


@dataclass
class CleanResult:
    output_dir: Path
    docs_in: int
    kept: int
    dropped: dict[str, int]
    quarantined: int
    fingerprint: str
    skipped: bool = False
    parts: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0
    tasks: int = 0
    tasks_reused: int = 0
    skipped_blank_lines: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["output_dir"] = str(self.output_dir)
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "CleanResult":
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        fields["output_dir"] = Path(fields["output_dir"])
        return cls(**{**fields, "skipped": True})


# --------------------------------------------------------------------------------------------
# Inputs


def sample_corpus_path(paths: RunPaths) -> Path:
    return paths.clean.parent / "raw" / "sample.jsonl"


def _ensure_sample_corpus(cfg: DataConfig, paths: RunPaths, seed: int) -> Path:
    """Build the stdlib sample corpus once per (size, seed, Python); reuse it otherwise."""
    from data_prep.sample_corpus import build_sample_corpus

    out = sample_corpus_path(paths)
    meta_path = out.with_suffix(".meta.json")
    meta = {"max_docs": cfg.sample_corpus_max_docs, "seed": seed, "python": sys.version}
    if out.exists() and meta_path.exists() and read_json(meta_path).get("params") == meta:
        return out
    n = build_sample_corpus(out, cfg.sample_corpus_max_docs, seed=seed)
    atomic_write_json(meta_path, {"params": meta, "documents": n, "sha256": sha256_file(out)})
    log.info("built sample corpus: %d documents -> %s", n, out)
    return out


def resolve_inputs(cfg: PipelineConfig, paths: RunPaths) -> list[Path]:
    if cfg.data.sample_corpus:
        return [_ensure_sample_corpus(cfg.data, paths, cfg.runtime.seed)]
    # Sorted as strings: the (source, line) order of the outputs and the dedup ordinals agree.
    return sorted(expand_inputs(cfg.data.inputs), key=str)


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    if st.st_size <= _HASH_INPUTS_UP_TO:
        return [str(path), st.st_size, sha256_file(path)]
    return [str(path), st.st_size, st.st_mtime_ns]


def _stage1_config(cfg: DataConfig) -> dict[str, Any]:
    # Settings that only the final write reads do not invalidate finished work. The dedup
    # switches are not among them: stage 1 writes the exact and MinHash keys. The task size is
    # not either: a task's key names its part of the file (or its lines).
    final_write = {"documents_per_shard", "inputs", "clean_task_mb", "clean_batch_mb", "dropped_excerpt_chars"}
    return cfg.model_dump(mode="json", exclude=final_write)


@dataclass(frozen=True)
class WorkUnit:
    """One stage-1 task: an input file, or one part of a big one (``part``), or one batch of lines
    the driver read from a streamed file (``batch``). A ``stream`` unit is a whole file the driver
    reads and hands out as batch units (``clean_files``)."""

    path: str
    file_index: int
    part: FilePart | None
    key: str  # names its work files: the file's identity and place, the part, the config
    size: int  # bytes, about: big tasks are started first
    stream: bool = False
    batch: LineBatch | None = None

    def describe(self) -> str:
        where = f" ({self.part})" if self.part else ""
        if self.batch:
            where = f" (lines {self.batch.first_line}-{self.batch.first_line + self.batch.n_lines - 1})"
        return f"clean: cleaning {self.path}{where}"


def plan_work(
    cfg: DataConfig, files: list[Path], identities: list[list[Any]], benchmarks_sha: str | None = None, cpus: int = 1
) -> list[WorkUnit]:
    """The stage-1 tasks in (file, part) order, which is the order of the outputs; ``benchmarks_sha``
    (the decontamination texts' hash) names them too, so edited task data redoes finished units.

    Files bigger than ``clean_task_mb`` are cut into parts. With fewer files than ``cpus`` (and
    ``clean_batch_mb`` > 0) the parts are smaller, about 1/cpus of the input but not under
    ``clean_batch_mb``, and compressed jsonl files are streamed, so that every CPU gets work."""
    stage1 = _stage1_config(cfg)
    target = max(1, int(cfg.clean_task_mb * 2**20))
    spread = cfg.clean_batch_mb > 0 and len(files) < cpus
    if spread:
        total = sum(p.stat().st_size for p in files)
        target = min(target, max(int(cfg.clean_batch_mb * 2**20), -(-total // cpus)))
    units = []
    for i, (path, identity) in enumerate(zip(files, identities)):
        stream = spread and path.name.endswith(JSONL_SUFFIXES) and path.name.endswith((".gz", ".zst"))
        parts = [None] if stream else split_file(path, target)
        size = path.stat().st_size // len(parts)
        for part in parts:
            key = fingerprint("clean-file", stage1, i, identity, part and asdict(part), *filter(None, [benchmarks_sha]))[:32]
            units.append(WorkUnit(str(path), i, part, key, size, stream=stream))
    return units


# --------------------------------------------------------------------------------------------
# Stage 1: one Ray task per work unit (module-level so workers import it, not unpickle a closure)


def _work_paths(work_dir: Path, key: str) -> tuple[Path, Path, Path]:
    return work_dir / f"{key}.parquet", work_dir / f"{key}.keys.parquet", work_dir / f"{key}.done.json"


def _unit_done(work_dir: Path, key: str) -> bool:
    return _work_paths(work_dir, key)[2].exists()


def _unit_keys(work_dir: Path, unit: WorkUnit) -> list[str]:
    """The keys of a finished unit's work files: its own, or its batches' for a streamed file."""
    return read_json(_work_paths(work_dir, unit.key)[2]).get("batches") or [unit.key]


def clean_unit(unit: WorkUnit, work_dir: str, cfg: DataConfig, benchmarks: BenchmarkNgrams | None = None) -> dict[str, Any]:
    """Read, clean and hash one file (or part, or batch) into its work files; the ``.done.json`` is written last."""
    path, file_index = unit.path, unit.file_index
    work, keys_path, done = _work_paths(Path(work_dir), unit.key)
    hasher = MinHasher(cfg.minhash_ngram, cfg.minhash_bands, cfg.minhash_rows, cfg.minhash_seed) if cfg.minhash_dedup else None
    n = 0
    skipped: Counter = Counter()
    if unit.batch is not None:
        read = read_batch(path, unit.batch, cfg.text_field, cfg.id_field, skipped)
    else:
        read = read_file(path, cfg.text_field, cfg.id_field, unit.part, skipped)
    # Temp names + rename: a crash mid-file leaves nothing that looks finished.
    with atomic_path(work) as tmp_work, atomic_path(keys_path) as tmp_keys:
        keys: list[pa.Table] = []
        with naming_file(tmp_work), pq.ParquetWriter(tmp_work, WORK_SCHEMA, compression="zstd") as w:
            rows: list[dict[str, Any]] = []
            for row in read:
                rows.append(row)
                if len(rows) >= _READ_CHUNK_ROWS:
                    n += _clean_chunk(rows, file_index, cfg, hasher, w, keys, benchmarks)
                    rows = []
            if rows:
                n += _clean_chunk(rows, file_index, cfg, hasher, w, keys, benchmarks)
        # The map side of the shuffle: this file's key rows sorted by key, so each reduce task
        # reads only the row groups of its key range (17 bytes a row; 15 rows a document).
        table = pa.concat_tables(keys) if keys else KEYS_SCHEMA.empty_table()
        table = table.take(pa.compute.sort_indices(table, sort_keys=[("key", "ascending"), ("ord", "ascending")]))
        with naming_file(tmp_keys):
            pq.write_table(table, tmp_keys, row_group_size=KEYS_ROW_GROUP, write_statistics=True)
    atomic_write_json(done, {"source": path, "rows": n, "blank_lines": skipped[BLANK_LINES]})
    return {"path": path, "rows": n}


def _clean_chunk(rows: list[dict[str, Any]], file_index: int, cfg: DataConfig, hasher: MinHasher | None, w, keys: list,
                 benchmarks: BenchmarkNgrams | None = None) -> int:
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    out = clean_batch(batch, cfg, benchmarks)
    out["ord"] = [ordinal(file_index, line) for line in out["line"]]
    w.write_table(pa.Table.from_pydict({k: out[k] for k in WORK_SCHEMA.names}, schema=WORK_SCHEMA))
    live = [i for i, (q, r) in enumerate(zip(out["quarantine"], out["drop_reason"])) if q is None and r is None]
    keys.append(
        key_rows(
            [out["ord"][i] for i in live],
            [out["text_hash"][i] if cfg.exact_dedup else "" for i in live],
            [out["text"][i] for i in live],
            hasher,
        )
    )
    return len(rows)


def _edges_task(key_range: tuple[int, int | None], paths: list[str]) -> pa.Table:
    return edges_of_range(paths, *key_range)


def _describe_key_range(key_range: tuple[int, int | None]) -> str:
    lo, hi = key_range
    return f"clean: finding duplicates among keys {lo:#018x}-{(1 << 64) if hi is None else hi:#018x}"


def clean_files(todo: list[WorkUnit], work_dir: Path, cfg: DataConfig, runner: UnitRunner, benchmarks: BenchmarkNgrams | None = None) -> None:
    """Stage 1: one task per unfinished work unit, biggest first (the longest task starts first,
    so the last one to finish is a short one), taken as they finish so a failure stops at once.

    Streamed files follow: the driver reads each once and its batches are started as earlier
    tasks finish (two per CPU in flight), so its text is never all in memory. A streamed file's
    ``.done.json`` lists its batches; it is written when all of them are done."""
    order = sorted((u for u in todo if not u.stream), key=lambda u: -u.size)
    streamed = [u for u in todo if u.stream]
    batch_keys: dict[str, list[str]] = {u.key: [] for u in streamed}
    units = itertools.chain(order, *(_batch_units(u, work_dir, cfg, batch_keys[u.key]) for u in streamed))
    window = 2 * runner.cpus() if streamed else None
    shared = (str(work_dir), cfg, benchmarks)
    for _ in runner.map(clean_unit, units, shared=shared, describe=WorkUnit.describe, desc="clean", ordered=False, window=window):
        pass
    for unit in streamed:
        records = [read_json(_work_paths(work_dir, key)[2]) for key in batch_keys[unit.key]]
        rows, blank = sum(r["rows"] for r in records), sum(r["blank_lines"] for r in records)
        atomic_write_json(_work_paths(work_dir, unit.key)[2], {"source": unit.path, "rows": rows, "blank_lines": blank, "batches": batch_keys[unit.key]})


def _batch_units(unit: WorkUnit, work_dir: Path, cfg: DataConfig, keys: list[str]) -> Iterator[WorkUnit]:
    """The batch units of a streamed file, read here, in the driver, as they are asked for; ``keys``
    collects every batch's key. A batch an interrupted run finished is not cleaned again: its key
    names the file, the config and its lines."""
    for batch in line_batches(unit.path, max(1, int(cfg.clean_batch_mb * 2**20))):
        key = fingerprint(unit.key, batch.first_line, batch.n_lines)[:32]
        keys.append(key)
        if not _unit_done(work_dir, key):
            yield WorkUnit(unit.path, unit.file_index, None, key, len(batch.data), batch=batch)


# --------------------------------------------------------------------------------------------
# Driver side: write


def _write_parquet(table: pa.Table, path: Path) -> None:
    # Fixed writer options: with the same rows, the bytes are the same.
    with naming_file(path):
        pq.write_table(table, path, row_group_size=ROW_GROUP_DOCS, compression="zstd", write_statistics=True, store_schema=True)


def _histogram(n_words: np.ndarray) -> list[dict[str, Any]]:
    edges = [*_HIST_EDGES, max(_HIST_EDGES[-1] + 1, int(n_words.max()) + 1 if len(n_words) else 0)]
    counts, _ = np.histogram(n_words, bins=edges)
    return [{"min_words": int(lo), "max_words": int(hi), "documents": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)]


class _Writer:
    """Streams kept rows into parts of ``documents_per_shard`` and dropped rows into one file,
    one input file at a time, so the driver never holds the corpus."""

    def __init__(self, out_dir: Path, cfg: DataConfig) -> None:
        self.out_dir, self.cfg = out_dir, cfg
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.parts: list[str] = []
        self.dropped = pq.ParquetWriter(out_dir / "dropped.parquet", DROPPED_SCHEMA, compression="zstd", store_schema=True)
        self.dropped_buffer: list[pa.Table] = []
        self.quarantine = open(out_dir / "quarantine.jsonl", "w", encoding="utf-8")

    def add_quarantined(self, quarantined: pd.DataFrame) -> None:
        with naming_file(self.out_dir / "quarantine.jsonl"):
            for rec in quarantined[["source", "line", "quarantine", "excerpt"]].itertuples(index=False):
                row = {"source": rec.source, "line": int(rec.line), "reason": rec.quarantine, "excerpt": rec.excerpt}
                self.quarantine.write(json.dumps(row, ensure_ascii=False) + "\n")

    def add(self, kept: pa.Table) -> None:
        self.buffer.append(kept)
        self.buffered += kept.num_rows
        while self.buffered >= self.cfg.documents_per_shard:
            self._flush(self.cfg.documents_per_shard)

    def add_dropped(self, dropped: pa.Table) -> None:
        # Row groups of a fixed size, so the file's bytes do not depend on how inputs were split into tasks.
        self.dropped_buffer.append(dropped)
        if sum(t.num_rows for t in self.dropped_buffer) >= _DROPPED_ROW_GROUP:
            table = pa.concat_tables(self.dropped_buffer).combine_chunks()
            full = table.num_rows - table.num_rows % _DROPPED_ROW_GROUP
            with naming_file(self.out_dir / "dropped.parquet"):
                self.dropped.write_table(table.slice(0, full), row_group_size=_DROPPED_ROW_GROUP)
            self.dropped_buffer = [table.slice(full)]

    def _flush(self, n: int) -> None:
        table = pa.concat_tables(self.buffer).combine_chunks()
        name = f"part-{len(self.parts):05d}.parquet"
        _write_parquet(table.slice(0, n), self.out_dir / name)
        self.parts.append(name)
        rest = table.slice(n)
        self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)
        rest = pa.concat_tables([DROPPED_SCHEMA.empty_table(), *self.dropped_buffer])
        with naming_file(self.out_dir / "dropped.parquet"):
            if rest.num_rows:
                self.dropped.write_table(rest.combine_chunks(), row_group_size=_DROPPED_ROW_GROUP)
            self.dropped.close()
        with naming_file(self.out_dir / "quarantine.jsonl"):
            self.quarantine.close()


def _read_work(path: Path, drops: dict[int, str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """One work file's rows in line order, as (kept, dropped by a filter or as a duplicate, quarantined)."""
    df = pq.read_table(path).to_pandas().sort_values("line", kind="stable")
    dup = df["ord"].map(drops)
    df["drop_reason"] = df["drop_reason"].where(df["drop_reason"].notna(), dup)
    is_q = df["quarantine"].notna()
    is_dropped = ~is_q & df["drop_reason"].notna()
    return df[~is_q & ~is_dropped], df[is_dropped], df[is_q]


def _dropped_table(dropped: pd.DataFrame, excerpt_chars: int) -> pa.Table:
    # The text of a dropped document is as the filter that dropped it got it (data_prep.cleaner).
    rows = dropped.assign(score=dropped["drop_score"], excerpt=dropped["text"].str.slice(0, excerpt_chars))
    return pa.Table.from_pandas(rows[DROPPED_SCHEMA.names], schema=DROPPED_SCHEMA, preserve_index=False)


def _write_outputs(units: list[WorkUnit], work_dir: Path, drops: dict[int, str], out_dir: Path, cfg: DataConfig, fp: str,
                   benchmarks: BenchmarkNgrams | None = None) -> dict[str, Any]:
    writer = _Writer(out_dir, cfg)
    reasons: Counter = Counter()
    q_reasons: Counter = Counter()
    languages: Counter = Counter()
    pii: Counter = Counter()
    per_file: dict[str, Counter] = {}
    n_words_kept: list[np.ndarray] = []
    totals = Counter()
    for unit, key in ((u, k) for u in units for k in _unit_keys(work_dir, u)):
        blank = read_json(_work_paths(work_dir, key)[2]).get("blank_lines", 0)
        kept, dropped, quarantined = _read_work(_work_paths(work_dir, key)[0], drops)
        writer.add(pa.Table.from_pandas(kept[KEPT_SCHEMA.names], schema=KEPT_SCHEMA, preserve_index=False))
        writer.add_dropped(_dropped_table(dropped, cfg.dropped_excerpt_chars))
        writer.add_quarantined(quarantined)
        reasons.update(dropped["drop_reason"])
        q_reasons.update(quarantined["quarantine"])
        languages.update(kept["language"])
        for kind in PII_KINDS:
            pii[kind] += int(kept[f"pii_{kind}"].sum())
        counts = {"docs_in": len(kept) + len(dropped) + len(quarantined), "kept": len(kept), "dropped": len(dropped), "quarantined": len(quarantined)}
        per_file.setdefault(unit.path, Counter()).update(**counts, blank_lines=blank)
        n_words_kept.append(kept["n_words"].to_numpy())
        totals.update(**counts, blank_lines=blank, kept_chars=int(kept["n_chars"].sum()), kept_words=int(kept["n_words"].sum()))
    writer.close()
    stats = {
        "docs_in": totals["docs_in"],
        "kept": totals["kept"],
        "dropped": dict(sorted(reasons.items())),
        "quarantined": totals["quarantined"],
        "quarantine_reasons": dict(sorted(q_reasons.items())),
        # Blank and whitespace-only lines: no record, so lines in = docs_in + skipped_blank_lines.
        "skipped_blank_lines": totals["blank_lines"],
        "kept_chars": totals["kept_chars"],
        "kept_words": totals["kept_words"],
        "kept_languages": dict(sorted(languages.items())),
        "pii_redacted": dict(sorted(pii.items())),
        **({"contamination": _contamination_stats(benchmarks, reasons)} if benchmarks else {}),
        "per_file": {path: {k: c[k] for k in ("docs_in", "kept", "dropped", "quarantined", "blank_lines")} for path, c in per_file.items()},
        "length_histogram": _histogram(np.concatenate(n_words_kept) if n_words_kept else np.zeros(0, dtype=np.int64)),
        "parts": writer.parts,
        "input_fingerprint": fp,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


def _contamination_stats(benchmarks: BenchmarkNgrams, reasons: Counter) -> dict[str, Any]:
    """Per task: documents dropped as ``contamination:<task>`` and the distinct n-grams indexed."""
    return {
        "ngram": benchmarks.n,
        "texts_sha256": benchmarks.sha256,
        "documents": {task: reasons.get(f"contamination:{task}", 0) for task in benchmarks.tasks},
        "ngrams": dict(benchmarks.ngrams_per_task),
    }


def _check_accounting(docs_in: int, kept: int, dropped: dict[str, int], quarantined: int) -> None:
    total = kept + sum(dropped.values()) + quarantined
    if docs_in != total:
        raise RuntimeError(
            f"clean accounting broken: {docs_in} records read but kept {kept} + dropped "
            f"{sum(dropped.values())} + quarantined {quarantined} = {total}"
        )


# --------------------------------------------------------------------------------------------
# Stage


def find_duplicates(keys_files: list[Path], runner: UnitRunner) -> dict[int, str]:
    """The shuffle: the 64-bit key space is cut into equal ranges, one task per range reads that
    range from every file's sorted key rows and returns its edges; union-find runs here.

    Keys are uniform hashes, so equal ranges hold about equal rows; the number of ranges keeps
    every task under ``_ROWS_PER_PARTITION`` rows (bounded memory) and every CPU busy. Files are
    read from the shared work directory, as the final write does."""
    n_rows = sum(pq.ParquetFile(p).metadata.num_rows for p in keys_files)
    if n_rows == 0:
        return {}
    n_partitions = max(runner.cpus(), -(-n_rows // _ROWS_PER_PARTITION))
    bounds = [(i << 64) // n_partitions for i in range(n_partitions)] + [None]
    key_ranges = list(zip(bounds[:-1], bounds[1:]))
    edges = runner.map(_edges_task, key_ranges, shared=([str(p) for p in keys_files],), describe=_describe_key_range, desc="dedup")
    tables = [t for t in edges if t.num_rows]
    return duplicates_from_edges(pa.concat_tables([t.cast(EDGES_SCHEMA) for t in tables]) if tables else EDGES_SCHEMA.empty_table())


def clean_corpus(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> CleanResult:
    """Run (or skip, when current) the clean stage into ``paths.clean``."""
    start = time.monotonic()
    files = resolve_inputs(cfg, paths)
    identities = [_identity(p) for p in files]
    # Read once here and shipped to every task; the texts' hash is part of the fingerprint.
    benchmarks = benchmark_ngrams(cfg)
    benchmarks_sha = benchmarks.sha256 if benchmarks else None
    stage = Stage("clean", paths.clean, cfg.data.model_dump(mode="json"), identities, *filter(None, [benchmarks_sha]), force=force)
    if record := stage.current():
        log.info("clean: inputs and config unchanged, skipping (%s)", paths.clean)
        return CleanResult.from_record(record)

    work_dir = paths.clean / WORK_DIR
    work_dir.mkdir(parents=True, exist_ok=True)
    with ray_runner(cfg.runtime) as runner:
        units = plan_work(cfg.data, files, identities, benchmarks_sha, runner.cpus())
        todo = [u for u in units if not _unit_done(work_dir, u.key)]
        reused = len(units) - len(todo)
        if reused:
            log.info("clean: %d of %d tasks already done, resuming", reused, len(units))
        if todo:
            clean_files(todo, work_dir, cfg.data, runner, benchmarks)
        missing = [u.path for u in units if not _unit_done(work_dir, u.key)]
        if missing:
            raise RuntimeError(f"clean: no completion record for {missing[:5]} after stage 1")
        drops: dict[int, str] = {}
        if cfg.data.exact_dedup or cfg.data.minhash_dedup:
            drops = find_duplicates([_work_paths(work_dir, key)[1] for u in units for key in _unit_keys(work_dir, u)], runner)

    with stage.outputs(paths.clean) as (tmp,):
        tmp.mkdir(parents=True)
        stats = _write_outputs(units, work_dir, drops, tmp, cfg.data, stage.fingerprint, benchmarks)
        _check_accounting(stats["docs_in"], stats["kept"], stats["dropped"], stats["quarantined"])
        expected = sum(read_json(_work_paths(work_dir, u.key)[2])["rows"] for u in units)
        if expected != stats["docs_in"]:
            raise RuntimeError(f"clean accounting broken: readers produced {expected} rows, outputs hold {stats['docs_in']}")

    result = CleanResult(
        output_dir=paths.clean,
        docs_in=stats["docs_in"],
        kept=stats["kept"],
        dropped=stats["dropped"],
        quarantined=stats["quarantined"],
        fingerprint=stage.fingerprint,
        parts=stats["parts"],
        elapsed_s=round(time.monotonic() - start, 3),
        tasks=len(units),
        tasks_reused=reused,
        skipped_blank_lines=stats["skipped_blank_lines"],
    )
    stage.done(result.to_dict())
    log.info("clean: %d in, %d kept, %s dropped, %d quarantined", result.docs_in, result.kept, result.dropped, result.quarantined)
    return result
