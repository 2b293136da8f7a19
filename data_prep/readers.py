"""Raw corpus readers: jsonl (plain, .gz, .zst), Parquet and .txt (one document per file).

A reader never crashes on a bad record and never drops one silently: a line that is not valid
UTF-8, not JSON, has no string text or holds NUL bytes becomes a *quarantine* row naming the file,
the line and the reason, so the clean stage's accounting (in = kept + dropped + quarantined) holds.

Every row has the same keys (one schema for the work files)::

    {"id", "text", "source", "line", "quarantine", "excerpt"}

``quarantine`` is None for a document; for a quarantined record it is the reason, ``text`` is ""
and ``excerpt`` holds the start of the offending line.

Blank and whitespace-only lines of a jsonl file are no record at all: they are counted in the
``skipped`` Counter a caller passes (``skipped["blank_lines"]``), so that lines in = rows + blank
lines. A Parquet row or a .txt file is a record whatever its text (an empty one is dropped by
the filters, and counted there).

A compressed jsonl file cannot be cut, so when it is to be cleaned on several cores the driver
reads it once with ``line_batches`` and each worker reads its batch with ``read_batch``: the rows
are those ``read_jsonl`` gives for the whole file, line numbers included.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pretrain_pipeline.errors import MissingInput

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".parquet", ".txt")
EXCERPT_CHARS = 200
BLANK_LINES = "blank_lines"
_BOM = b"\xef\xbb\xbf"


def _supported(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def expand_inputs(patterns: Iterable[str | Path]) -> list[Path]:
    """Files, directories (searched recursively for supported files) and globs -> sorted, unique paths."""
    found: set[Path] = set()
    for pattern in patterns:
        pattern = str(pattern)
        path = Path(pattern)
        if path.is_dir():
            matches = [p for p in path.rglob("*") if p.is_file() and _supported(p)]
        elif path.is_file():
            if not _supported(path):
                raise ValueError(f"input {pattern!r}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
            matches = [path]
        else:
            matches = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file() and _supported(Path(p))]
        if not matches:
            raise MissingInput(f"input {pattern!r} matches no {'/'.join(SUFFIXES)} file")
        found.update(p.resolve() for p in matches)
    return sorted(found)


def _doc(doc_id: str, text: str, source: str, line: int) -> dict[str, Any]:
    return {"id": doc_id, "text": text, "source": source, "line": line, "quarantine": None, "excerpt": None}


def quarantine_row(source: str, line: int, reason: str, raw: bytes | str) -> dict[str, Any]:
    if isinstance(raw, bytes):
        raw = raw[: EXCERPT_CHARS * 4].decode("utf-8", errors="replace")
    excerpt = raw[:EXCERPT_CHARS].replace("\x00", "\\x00")
    return {"id": "", "text": "", "source": source, "line": line, "quarantine": reason, "excerpt": excerpt}


def _doc_id(obj: dict, id_field: str | None, source: str, line: int) -> str:
    # Any JSON/Arrow value names a document by its text form; a missing or empty one by its place.
    value = obj.get(id_field) if id_field else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value) if value is not None and str(value) else f"{source}:{line}"


def text_problem(text: Any) -> str | None:
    """Reason a text value cannot be a document, or None."""
    if text is None:
        return "missing_text"
    if not isinstance(text, str):
        return "text_not_string"
    if "\x00" in text:
        return "nul_byte"
    return None


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        # read_across_frames: files made by concatenating zstd frames (common for shards) read whole.
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True))
    return open(path, "rb")


def _read_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (OSError, EOFError, ValueError, zstandard.ZstdError)


def _read_failure(err: BaseException) -> tuple[str, str]:
    """(reason, excerpt) of the quarantine row that stands for the unreadable rest of a file."""
    return f"read_error:{type(err).__name__}", str(err)


@dataclass(frozen=True)
class FilePart:
    """The slice of a big input file that one cleaning task reads: bytes ``[start, end)`` of a
    plain jsonl file, cut at line starts, or row groups ``[start, end)`` of a Parquet file.
    ``first_line`` is the line (row) number of its first line (row), so every row keeps the line
    number it has in the whole file."""

    start: int
    end: int
    first_line: int


def split_file(path: str | Path, target_bytes: int) -> list[FilePart | None]:
    """Cut a file bigger than ``target_bytes`` into parts of about that size; ``[None]`` (read
    it whole) for a smaller file or one that cannot be cut: compressed jsonl, .txt, a Parquet
    file with one row group. The cuts depend only on the bytes, so a rerun cuts alike."""
    path = Path(path)
    size = path.stat().st_size
    n = -(-size // max(1, target_bytes))
    if n < 2:
        return [None]
    if path.name.endswith((".jsonl", ".ndjson")):
        cuts = _line_starts_after(path, [i * size // n for i in range(1, n)])
        bounds = [(0, 1), *[c for c in cuts if c[0] < size], (size, 0)]
        return [FilePart(a, b, line) for (a, line), (b, _) in zip(bounds, bounds[1:])]
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(path).metadata
        except Exception:  # noqa: BLE001 - a damaged file is read whole and quarantined by read_parquet
            return [None]
        groups = meta.num_row_groups
        if groups < 2:
            return [None]
        rows_before = [0]
        for i in range(groups):
            rows_before.append(rows_before[-1] + meta.row_group(i).num_rows)
        edges = sorted({i * groups // min(n, groups) for i in range(min(n, groups))} | {groups})
        return [FilePart(a, b, rows_before[a] + 1) for a, b in zip(edges, edges[1:])]
    return [None]


def _line_starts_after(path: Path, targets: list[int]) -> list[tuple[int, int]]:
    """For each target offset (ascending), the first line start at or after it and that line's
    number, in one pass over the file; targets inside one long line share its end."""
    cuts: list[tuple[int, int]] = []
    offset = lines_before = 0  # file offset of the chunk's first byte, newlines before it
    pending = iter(targets)
    target = next(pending, None)
    with open(path, "rb") as f:
        while target is not None and (chunk := f.read(1 << 24)):
            counted = 0  # newlines in chunk[:counted] are in lines_before
            while target is not None:
                newline = chunk.find(b"\n", max(target - 1 - offset, 0))
                if newline < 0:
                    break
                lines_before += chunk.count(b"\n", counted, newline + 1)
                counted = newline + 1
                cut = offset + counted
                if not cuts or cuts[-1][0] != cut:
                    cuts.append((cut, lines_before + 1))
                while target is not None and target <= cut:
                    target = next(pending, None)
            lines_before += chunk.count(b"\n", counted)
            offset += len(chunk)
    return cuts


def _lines_in(f: io.BufferedIOBase, part: FilePart | None) -> Iterator[bytes]:
    if part is None:
        yield from f
        return
    f.seek(part.start)
    left = part.end - part.start
    for raw in f:
        yield raw
        left -= len(raw)
        if left <= 0:
            return


def read_jsonl(
    path: Path, text_field: str = "text", id_field: str | None = "id", part: FilePart | None = None, skipped: Counter | None = None
) -> Iterator[dict[str, Any]]:
    source = str(path)
    first_line = part.first_line if part else 1
    try:
        f = _open_binary(path)
    except _read_errors() as err:
        yield quarantine_row(source, first_line, *_read_failure(err))
        return
    with f:
        yield from jsonl_rows(source, _lines_in(f, part), first_line, text_field, id_field, skipped)


def jsonl_rows(
    source: str, lines: Iterable[bytes], first_line: int, text_field: str = "text", id_field: str | None = "id", skipped: Counter | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of raw jsonl lines numbered from ``first_line``; blank lines are counted in ``skipped``."""
    line_no = first_line - 1
    try:
        for line_no, raw in enumerate(lines, start=first_line):
            if line_no == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            raw = raw.rstrip(b"\r\n")
            # Blank lines separate nothing in jsonl; they are not documents (and not errors).
            if not raw.strip():
                if skipped is not None:
                    skipped[BLANK_LINES] += 1
                continue
            yield _jsonl_row(raw, source, line_no, text_field, id_field)
    except _read_errors() as err:
        # A truncated .gz/.zst: everything before the damage was read; the rest is one quarantine row.
        yield quarantine_row(source, line_no + 1, *_read_failure(err))


def _jsonl_row(raw: bytes, source: str, line_no: int, text_field: str, id_field: str | None) -> dict[str, Any]:
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        return quarantine_row(source, line_no, "invalid_utf8", raw)
    try:
        obj = json.loads(decoded)
    except (json.JSONDecodeError, RecursionError):
        return quarantine_row(source, line_no, "bad_json", decoded)
    if not isinstance(obj, dict):
        return quarantine_row(source, line_no, "not_an_object", decoded)
    text = obj.get(text_field)
    if reason := text_problem(text):
        return quarantine_row(source, line_no, reason, decoded)
    return _doc(_doc_id(obj, id_field, source, line_no), text, source, line_no)


@dataclass(frozen=True)
class LineBatch:
    """Lines ``first_line`` .. ``first_line + n_lines - 1`` of a file, as read (``data``); ``failure``
    is the (reason, excerpt) of the read error that ended the file after them, if one did."""

    first_line: int
    n_lines: int
    data: bytes
    failure: tuple[str, str] | None = None


def line_batches(path: str | Path, batch_bytes: int) -> Iterator[LineBatch]:
    """A jsonl file (compressed or not) read once, in order, as batches of whole lines of about
    ``batch_bytes`` (decompressed); an empty file is one empty batch. The cuts depend only on the
    bytes and ``batch_bytes``, so a rerun cuts alike."""
    lines: list[bytes] = []
    first_line, size = 1, 0
    try:
        with _open_binary(Path(path)) as f:
            for raw in f:
                lines.append(raw)
                size += len(raw)
                if size >= batch_bytes:
                    yield LineBatch(first_line, len(lines), b"".join(lines))
                    first_line, lines, size = first_line + len(lines), [], 0
    except _read_errors() as err:
        yield LineBatch(first_line, len(lines), b"".join(lines), _read_failure(err))
        return
    if lines or first_line == 1:
        yield LineBatch(first_line, len(lines), b"".join(lines))


def read_batch(
    source: str, batch: LineBatch, text_field: str = "text", id_field: str | None = "id", skipped: Counter | None = None
) -> Iterator[dict[str, Any]]:
    """The rows of one batch of ``line_batches``: those ``read_jsonl`` gives for its lines."""
    yield from jsonl_rows(source, io.BytesIO(batch.data), batch.first_line, text_field, id_field, skipped)
    if batch.failure:
        yield quarantine_row(source, batch.first_line + batch.n_lines, *batch.failure)


def read_parquet(path: Path, text_field: str = "text", id_field: str | None = "id", part: FilePart | None = None) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    source = str(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        yield quarantine_row(source, 0, f"read_error:{type(err).__name__}", str(err))
        return
    names = pf.schema_arrow.names
    if text_field not in names:
        yield quarantine_row(source, 0, "missing_text_column", f"columns: {names}")
        return
    columns = [text_field] + ([id_field] if id_field and id_field in names and id_field != text_field else [])
    row = part.first_line - 1 if part else 0
    groups = range(part.start, part.end) if part else range(pf.metadata.num_row_groups)
    # One row group at a time: a group whose body does not decode (bad page, failed ZSTD frame)
    # becomes one quarantine row per row it still owes, as a truncated .gz's rest does, so the
    # rows in the footer are all accounted for and the next group is still read.
    for group in groups:
        n_rows = pf.metadata.row_group(group).num_rows
        end = row + n_rows
        batches = pf.iter_batches(columns=columns, batch_size=4096, row_groups=[group])
        while True:
            try:
                batch = next(batches, None)
                records = _records(batch) if batch is not None else []
            except Exception as err:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid, UnicodeDecodeError...
                reason = f"read_error:{type(err).__name__}"
                detail = f"row group {group}: {err}"
                while row < end:
                    row += 1
                    yield quarantine_row(source, row, reason, detail)
                break
            if batch is None:
                break
            for rec in records:
                row += 1  # 1-based like jsonl lines, so "line" reads the same for both
                yield _parquet_row(rec, text_field, id_field, source, row)


def _records(batch) -> list[dict[str, Any]]:
    import pyarrow as pa

    # Strings as bytes: a damaged page can decode to invalid UTF-8, which is then quarantined
    # row by row (invalid_utf8) instead of failing the whole batch.
    columns = [c.cast(pa.large_binary()) if pa.types.is_string(c.type) or pa.types.is_large_string(c.type) else c for c in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()


def _parquet_row(rec: dict[str, Any], text_field: str, id_field: str | None, source: str, row: int) -> dict[str, Any]:
    text = rec.get(text_field)
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return quarantine_row(source, row, "invalid_utf8", text)
    if reason := text_problem(text):
        return quarantine_row(source, row, reason, repr(text))
    return _doc(_doc_id(rec, id_field, source, row), text, source, row)


def read_txt(path: Path, text_field: str = "text", id_field: str | None = "id") -> Iterator[dict[str, Any]]:
    source = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        yield quarantine_row(source, 1, "invalid_utf8", raw)
        return
    if reason := text_problem(text):
        yield quarantine_row(source, 1, reason, text)
        return
    yield _doc(f"{source}:1", text.replace("\r\n", "\n"), source, 1)


def read_file(
    path: str | Path, text_field: str = "text", id_field: str | None = "id", part: FilePart | None = None, skipped: Counter | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of one input file, or of one part of it (documents and quarantine rows, in file
    order); lines that hold no record are counted in ``skipped``."""
    path = Path(path)
    name = path.name
    if name.endswith(JSONL_SUFFIXES):
        yield from read_jsonl(path, text_field, id_field, part, skipped)
    elif name.endswith(".parquet"):
        yield from read_parquet(path, text_field, id_field, part)
    elif name.endswith(".txt"):
        yield from read_txt(path, text_field, id_field)
    else:
        raise ValueError(f"{path}: unsupported file type (expected one of {', '.join(SUFFIXES)})")
