"""Fast unit tests of data_prep: filters, readers, split, shard reading (no Ray)."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.clean import _check_accounting
from data_prep.cleaner import UnicodeRepair, clean_batch, normalize_whitespace, text_hash, truncate
from data_prep.filters import DocStats, GopherQuality, GopherRepetition
from data_prep.readers import expand_inputs, read_file, split_file
from data_prep.sample_corpus import build_sample_corpus
from data_prep.shards import assign_splits, read_shard_tokens, split_hash
from data_prep.tokenizer import sample_lines, split_long_line
from pretrain_pipeline.config import C4Config, DataConfig, FineWebConfig, GopherQualityConfig, GopherRepetitionConfig

PROSE = "The quick brown fox jumps over the lazy dog while the farmer watches from his porch."


def quality(text: str, **kw) -> str | None:
    return GopherQuality(**GopherQualityConfig(**{"min_words": 5, "min_stop_words": 0, **kw}).params())(text, DocStats(text))


# --------------------------------------------------------------------------------------------
# Filters


def test_gopher_quality_keeps_prose() -> None:
    assert quality(PROSE) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("too short here", "gopher_quality:too_few_words"),
        ("a b c d e f g h i j k", "gopher_quality:short_mean_word_length"),
        ("supercalifragilistic " * 10, "gopher_quality:long_mean_word_length"),
        ("# heading # more # words # here # again # and # this", "gopher_quality:symbol_ratio"),
        ("1234 5678 9012 3456 7890 1111 2222 word", "gopher_quality:low_alpha_fraction"),
    ],
)
def test_gopher_quality_reasons(text: str, reason: str) -> None:
    assert quality(text) == reason


def test_gopher_quality_max_words() -> None:
    assert quality(PROSE, max_words=5) == "gopher_quality:too_many_words"


def test_gopher_repetition() -> None:
    f = GopherRepetition(**GopherRepetitionConfig(dup_line_frac=0.3).params())
    boiler = "\n".join(["Home | About | Contact"] * 5 + [PROSE])
    assert f(boiler, DocStats(boiler)) == "gopher_repetition:duplicate_lines"
    varied = "\n".join(f"{PROSE} {i}" for i in range(5))
    # Distinct lines, but the same sentence five times: the n-gram rules catch it.
    assert f(varied, DocStats(varied)) == "gopher_repetition:top_4_gram"
    assert GopherRepetition(**GopherRepetitionConfig(top_n_grams={}, dup_n_grams={}).params())(varied, DocStats(varied)) is None


def test_unicode_repair_fixes_mojibake_without_nfkc() -> None:
    repair = UnicodeRepair()
    assert repair("cafÃ© au lait") == "café au lait"
    # NFKC would turn the ligature into "fi" and x² into x2; we keep what was written.
    assert repair("ﬁne x²") == "ﬁne x²"


def test_normalize_whitespace_keeps_indentation() -> None:
    text = "\ufeffline one\r\n    indented\u00a0word  \r\n\n\n\n\nend\x07\u200b"
    assert normalize_whitespace(text) == "line one\n    indented word\n\nend"


def test_truncate_cuts_at_space() -> None:
    text = "word " * 1000
    out = truncate(text, 1001)
    assert len(out) <= 1001 and out.endswith("word")
    assert truncate("short", 1000) == "short"


def test_text_hash_normalises_case_and_space() -> None:
    assert text_hash("Hello   World\n") == text_hash("hello world")
    assert text_hash("STRASSE") == text_hash("straße")
    assert text_hash("hello world") != text_hash("hello word")


def _rows(texts: list[str]) -> dict[str, list]:
    n = len(texts)
    return {
        "id": [str(i) for i in range(n)],
        "text": texts,
        "source": ["f"] * n,
        "line": list(range(1, n + 1)),
        "quarantine": [None] * n,
        "excerpt": [None] * n,
    }


def test_clean_batch_dict_and_frame_agree() -> None:
    cfg = DataConfig(max_chars=1000, language={"languages": [], "threshold": 0}, gopher_quality={"min_stop_words": 0},
                     gopher_repetition={"enabled": False}, fineweb={"enabled": False})
    texts = ["Le cafÃ© est trÃ¨s bon et nous aimons beaucoup ce petit endroit.", "tiny", PROSE * 100]
    out = clean_batch(_rows(texts), cfg)
    frame = clean_batch(pd.DataFrame(_rows(texts)), cfg)
    assert isinstance(frame, pd.DataFrame)
    assert out["text"][0].startswith("Le café est très bon")
    assert out["drop_reason"] == [None, "gopher_quality:too_few_words", None]
    assert len(out["text"][2]) <= 1000
    assert out["n_words"][0] == 12
    assert out["language"][0] == "fr" and out["language_score"][0] > 0.9
    assert list(frame["drop_reason"].where(frame["drop_reason"].notna(), None)) == out["drop_reason"]
    assert list(frame["text_hash"]) == out["text_hash"]


def test_clean_batch_passes_quarantine_rows_through() -> None:
    rows = _rows([PROSE, ""])
    rows["quarantine"][1] = "bad_json"
    out = clean_batch(rows, DataConfig())
    assert out["drop_reason"] == [None, None]
    assert out["text_hash"][1] == ""


def test_accounting_check_raises() -> None:
    _check_accounting(10, 5, {"a": 3}, 2)
    with pytest.raises(RuntimeError, match="accounting"):
        _check_accounting(10, 5, {"a": 3}, 1)


# --------------------------------------------------------------------------------------------
# Readers


def _jsonl_bytes(records: list) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def test_jsonl_malformed_lines_are_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    lines = [
        b'\xef\xbb\xbf{"id": "d1", "text": "first doc"}\r\n',  # BOM + CRLF
        b"{not json}\n",
        b'{"id": "d3", "text": "bad \xff\xfe bytes"}\n',
        b'{"id": "d4", "text": "nul \\u0000 inside"}\n',
        b'{"id": "d5"}\n',
        b'{"id": "d6", "text": 42}\n',
        b"\n",  # blank: not a document, not an error
        b'["a", "list"]\n',
        b'{"text": "no id here"}\n',
    ]
    path.write_bytes(b"".join(lines) + b"  \t\r\n")
    skipped = Counter()
    rows = list(read_file(path, skipped=skipped))
    assert len(rows) + skipped["blank_lines"] == len(lines) + 1 and skipped["blank_lines"] == 2
    docs = [r for r in rows if r["quarantine"] is None]
    bad = {r["line"]: r["quarantine"] for r in rows if r["quarantine"]}
    assert [d["text"] for d in docs] == ["first doc", "no id here"]
    assert docs[0]["id"] == "d1" and docs[0]["line"] == 1
    assert docs[1]["id"] == f"{path}:9"
    assert bad == {2: "bad_json", 3: "invalid_utf8", 4: "nul_byte", 5: "missing_text", 6: "text_not_string", 8: "not_an_object"}
    assert all(r["source"] == str(path) for r in rows)
    assert "{not json}" in next(r["excerpt"] for r in rows if r["line"] == 2)


_LINE = st.sampled_from([
    b'{"id": "a", "text": "short"}', b'{"text": "no id, a longer document with several words in it"}', b"",
    b"{truncated", b'{"id": "u", "text": "bad \xff utf8"}', b'{"id": "n", "text": null}', b"  ",
    b'{"id": "big", "text": "' + b"x" * 5000 + b'"}',
])


@settings(max_examples=150, deadline=None)
@given(
    lines=st.lists(st.tuples(_LINE, st.sampled_from([b"\n", b"\r\n"])), min_size=1, max_size=60),
    bom=st.booleans(), final_newline=st.booleans(), target=st.integers(1, 4000),
)
def test_jsonl_parts_read_exactly_the_whole_file(tmp_path_factory, lines, bom, final_newline, target) -> None:
    data = (b"\xef\xbb\xbf" if bom else b"") + b"".join(a + b for a, b in lines)
    if not final_newline:
        data = data.rstrip(b"\r\n")
    path = tmp_path_factory.mktemp("parts") / "a.jsonl"
    path.write_bytes(data)
    parts = split_file(path, target)
    assert len(parts) >= 1
    whole, in_parts = Counter(), Counter()
    list(read_file(path, skipped=whole))
    for part in parts:
        list(read_file(path, part=part, skipped=in_parts))
    # Blank lines are counted once whichever part holds them; lines in = rows + blank lines.
    assert in_parts == whole
    assert len(list(read_file(path))) + whole["blank_lines"] == data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    if parts != [None]:
        assert parts[0].start == 0 and parts[-1].end == len(data)
        assert all(a.end == b.start for a, b in zip(parts, parts[1:]))
        # every cut is a line start, and first_line is the number of that line
        assert all(p.start == 0 or data[p.start - 1 : p.start] == b"\n" for p in parts)
        assert all(p.first_line == data.count(b"\n", 0, p.start) + 1 for p in parts)
    assert [r for part in parts for r in read_file(path, part=part)] == list(read_file(path))


def test_parquet_parts_are_row_groups(tmp_path: Path) -> None:
    texts = [f"document {i}" if i % 7 else None for i in range(50)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(50)], "text": texts}), path, row_group_size=8)  # 7 groups
    parts = split_file(path, -(-path.stat().st_size // 3))  # three parts
    assert len(parts) == 3 and [(p.start, p.end) for p in parts][-1][1] == 7
    rows = [r for part in parts for r in read_file(path, part=part)]
    assert rows == list(read_file(path))
    assert [r["line"] for r in rows] == list(range(1, 51))
    assert split_file(path, path.stat().st_size) == [None]


def test_compressed_and_txt_files_are_never_cut(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes([{"text": "x " * 500}] * 20)))
    (tmp_path / "e.txt").write_bytes(b"word " * 2000)
    assert split_file(tmp_path / "a.jsonl.gz", 100) == split_file(tmp_path / "e.txt", 100) == [None]


def test_compressed_jsonl(tmp_path: Path) -> None:
    records = [{"id": str(i), "text": f"document number {i}"} for i in range(3)]
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(records)))
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(_jsonl_bytes(records)))
    for name in ("a.jsonl.gz", "b.jsonl.zst"):
        assert [r["text"] for r in read_file(tmp_path / name)] == [r["text"] for r in records]


def test_truncated_gzip_quarantines_the_rest(tmp_path: Path) -> None:
    data = gzip.compress(_jsonl_bytes([{"text": f"doc {i} " * 50} for i in range(200)]))
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    rows = list(read_file(path))
    assert rows[-1]["quarantine"].startswith("read_error") or rows[-1]["quarantine"] == "bad_json"
    assert any(r["quarantine"] is None for r in rows)


def test_parquet_and_txt(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["p1", "p2", "p3"], "text": ["alpha beta", None, "gamma"]}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_bytes("\ufeffwhole file\r\nis one doc".encode("utf-8"))
    rows = list(read_file(tmp_path / "d.parquet"))
    assert [(r["id"], r["line"], r["quarantine"]) for r in rows] == [("p1", 1, None), ("", 2, "missing_text"), ("p3", 3, None)]
    (txt,) = read_file(tmp_path / "e.txt")
    assert txt["text"] == "whole file\nis one doc" and txt["id"] == f"{tmp_path / 'e.txt'}:1"


def test_expand_inputs(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.jsonl", "a.txt", "sub/c.parquet", "skip.csv"):
        (tmp_path / name).write_text("x")
    found = expand_inputs([str(tmp_path)])
    assert [p.name for p in found] == ["a.txt", "b.jsonl", "c.parquet"]
    assert expand_inputs([str(tmp_path / "*.jsonl"), str(tmp_path / "b.jsonl")]) == [(tmp_path / "b.jsonl").resolve()]
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        expand_inputs([str(tmp_path / "nothing-here*.jsonl")])
    with pytest.raises(ValueError, match="unsupported"):
        expand_inputs([str(tmp_path / "skip.csv")])


# --------------------------------------------------------------------------------------------
# Sample corpus


def test_sample_corpus_is_deterministic_with_duplicates(tmp_path: Path) -> None:
    n = build_sample_corpus(tmp_path / "a.jsonl", 200, seed=3)
    build_sample_corpus(tmp_path / "b.jsonl", 200, seed=3)
    assert n == 200
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(records) == n
    hashes = [text_hash(r["text"]) for r in records]
    assert len(set(hashes)) < len(hashes)
    assert len({r["id"] for r in records}) == n


# --------------------------------------------------------------------------------------------
# Split, tokenizer sample, shard reading


def test_assign_splits_is_stable_and_never_empty() -> None:
    ids = [f"doc-{i}" for i in range(2000)]
    splits = assign_splits(ids, 1234, 0.1)
    assert splits == assign_splits(ids, 1234, 0.1)
    assert 120 < splits.count("val") < 280
    # Adding documents does not move existing ones.
    assert assign_splits(ids + ["new"], 1234, 0.1)[:-1] == splits
    assert assign_splits(ids, 99, 0.1) != splits
    two = assign_splits(["a", "b"], 0, 1e-9)
    assert sorted(two) == ["train", "val"]
    assert two[["a", "b"].index(min(["a", "b"], key=lambda i: split_hash(i, 0)))] == "val"
    assert assign_splits(["a", "b"], 0, 0.0) == ["train", "train"]
    assert assign_splits(["a", "b", "c"], 0, 0.999999).count("train") == 1


def test_split_long_line_respects_bytes() -> None:
    line = "é" * 100 + "a" * 100
    pieces = split_long_line(line, 64)
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= 64 for p in pieces)


def test_sample_lines_bounded_seeded_ordered() -> None:
    texts = [f"line {i}\n\nother {i}" for i in range(500)]
    a = sample_lines(iter(texts), 100, 1000, seed=1)
    assert len(a) == 100 and a == sample_lines(iter(texts), 100, 1000, seed=1)
    assert a != sample_lines(iter(texts), 100, 1000, seed=2)
    order = [int(s.split()[1]) for s in a]
    assert order == sorted(order)


def _write_stream(path: Path, docs: list[list[int]], batches: int) -> None:
    arr = pa.array(docs, type=pa.list_(pa.uint16()))
    table = pa.table({"input_ids": arr, "id": [str(i) for i in range(len(docs))]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        step = -(-len(docs) // batches)
        for b in table.to_batches(max_chunksize=step):
            w.write_batch(b)


@pytest.mark.parametrize("batches", [1, 2])
def test_read_shard_tokens(tmp_path: Path, batches: int) -> None:
    docs = [[5, 6, 2], [7, 2], [8, 9, 10, 2]]
    _write_stream(tmp_path / "s.arrow", docs, batches)
    tokens, offsets = read_shard_tokens(tmp_path / "s.arrow")
    assert tokens.dtype == np.uint16
    assert list(offsets) == [0, 3, 5, 9]
    assert [list(tokens[a:b]) for a, b in zip(offsets[:-1], offsets[1:])] == docs


# --------------------------------------------------------------------------------------------
# Language, C4, FineWeb, PII, MinHash


def test_language_filter_records_language() -> None:
    from data_prep.langid import LanguageFilter

    f = LanguageFilter(languages=["en"], threshold=0.65)
    stats = DocStats(PROSE)
    assert f(PROSE, stats) is None and stats.language == "en" and stats.language_score > 0.9
    fr = "Le chat dort sur la table de la cuisine pendant que nous mangeons du pain."
    assert f(fr, DocStats(fr)) == "language:fr"
    assert LanguageFilter(languages=[], threshold=0.0)(fr, DocStats(fr)) is None


def test_c4_rewrites_lines_then_judges_document() -> None:
    from data_prep.filters import C4Quality

    c4 = C4Quality(**C4Config().params())
    page = "\n".join(["Menu", "This site uses cookies to improve things.", "Enable javascript to see this page."] + [f"{PROSE} [{i}]" for i in range(5)])
    out = c4.rewrite(page)
    assert out.splitlines() == [PROSE] * 5
    assert c4(out, DocStats(out)) is None
    assert c4(PROSE, DocStats(PROSE)) == "c4:too_few_sentences"
    assert c4("x = {1: 2}. " * 6, DocStats("")) == "c4:curly_bracket"
    assert c4("Lorem ipsum dolor. " * 6, DocStats("")) == "c4:lorem_ipsum"


def test_fineweb_rules() -> None:
    from data_prep.filters import FineWebQuality

    fw = FineWebQuality(**FineWebConfig().params())
    assert fw(PROSE, DocStats(PROSE)) is None
    no_punct = "\n".join(["a line without an end"] * 3 + [f"another one {i} here and there" for i in range(10)])
    assert fw(no_punct, DocStats(no_punct)) == "fineweb:line_punct_ratio"
    listing = "\n".join(f"Item {i}." for i in range(40))
    assert fw(listing, DocStats(listing)) == "fineweb:short_line_ratio"
    dup = "\n".join([PROSE, PROSE + " Again.", PROSE])
    assert fw(dup, DocStats(dup)) == "fineweb:char_dup_ratio"


def test_minhash_similar_texts_share_bands_and_edges_keep_first() -> None:
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401

    from data_prep.minhash import NEAR, MinHasher, duplicates_from_edges, edges_of_partition, key_rows

    words = (PROSE + " ") * 3 + " ".join(f"word{i}" for i in range(200))
    near = words.replace("word50", "changed", 1)
    other = " ".join(f"other{i}" for i in range(250))
    h = MinHasher(5, 14, 8, seed=1)
    assert len(h.signature(words)) == 112 and (h.signature(words) == h.signature(near)).mean() > 0.8
    assert h.band_keys(words) == MinHasher(5, 14, 8, seed=1).band_keys(words)
    rows = key_rows([30, 10, 20], ["aa" * 20, "bb" * 20, "cc" * 20], [near, words, other], h)
    assert rows.num_rows == 3 * 15 and rows.column("kind").to_pylist().count(NEAR) == 42
    # Partitioned by key, any partition count gives the same answer: the kept copy is the
    # smallest ordinal.
    assert duplicates_from_edges(edges_of_partition(rows)) == {30: "minhash_duplicate"}
    for n in (2, 3, 7):
        parted = rows.append_column("part", pa.array((rows["key"].to_numpy() % n).astype("int64")))
        parts = [edges_of_partition(parted.filter(pa.compute.equal(parted["part"], p))) for p in range(n)]
        assert duplicates_from_edges(pa.concat_tables(parts)) == {30: "minhash_duplicate"}
