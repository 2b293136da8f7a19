"""Clean stage: raw files -> repaired, filtered, exact-deduplicated Parquet (Ray Data).

    files ─(one task per file)→ reader rows ─map_batches→ repair + filters
          ─groupby(text_hash)→ exact dedup ─driver→ sorted Parquet parts + stats

Output ``clean/``::

    part-00000.parquet …   kept documents in (source, line) order: id, text, source, line, n_chars, n_words
    dropped.parquet        id, source, line, drop_reason
    quarantine.jsonl       records the readers could not parse: source, line, reason, excerpt
    stats.json             counts per reason and per file, length histogram, input fingerprint
    _SUCCESS.json          fingerprint + summary; a rerun with the same inputs and config is skipped

Same inputs and ``data`` config give byte-identical files: rows are sorted before writing and no
file holds a timestamp.
"""

from __future__ import annotations

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
import pyarrow.parquet as pq

from data_prep.filters import clean_batch
from data_prep.readers import expand_inputs, read_file
from data_prep.ray_runtime import available_cpus, ray_session
from pretrain_pipeline.artifacts import (
    RunPaths,
    atomic_path,
    atomic_write_json,
    fingerprint,
    mark_stage_done,
    read_json,
    read_stage_record,
    sha256_file,
    stage_is_current,
)
from pretrain_pipeline.config import DataConfig, PipelineConfig

log = logging.getLogger(__name__)

EXACT_DUPLICATE = "exact_duplicate"
# Files up to this size are identified by content hash (a rebuilt but identical file is still
# "the same input"); bigger ones by size + mtime, so a huge corpus is not re-read just to hash it.
_HASH_INPUTS_UP_TO = 1 << 30
_READ_CHUNK_ROWS = 10_000
# Row groups of the clean parts are the unit of work of the shard stage's encoders.
ROW_GROUP_DOCS = 1000

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("quarantine", pa.string()),
        ("excerpt", pa.string()),
    ]
)
CLEAN_SCHEMA = pa.schema(
    [
        *ROW_SCHEMA,
        ("drop_reason", pa.string()),
        ("text_hash", pa.string()),
        ("n_chars", pa.int64()),
        ("n_words", pa.int64()),
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
    ]
)
DROPPED_SCHEMA = pa.schema(
    [("id", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("drop_reason", pa.string())]
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
    return expand_inputs(cfg.data.inputs)


def _identity(path: Path) -> list[Any]:
    st = path.stat()
    if st.st_size <= _HASH_INPUTS_UP_TO:
        return [str(path), st.st_size, sha256_file(path)]
    return [str(path), st.st_size, st.st_mtime_ns]


def clean_fingerprint(cfg: PipelineConfig, files: list[Path]) -> str:
    return fingerprint("clean", cfg.data.model_dump(mode="json"), [_identity(p) for p in files])


# --------------------------------------------------------------------------------------------
# Ray Data steps (module-level functions so workers import them instead of unpickling closures)


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def read_files_batch(batch: dict[str, np.ndarray], text_field: str, id_field: str | None) -> Iterator[pa.Table]:
    """One input file per batch -> tables of reader rows, streamed in chunks so big files fit."""
    for path in batch["path"]:
        rows: list[dict[str, Any]] = []
        for row in read_file(str(path), text_field, id_field):
            rows.append(row)
            if len(rows) >= _READ_CHUNK_ROWS:
                yield _rows_table(rows)
                rows = []
        if rows:
            yield _rows_table(rows)


def clean_block(df: pd.DataFrame, cfg: DataConfig) -> pa.Table:
    out = clean_batch(df, cfg)
    return _to_clean_table(out)


def _to_clean_table(df: pd.DataFrame) -> pa.Table:
    # pandas turns missing strings into NaN/None inconsistently; an explicit schema keeps every
    # block the same type whatever it happens to contain.
    df = df.astype(object).where(pd.notna(df), None)
    return pa.Table.from_pandas(df[CLEAN_SCHEMA.names], schema=CLEAN_SCHEMA, preserve_index=False)


def dedup_group(group: pa.Table) -> pa.Table:
    """All rows sharing one text hash: keep the first live copy in (source, line) order."""
    # Most groups are one document; Ray calls this once per group, so that case must be free.
    if group.num_rows == 1:
        return group
    df = group.to_pandas()
    live = df["quarantine"].isna() & df["drop_reason"].isna()
    if live.sum() > 1:
        order = df[live].sort_values(["source", "line"], kind="stable").index
        df.loc[order[1:], "drop_reason"] = EXACT_DUPLICATE
    return _to_clean_table(df)


# --------------------------------------------------------------------------------------------
# Driver side: write


def _write_parquet(table: pa.Table, path: Path) -> None:
    # Fixed writer options: with the same rows, the bytes are the same.
    pq.write_table(table, path, row_group_size=ROW_GROUP_DOCS, compression="zstd", write_statistics=True, store_schema=True)


def _histogram(n_words: np.ndarray) -> list[dict[str, Any]]:
    edges = [*_HIST_EDGES, max(_HIST_EDGES[-1] + 1, int(n_words.max()) + 1 if len(n_words) else 0)]
    counts, _ = np.histogram(n_words, bins=edges)
    return [{"min_words": int(lo), "max_words": int(hi), "documents": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)]


def _per_file(df: pd.DataFrame, files: list[Path]) -> dict[str, dict[str, int]]:
    out = {str(p): {"docs_in": 0, "kept": 0, "dropped": 0, "quarantined": 0} for p in files}
    status = np.where(df["quarantine"].notna(), "quarantined", np.where(df["drop_reason"].notna(), "dropped", "kept"))
    for (source, kind), n in pd.Series(status).groupby([df["source"].to_numpy(), status]).size().items():
        entry = out.setdefault(source, {"docs_in": 0, "kept": 0, "dropped": 0, "quarantined": 0})
        entry[kind] += int(n)
        entry["docs_in"] += int(n)
    return out


def _write_outputs(df: pd.DataFrame, out_dir: Path, cfg: DataConfig, files: list[Path], fp: str) -> dict[str, Any]:
    df = df.sort_values(["source", "line"], kind="stable").reset_index(drop=True)
    is_q = df["quarantine"].notna()
    is_dropped = ~is_q & df["drop_reason"].notna()
    kept = df[~is_q & ~is_dropped]
    dropped = df[is_dropped]
    quarantined = df[is_q]

    parts: list[str] = []
    per_shard = cfg.documents_per_shard
    for i, start in enumerate(range(0, len(kept), per_shard)):
        chunk = kept.iloc[start : start + per_shard]
        name = f"part-{i:05d}.parquet"
        _write_parquet(pa.Table.from_pandas(chunk[KEPT_SCHEMA.names], schema=KEPT_SCHEMA, preserve_index=False), out_dir / name)
        parts.append(name)
    _write_parquet(
        pa.Table.from_pandas(dropped[DROPPED_SCHEMA.names], schema=DROPPED_SCHEMA, preserve_index=False),
        out_dir / "dropped.parquet",
    )
    with open(out_dir / "quarantine.jsonl", "w", encoding="utf-8") as f:
        for rec in quarantined[["source", "line", "quarantine", "excerpt"]].itertuples(index=False):
            f.write(json.dumps({"source": rec.source, "line": int(rec.line), "reason": rec.quarantine, "excerpt": rec.excerpt}, ensure_ascii=False) + "\n")

    reasons = Counter(dropped["drop_reason"])
    stats = {
        "docs_in": len(df),
        "kept": len(kept),
        "dropped": dict(sorted(reasons.items())),
        "quarantined": len(quarantined),
        "quarantine_reasons": dict(sorted(Counter(quarantined["quarantine"]).items())),
        "kept_chars": int(kept["n_chars"].sum()),
        "kept_words": int(kept["n_words"].sum()),
        "per_file": _per_file(df, files),
        "length_histogram": _histogram(kept["n_words"].to_numpy()),
        "parts": parts,
        "input_fingerprint": fp,
        "config": cfg.model_dump(mode="json"),
    }
    atomic_write_json(out_dir / "stats.json", stats)
    return stats


def _check_accounting(docs_in: int, kept: int, dropped: dict[str, int], quarantined: int) -> None:
    total = kept + sum(dropped.values()) + quarantined
    if docs_in != total:
        raise RuntimeError(
            f"clean accounting broken: {docs_in} records read but kept {kept} + dropped "
            f"{sum(dropped.values())} + quarantined {quarantined} = {total}"
        )


# --------------------------------------------------------------------------------------------
# Stage


def clean_corpus(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> CleanResult:
    """Run (or skip, when current) the clean stage into ``paths.clean``."""
    start = time.monotonic()
    files = resolve_inputs(cfg, paths)
    fp = clean_fingerprint(cfg, files)
    if not force and stage_is_current(paths.clean, fp):
        record = read_stage_record(paths.clean)
        log.info("clean: inputs and config unchanged, skipping (%s)", paths.clean)
        return CleanResult.from_record(record)

    import ray

    with ray_session(cfg.runtime):
        ds = ray.data.from_items([{"path": str(p)} for p in files], override_num_blocks=len(files))
        ds = ds.map_batches(
            read_files_batch,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"text_field": cfg.data.text_field, "id_field": cfg.data.id_field},
        )
        ds = ds.map_batches(clean_block, batch_format="pandas", fn_kwargs={"cfg": cfg.data})
        # Materialised once: the count below is then an independent check on the dedup shuffle.
        ds = ds.materialize()
        docs_in = ds.count()
        if cfg.data.exact_dedup and docs_in:
            n_partitions = max(1, min(available_cpus(), ds.num_blocks()))
            ds = ds.groupby("text_hash", num_partitions=n_partitions).map_groups(dedup_group, batch_format="pyarrow")
        tables = [batch for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
        df = (pa.concat_tables(tables) if tables else CLEAN_SCHEMA.empty_table()).to_pandas()

    with atomic_path(paths.clean) as tmp:
        tmp.mkdir(parents=True)
        stats = _write_outputs(df, tmp, cfg.data, files, fp)
        _check_accounting(docs_in, stats["kept"], stats["dropped"], stats["quarantined"])

    result = CleanResult(
        output_dir=paths.clean,
        docs_in=docs_in,
        kept=stats["kept"],
        dropped=stats["dropped"],
        quarantined=stats["quarantined"],
        fingerprint=fp,
        parts=stats["parts"],
        elapsed_s=round(time.monotonic() - start, 3),
    )
    summary = result.to_dict()
    summary.pop("skipped")
    summary.pop("fingerprint")
    mark_stage_done(paths.clean, fp, summary)
    log.info("clean: %d in, %d kept, %s dropped, %d quarantined", docs_in, result.kept, result.dropped, result.quarantined)
    return result
