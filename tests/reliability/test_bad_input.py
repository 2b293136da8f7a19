"""Property tests: whatever bytes or text arrive, the readers and the cleaning steps never raise,
and every record is accounted for (a document or a quarantine row naming file and line)."""

from __future__ import annotations

import gzip
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.filters import clean_batch
from data_prep.readers import read_file
from pretrain_pipeline.config import DataConfig

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
# Lines that are JSON objects with odd "text" values, mixed with raw garbage lines.
jsonl_lines = st.lists(
    st.one_of(
        st.builds(lambda t, i: json.dumps({"id": i, "text": t}).encode(), json_values, json_values),
        st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False).encode("utf-8", "surrogatepass"),
                  st.text(alphabet=st.characters(blacklist_categories=["Cs"]))),
        st.binary(max_size=200).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")),
    ),
    max_size=20,
)


def _accounted(row: dict) -> bool:
    """A row is a document (id + text) or a quarantine record (reason + line)."""
    if row["quarantine"]:
        return isinstance(row["quarantine"], str) and row["line"] >= 0
    return isinstance(row["text"], str) and bool(row["id"])


def _rows(path: Path) -> list[dict]:
    return list(read_file(path))


def _write(suffix: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp())
    path = d / f"input{suffix}"
    path.write_bytes(data)
    return path


@FAST
@given(jsonl_lines, st.sampled_from([b"\n", b"\r\n"]), st.booleans())
def test_jsonl_every_nonblank_line_is_one_row(lines, eol, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + eol.join(lines)
    path = _write(".jsonl", data)
    rows = _rows(path)
    # A BOM opening the file is an encoding mark, not content (the reader drops it).
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    nonblank = [line for line in body.split(b"\n") if line.strip()]
    assert len(rows) == len(nonblank), "every non-blank line must give exactly one row"
    for row in rows:
        assert row["source"] == str(path)
        assert row["line"] >= 1
        if row["quarantine"]:
            assert isinstance(row["quarantine"], str)
        else:
            # Empty documents are read as documents; the cleaning steps drop them with a reason.
            assert isinstance(row["text"], str) and row["id"]
    # No line is read twice.
    lines_seen = [r["line"] for r in rows]
    assert len(lines_seen) == len(set(lines_seen))


@FAST
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_any_reader(data):
    for suffix in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".txt", ".parquet"):
        rows = _rows(_write(suffix, data))
        assert all(_accounted(r) for r in rows)


@FAST
@given(jsonl_lines, st.integers(min_value=0, max_value=400))
def test_truncated_gzip_keeps_what_came_before_and_quarantines_the_rest(lines, cut):
    blob = gzip.compress(b"\n".join(lines))
    rows = _rows(_write(".jsonl.gz", blob[: max(0, len(blob) - cut)]))
    assert all(_accounted(r) for r in rows)


@FAST
@given(st.lists(st.text(max_size=400), min_size=1, max_size=12))
def test_cleaning_never_raises_and_decides_every_document(texts):
    batch = {"id": [str(i) for i in range(len(texts))], "text": texts, "quarantine": [None] * len(texts)}
    out = clean_batch(batch, DataConfig())
    assert len(out["text"]) == len(out["drop_reason"]) == len(texts)
    for reason in out["drop_reason"]:
        assert reason is None or (isinstance(reason, str) and reason)


def test_huge_line_is_read_not_hung(tmp_path):
    text = "word " * 2_000_000  # a 10 MB line
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"id": "big", "text": text}) + "\n")
    rows = _rows(path)
    assert len(rows) == 1 and rows[0]["quarantine"] is None
    out = clean_batch({"id": ["big"], "text": [rows[0]["text"]], "quarantine": [None]}, DataConfig(max_chars=100_000))
    assert len(out["text"][0]) <= 100_000
