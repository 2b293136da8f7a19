"""Property tests: whatever bytes, text or value types arrive, the readers and the cleaning steps
never raise, and every record is accounted for by count: records in = kept + dropped (by reason)
+ quarantined (+ blank lines, for the line formats), in every input format."""

from __future__ import annotations

import gzip
import json
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.cleaner import clean_batch
from data_prep.readers import BLANK_LINES, read_file
from pretrain_pipeline.config import DataConfig

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSONL_KINDS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")

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
# Wrong types for a field: JSON has no bytes, so a bytes-like value arrives as a list of ints.
wrong_json = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(0, 255), max_size=4), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# A Parquet column has one type; each strategy gives (arrow type, values of it, None allowed).
parquet_columns = st.one_of(
    st.tuples(st.just(pa.int64()), st.lists(st.none() | st.integers(-2**63, 2**63 - 1), min_size=1, max_size=8)),
    st.tuples(st.just(pa.float64()), st.lists(st.none() | st.floats(allow_nan=True), min_size=1, max_size=8)),
    st.tuples(st.just(pa.bool_()), st.lists(st.none() | st.booleans(), min_size=1, max_size=8)),
    st.tuples(st.just(pa.binary()), st.lists(st.none() | st.binary(max_size=20), min_size=1, max_size=8)),
    st.tuples(st.just(pa.list_(pa.int64())), st.lists(st.none() | st.lists(st.integers(0, 9), max_size=3), min_size=1, max_size=8)),
    st.tuples(st.just(pa.struct([("a", pa.int64())])), st.lists(st.none() | st.builds(lambda a: {"a": a}, st.integers(0, 9)), min_size=1, max_size=8)),
    st.tuples(st.just(pa.string()), st.lists(st.none() | st.text(max_size=20), min_size=1, max_size=8)),
)
# Document texts, short and long: words, odd unicode, and a few huge single lines.
texts = st.one_of(
    st.text(max_size=400),
    st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=400, max_size=20_000),
    st.lists(st.sampled_from(["the", "of", "and", "data", "é", "日本", "\t", "\n", " ", "!!", "http://x.io"]), max_size=3000).map(" ".join),
    st.builds(lambda unit, n: unit * n, st.text(min_size=1, max_size=20), st.integers(1000, 100_000)),
)


def _rows(path: Path, skipped: Counter | None = None) -> list[dict]:
    return list(read_file(path, skipped=skipped))


def _line_count(data: bytes) -> int:
    """Lines as a reader sees them: a final newline ends the last line rather than starting one."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _write(suffix: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp())
    path = d / f"input{suffix}"
    path.write_bytes(data)
    return path


def _write_jsonl(suffix: str, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    if suffix.endswith(".gz"):
        data = gzip.compress(data)
    elif suffix.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    return _write(suffix, data)


def _write_parquet(columns: dict[str, pa.Array], row_group_size: int = 3) -> Path:
    path = _write(".parquet", b"")
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size, compression="zstd")
    return path


def _account(rows: list[dict], records_in: int, cfg: DataConfig | None = None, skipped: Counter | None = None,
             clean: bool = True) -> Counter:
    """Clean the reader rows as the clean stage does and check in = kept + dropped + quarantined
    + blank lines (``records_in`` counts lines for jsonl, rows for Parquet, files for .txt).
    ``clean=False`` checks only the reading side, for rows already shown equal to cleaned ones."""
    blank = (skipped or Counter())[BLANK_LINES]
    assert len(rows) + blank == records_in, "one row per record, every other line blank"
    assert len({r["line"] for r in rows}) == len(rows), "no record read twice"
    for row in rows:
        assert row["line"] >= 0 and (row["quarantine"] is None or isinstance(row["quarantine"], str))
    if not rows or not clean:
        return Counter()
    batch = {k: [r[k] for r in rows] for k in rows[0]}
    out = clean_batch(batch, cfg or DataConfig())
    fate = Counter()
    for q, reason, text in zip(out["quarantine"], out["drop_reason"], out["text"]):
        assert isinstance(text, str)
        fate["quarantined" if q else f"dropped:{reason}" if reason else "kept"] += 1
    assert sum(fate.values()) + blank == records_in
    return fate


def _valid(text) -> bool:
    return isinstance(text, str) and "\x00" not in text


# ----------------------------------------------------------------------------- readers


@FAST
@given(jsonl_lines, st.sampled_from([b"\n", b"\r\n"]), st.booleans(), st.sampled_from([".jsonl", ".ndjson"]))
def test_jsonl_every_line_is_one_row_or_one_counted_blank_line(lines, eol, bom, suffix):
    data = (b"\xef\xbb\xbf" if bom else b"") + eol.join(lines)
    path = _write(suffix, data)
    skipped = Counter()
    rows = _rows(path, skipped)
    # A BOM opening the file is an encoding mark, not content (the reader drops it).
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    nonblank = [line for line in body.split(b"\n") if line.strip()]
    assert all(row["source"] == str(path) and row["line"] >= 1 for row in rows)
    assert len(rows) == len(nonblank)
    _account(rows, _line_count(data), skipped=skipped)


@FAST
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash_any_reader(data):
    for suffix in (*JSONL_KINDS, ".txt", ".parquet"):
        rows = _rows(_write(suffix, data))
        # A .txt file is one record; a file of garbage is at least one quarantine row or nothing.
        _account(rows, 1 if suffix == ".txt" else len(rows))


@FAST
@given(st.lists(st.tuples(wrong_json | st.text(max_size=30), wrong_json | st.text(max_size=10)), max_size=12),
       st.sampled_from(JSONL_KINDS))
def test_wrong_types_for_text_and_id_in_jsonl_are_quarantined_or_kept_never_crash(records, suffix):
    lines = [json.dumps({"text": t, "id": i}).encode() for t, i in records]
    rows = _rows(_write_jsonl(suffix, lines))
    _account(rows, len(records))
    for row, (text, doc_id) in zip(rows, records):
        assert (row["quarantine"] is None) == _valid(text), (text, row)
        if row["quarantine"] is None:
            assert row["text"] == text and isinstance(row["id"], str) and row["id"]
        else:
            assert row["quarantine"] in ("missing_text", "text_not_string", "nul_byte")


@FAST
@given(parquet_columns, parquet_columns)
def test_wrong_types_for_text_and_id_in_parquet_are_quarantined_or_kept_never_crash(text_col, id_col):
    (text_type, text_values), (id_type, id_values) = text_col, id_col
    n = min(len(text_values), len(id_values))
    path = _write_parquet({"text": pa.array(text_values[:n], text_type), "id": pa.array(id_values[:n], id_type)})
    rows = _rows(path)
    _account(rows, n)
    for row, text in zip(rows, text_values):
        if isinstance(text, bytes):  # a binary column holding UTF-8 is text
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                assert row["quarantine"] == "invalid_utf8"
                continue
        assert (row["quarantine"] is None) == _valid(text), (text, row)
        assert row["quarantine"] is not None or (isinstance(row["id"], str) and row["id"])


def _corrupt(path: Path, start: int, length: int) -> None:
    """Flip bytes inside the body (between the magic and the footer), so the footer still opens."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    body_end = len(data) - footer
    start = 4 + start % max(1, body_end - 4)
    for i in range(start, min(body_end, start + length)):
        data[i] ^= 0xA5
    path.write_bytes(bytes(data))


@FAST
@given(st.lists(st.text(max_size=60), min_size=1, max_size=12), st.integers(0, 10_000), st.integers(1, 64))
def test_parquet_with_a_corrupted_body_accounts_for_every_row(docs, start, length):
    path = _write_parquet({"id": [str(i) for i in range(len(docs))], "text": docs})
    _corrupt(path, start, length)
    rows_in_footer = pq.ParquetFile(path).metadata.num_rows
    rows = _rows(path)
    _account(rows, rows_in_footer)
    assert [r["line"] for r in rows] == list(range(1, rows_in_footer + 1))


def test_parquet_row_group_that_fails_to_decompress_is_quarantined_by_name(tmp_path):
    docs = [f"document {i} " * 30 for i in range(9)]
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(9)], "text": docs}), path, row_group_size=3, compression="zstd")
    col = pq.ParquetFile(path).metadata.row_group(1).column(1)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start, start + col.total_compressed_size):  # the whole text column chunk of group 1
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    rows = _rows(path)
    assert [r["line"] for r in rows] == list(range(1, 10))
    assert [r["text"] for r in rows[:3] + rows[6:]] == docs[:3] + docs[6:]
    for row in rows[3:6]:
        assert row["quarantine"].startswith("read_error:") and row["excerpt"].startswith("row group 1: ")
        assert row["source"] == str(path)


@FAST
@given(jsonl_lines, st.integers(min_value=0, max_value=400), st.sampled_from([".jsonl.gz", ".jsonl.zst"]))
def test_truncated_compressed_jsonl_keeps_what_came_before_and_quarantines_the_rest(lines, cut, suffix):
    full = _write_jsonl(suffix, lines).read_bytes()
    rows = _rows(_write(suffix, full[: max(0, len(full) - cut)]))
    nonblank = sum(1 for line in b"\n".join(lines).split(b"\n") if line.strip())
    # Every row is a line read intact or the one quarantine row for the damaged rest.
    fate = _account(rows, len(rows))
    assert len(rows) <= nonblank + 1
    assert sum(1 for r in rows if (r["quarantine"] or "").startswith("read_error:")) <= 1
    assert sum(fate.values()) == len(rows)


# ----------------------------------------------------------------------------- every format, by count


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(texts, min_size=1, max_size=6))
def test_every_document_is_accounted_for_in_every_format(docs):
    """The same documents as jsonl (plain, .gz, .zst, .ndjson), Parquet and .txt files: each
    format reads one record per document, and cleaning kept + dropped + quarantined = in."""
    lines = [json.dumps({"id": str(i), "text": t}).encode() for i, t in enumerate(docs)]
    read = {suffix: _rows(_write_jsonl(suffix, lines)) for suffix in JSONL_KINDS}
    read[".parquet"] = _rows(_write_parquet({"id": [str(i) for i in range(len(docs))], "text": docs}))
    # Every format reads the same records, so one cleaning pass decides them all alike.
    fields = ("id", "text", "line", "quarantine")
    first = [[r[k] for k in fields] for r in read[".jsonl"]]
    for suffix, rows in read.items():
        assert len(rows) == len(docs) and [[r[k] for k in fields] for r in rows] == first, suffix
    _account(read[".jsonl"], len(docs))
    # Blank and whitespace-only lines between the documents: counted, and nothing else changes.
    spaced = [blank for line in lines for blank in (line, b"", b" \t ", b"\r")]
    for suffix in JSONL_KINDS:
        skipped = Counter()
        rows = _rows(_write_jsonl(suffix, spaced), skipped)
        same = ("id", "text", "quarantine")
        assert [[r[k] for k in same] for r in rows] == [[r[k] for k in same] for r in read[".jsonl"]], suffix
        assert skipped[BLANK_LINES] == 3 * len(docs)
        # The same rows as the plain .jsonl's (above), whose cleaning was accounted for already.
        _account(rows, len(spaced), skipped=skipped, clean=False)
    # .txt: one document per file (a file that is not UTF-8 is one quarantine row); a Parquet
    # row or a .txt file is a record whatever its text, a blank one included.
    for text in [*docs[:2], " \n\t"]:
        skipped = Counter()
        _account(_rows(_write(".txt", text.encode("utf-8", "surrogatepass")), skipped), 1, skipped=skipped)
    skipped = Counter()
    _account(_rows(_write_parquet({"text": ["", "  ", *docs]}), skipped), len(docs) + 2, skipped=skipped)


# ----------------------------------------------------------------------------- filters


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(texts | wrong_json, min_size=1, max_size=8))
def test_cleaning_never_raises_and_decides_every_document(values):
    cfg = DataConfig(max_chars=50_000)
    batch = {"id": [str(i) for i in range(len(values))], "text": values, "quarantine": [None] * len(values)}
    out = clean_batch(batch, cfg)
    assert len(out["text"]) == len(out["drop_reason"]) == len(out["quarantine"]) == len(values)
    for value, text, q, reason in zip(values, out["text"], out["quarantine"], out["drop_reason"]):
        assert isinstance(text, str) and len(text) <= cfg.max_chars
        if not _valid(value):
            assert q and reason is None, "a value that is not text is quarantined, not dropped"
        else:
            assert q is None and (reason is None or (isinstance(reason, str) and reason))


def test_huge_line_is_read_not_hung(tmp_path):
    text = "word " * 2_000_000  # a 10 MB line
    path = tmp_path / "big.jsonl"
    path.write_text(json.dumps({"id": "big", "text": text}) + "\n")
    rows = _rows(path)
    assert len(rows) == 1 and rows[0]["quarantine"] is None
    out = clean_batch({"id": ["big"], "text": [rows[0]["text"]], "quarantine": [None]}, DataConfig(max_chars=100_000))
    assert len(out["text"][0]) <= 100_000
