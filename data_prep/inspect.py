"""What the clean stage removed, for a person tuning it: the funnel of ``stats.json`` in the
order the steps run, and samples of ``dropped.parquet`` (reason, the filter's score, id, file and
line, the start of the text).

    from data_prep.inspect import dropped_samples
    dropped_samples("runs/smoke", reason="gopher_repetition:top_2_gram", n=5)

or ``pretrain-pipeline inspect -c configs/smoke.yaml --reason gopher_repetition:top_2_gram``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DROPPED_FILE = "dropped.parquet"
SAMPLE_COLUMNS = ("drop_reason", "score", "id", "source", "line", "excerpt")

# The funnel's steps in the order the clean stage runs them (data_prep.cleaner, then the dedup
# shuffle), each with the drop-reason families (the part before ":") it removes documents for.
# PII only rewrites text; it is a step so the funnel reads as the pipeline does.
FUNNEL_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("repair", ("long_document",)),
    ("language", ("language",)),
    ("repetition", ("gopher_repetition",)),
    ("quality", ("gopher_quality", "c4", "fineweb", "boilerplate")),
    ("decontamination", ("contamination",)),
    ("other filters", ()),  # any family not named here
    ("PII", ()),
    ("exact dedup", ("exact_duplicate",)),
    ("near dedup", ("minhash_duplicate",)),
)
TOP_LANGUAGES = 5


@dataclass
class FunnelStep:
    """One row of the funnel: documents the step removed, documents left after it, and the
    removals by reason (most first)."""

    step: str
    removed: int
    left: int
    reasons: list[tuple[str, int]] = field(default_factory=list)
    note: str = ""

    def reasons_text(self, limit: int = 6) -> str:
        shown = [f"{reason} {count:,}" for reason, count in self.reasons[:limit]]
        more = len(self.reasons) - limit
        return ", ".join(shown + ([f"{more} more"] if more > 0 else []))


def family(reason: str) -> str:
    return reason.split(":", 1)[0]


def fold_languages(reasons: dict[str, int], top: int = TOP_LANGUAGES) -> dict[str, int]:
    """``language:<code>`` reasons folded to the ``top`` most frequent plus ``language:other``;
    every other reason (``language:low_score`` included) is kept as it is."""
    codes = {r: n for r, n in reasons.items() if family(r) == "language" and r != "language:low_score"}
    folded = {r: n for r, n in reasons.items() if r not in codes}
    ranked = sorted(codes.items(), key=lambda item: (-item[1], item[0]))
    folded.update(ranked[:top])
    if rest := sum(n for _, n in ranked[top:]):
        folded["language:other"] = rest
    return folded


def _by_count(reasons: dict[str, int]) -> list[tuple[str, int]]:
    return sorted(reasons.items(), key=lambda item: (-item[1], item[0]))


def funnel(stats: dict[str, Any]) -> list[FunnelStep]:
    """The clean stage's ``stats.json`` as a funnel: records in (blank lines included), what
    reading, each filter step and each dedup removed, and what was kept."""
    blank = stats.get("skipped_blank_lines", 0)
    left = stats.get("docs_in", 0) + blank
    steps = [FunnelStep("input", 0, left)]
    unreadable = {f"quarantine:{r}": n for r, n in (stats.get("quarantine_reasons") or {}).items()}
    read = {**({"blank line": blank} if blank else {}), **unreadable}
    steps.append(_step("read", read, left))
    dropped = fold_languages(stats.get("dropped") or {})
    named = {f for _, families in FUNNEL_STEPS for f in families}
    for name, families in FUNNEL_STEPS:
        mine = {r: n for r, n in dropped.items() if family(r) in families or (name == "other filters" and family(r) not in named)}
        if name == "other filters" and not mine:
            continue
        steps.append(_step(name, mine, steps[-1].left))
        if name == "PII" and (pii := {k: v for k, v in (stats.get("pii_redacted") or {}).items() if v}):
            steps[-1].note = "redacted " + ", ".join(f"{n:,} {kind}" for kind, n in sorted(pii.items()))
    steps.append(FunnelStep("kept", 0, stats.get("kept", steps[-1].left)))
    return steps


def _step(name: str, reasons: dict[str, int], before: int) -> FunnelStep:
    removed = sum(reasons.values())
    return FunnelStep(name, removed, before - removed, _by_count(reasons))


def funnel_rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """The funnel as table rows (the report's table and the Prefect artifact)."""
    total = stats.get("docs_in", 0) + stats.get("skipped_blank_lines", 0)
    return [
        {
            "step": s.step,
            "removed": s.removed,
            "left": s.left,
            "left_share": f"{s.left / total:.1%}" if total else "-",
            "reasons": s.reasons_text() or s.note,
        }
        for s in funnel(stats)
    ]


# --------------------------------------------------------------------------------------------
# Samples of dropped.parquet


def dropped_path(run_dir: str | Path) -> Path:
    """``dropped.parquet`` of a run directory (or of a clean directory given directly)."""
    run_dir = Path(run_dir)
    path = run_dir / DROPPED_FILE if (run_dir / DROPPED_FILE).exists() else run_dir / "clean" / DROPPED_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no dropped documents recorded (has the clean stage run?)")
    return path


def _matching(reasons: pa.ChunkedArray, reason: str | None) -> np.ndarray:
    """Row numbers whose reason is ``reason``, or of its family when it has no ``:``."""
    if reason is None:
        mask = pc.is_valid(reasons)
    elif ":" in reason:
        mask = pc.equal(reasons, reason)
    else:
        mask = pc.or_(pc.equal(reasons, reason), pc.starts_with(reasons, f"{reason}:"))
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _rows_at(pf: pq.ParquetFile, rows: np.ndarray) -> list[dict[str, Any]]:
    """The given rows (ascending), reading only the row groups that hold them."""
    names = pf.schema_arrow.names
    columns = [c for c in SAMPLE_COLUMNS if c in names]
    starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)])
    groups = np.searchsorted(starts, rows, side="right") - 1
    out: list[dict[str, Any]] = []
    for g in np.unique(groups):
        table = pf.read_row_group(int(g), columns=columns)
        out += table.take(pa.array(rows[groups == g] - starts[g])).to_pylist()
    # dropped.parquet written before excerpts and scores existed has neither column.
    return [{c: row.get(c) for c in SAMPLE_COLUMNS} for row in out]


def _reason_counts(reasons: pa.ChunkedArray) -> list[tuple[str, int]]:
    counts = pc.value_counts(reasons.drop_null())
    return _by_count(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


def _sample(rows: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(rows) <= n:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, size=n, replace=False))


def dropped_samples(run_dir: str | Path, reason: str | None = None, n: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` dropped documents (seeded, in file order) whose reason is ``reason`` (a full reason,
    or a filter name for all its reasons; None for any), as dicts of ``SAMPLE_COLUMNS``."""
    pf = pq.ParquetFile(dropped_path(run_dir))
    reasons = pf.read(columns=["drop_reason"]).column("drop_reason")
    rows = _matching(reasons, reason)
    if not len(rows) and reason is not None:
        known = ", ".join(r for r, _ in _reason_counts(reasons))
        raise ValueError(f"no dropped document has reason {reason!r}; the reasons are: {known or 'none'}")
    return _rows_at(pf, _sample(rows, n, seed))


def examples_by_reason(run_dir: str | Path, top: int = 5, per_reason: int = 3, seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """``per_reason`` samples for each of the ``top`` most frequent drop reasons, most frequent first."""
    try:
        pf = pq.ParquetFile(dropped_path(run_dir))
    except FileNotFoundError:
        return {}
    reasons = pf.read(columns=["drop_reason"]).column("drop_reason")
    return {r: _rows_at(pf, _sample(_matching(reasons, r), per_reason, seed)) for r, _ in _reason_counts(reasons)[:top]}


def one_line(text: str | None, width: int) -> str:
    """The start of a text on one line: newlines shown as ⏎, cut to ``width`` characters."""
    flat = " ".join((text or "").replace("\n", " ⏎ ").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def describe_sample(row: dict[str, Any]) -> str:
    """``reason  score  id  file:line`` of one sample."""
    score = "" if row.get("score") is None else f"  score {row['score']:.4g}"
    place = f"{row['source']}:{row['line']}" if row.get("source") else "?"
    return f"{row['drop_reason']}{score}  id {row['id']}  {place}"


def format_samples(rows: list[dict[str, Any]], width: int = 300) -> str:
    """Samples as a person reads them in a terminal: a header line, then the indented excerpt."""
    return "\n\n".join(f"{describe_sample(row)}\n    {one_line(row.get('excerpt'), width)}" for row in rows)


def examples_markdown(examples: dict[str, list[dict[str, Any]]], width: int = 160) -> list[str]:
    """Markdown lines: per reason, its short examples (id, place, score, excerpt)."""
    lines: list[str] = []
    for reason, rows in examples.items():
        lines.append(f"**{reason}**")
        lines.append("")
        for row in rows:
            excerpt = one_line(row.get("excerpt"), width).replace("`", "'")
            score = "" if row.get("score") is None else f", score {row['score']:.4g}"
            lines.append(f"- `{row['id']}` ({Path(str(row['source'])).name}:{row['line']}{score}): `{excerpt}`")
        lines.append("")
    return lines
