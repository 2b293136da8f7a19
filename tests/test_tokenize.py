"""Tokenizer training and shard encoding without Ray: Llama-like settings, round-trips,
determinism, long lines, user-defined symbols, the uint32 token path, the sample's draws, giant
documents cut into pieces and joined back."""

from __future__ import annotations

import importlib
import json
import random

import pytest

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from data_prep import shards as shards_mod
from data_prep.ray_runtime import LocalRunner, ProcessPoolRunner
from data_prep.shards import (ShardWriter, encode_parts, encode_row_groups, encode_runner, line_cuts, read_shard_tokens,
                              shard_schema, splits_at_newlines, token_type, work_items)
from data_prep.tokenizer import (WHITESPACE, RandrangeDraws, _train, sample_clean_parts, sample_lines, split_long_line,
                                 trainer_settings, write_lines)
from pretrain_pipeline.artifacts import RunPaths, sha256_file
from pretrain_pipeline.config import PipelineConfig, TokenizerConfig

# Real English prose: the docstrings of the standard library (shipped with every Python).
MODULES = ["argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "functools",
           "http.client", "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "socket",
           "sqlite3", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
           "typing", "unittest", "urllib.parse", "uuid", "zipfile", "inspect", "difflib", "heapq"]


def _corpus() -> list[str]:
    docs = []
    for name in MODULES:
        mod = importlib.import_module(name)
        docs += [d for d in [mod.__doc__] + [getattr(v, "__doc__", None) for v in vars(mod).values()] if isinstance(d, str)]
    return list(dict.fromkeys(docs))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    tok = TokenizerConfig(vocab_size=1000, input_sentence_size=20_000, max_sentence_length=512)
    lines = sample_lines(iter(_corpus()), tok.input_sentence_size, tok.max_sentence_length, tok.seed)
    (out / "sample.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _train(out / "sample.txt", out / "a", tok, num_threads=1)
    _train(out / "sample.txt", out / "b", tok, num_threads=2)
    return out, tok


def test_llama_like_settings():
    s = trainer_settings(TokenizerConfig())
    assert s["model_type"] == "bpe" and s["byte_fallback"] and s["split_digits"]
    assert s["normalization_rule_name"] == "identity" and s["remove_extra_whitespaces"] is False
    assert s["character_coverage"] == 0.9999 and s["shuffle_input_sentence"]
    assert (s["unk_id"], s["bos_id"], s["eos_id"], s["pad_id"]) == (0, 1, 2, 3)


TEXTS = [
    "The 3 little pigs paid $1,024.50 on 2024-02-29 at 23:59:07.",
    "Ünïcödé: naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🦙🚀 and ∑∫√.",
    "whitespace   runs\t\ttabs\n\n\nblank lines    and trailing spaces   ",
    "  leading spaces, then code:\n    def f(x):\n        return x ** 2  # 0x1F\n",
    "mixed\u00a0nbsp\u200bzero-width and combining e\u0301 vs \u00e9",
]


def test_decode_encode_roundtrips_real_text(trained):
    import sentencepiece as spm

    out, tok = trained
    sp = spm.SentencePieceProcessor(model_file=str(out / "a.model"))
    assert sp.get_piece_size() == tok.vocab_size
    for text in TEXTS + _corpus()[:200]:
        ids = sp.encode(text)
        assert sp.unk_id() not in ids  # byte fallback: nothing is lost
        assert sp.decode(ids) == text
    digits = [sp.id_to_piece(i).strip("▁") for i in sp.encode("31415926")]
    assert [d for d in digits if d] == list("31415926")  # split_digits: one piece per digit


def test_same_inputs_and_seed_give_the_same_model(trained):
    out, _ = trained
    # Different thread counts, same bytes: the run-specific fields are stripped from the proto.
    assert sha256_file(out / "a.model") == sha256_file(out / "b.model")


def test_long_lines_are_split_not_skipped():
    line = "ab€" * 5000  # 25000 UTF-8 bytes
    pieces = split_long_line(line, 1000)
    assert "".join(pieces) == line and all(len(p.encode("utf-8")) <= 1000 for p in pieces)
    sampled = sample_lines(iter([line]), max_lines=100, max_bytes=1000, seed=0)
    assert "".join(sampled) == line


def test_sample_is_seeded_and_bounded():
    docs = _corpus()
    a = sample_lines(iter(docs), 300, 512, seed=1)
    assert len(a) == 300 and a == sample_lines(iter(docs), 300, 512, seed=1)
    assert a != sample_lines(iter(docs), 300, 512, seed=2)
    json.dumps(a)


def test_user_defined_symbols_are_single_ids_after_the_specials(trained):
    import sentencepiece as spm

    out, tok = trained
    # A comma and a quote inside a symbol: passed as a list, SentencePiece's wrapper quotes them (CSV).
    symbols = ["<|im_start|>", "<|im_end|>", "<sep,1>", '<q"x>']
    with_symbols = tok.model_copy(update={"user_defined_symbols": symbols})
    _train(out / "sample.txt", out / "sym", with_symbols, num_threads=1)
    sp = spm.SentencePieceProcessor(model_file=str(out / "sym.model"))
    assert [sp.id_to_piece(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    assert sp.get_piece_size() == tok.vocab_size
    for k, sym in enumerate(symbols):
        assert sp.piece_to_id(sym) == 4 + k and sp.id_to_piece(4 + k) == sym
        text = f"before{sym}after and {sym} 42"
        ids = sp.encode(text)
        assert ids.count(4 + k) == 2  # matched whole, wherever it stands
        assert sp.decode(ids) == text


@pytest.mark.parametrize("symbols", [["a b"], [""], ["<x>", "<x>"], ["</s>"], ["tab\there"]])
def test_unusable_user_defined_symbols_are_refused(symbols):
    with pytest.raises(ValidationError, match="user_defined_symbols"):
        TokenizerConfig(user_defined_symbols=symbols)


@pytest.mark.parametrize("name", ["../web", "a/b", "/abs", "..", "x/../y", ".hidden"])
def test_from_run_must_be_a_plain_run_name(name):
    with pytest.raises(ValidationError, match="from_run"):
        TokenizerConfig(from_run=name)
    assert TokenizerConfig(from_run="web-2024.v1").from_run == "web-2024.v1"


def test_token_type_switches_to_uint32_above_65535():
    assert token_type(65535) == pa.uint16() and token_type(65536) == pa.uint32()
    assert shard_schema(65535).field("input_ids").type == pa.list_(pa.uint16())
    assert shard_schema(65536).field("input_ids").type == pa.list_(pa.uint32())


def test_uint32_shard_is_written_and_read_back(trained, tmp_path):
    """The shard stage's own encode and write functions with a vocabulary over 65535.

    The model is the small trained one; only the vocab size the shard stage is told is large, which
    is all that picks the dtype (a real 65536-piece model would need a far bigger corpus).
    """
    import datasets
    import sentencepiece as spm

    out, _ = trained
    model = out / "a.model"
    texts = TEXTS + _corpus()[:20]
    part = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), part, row_group_size=10)
    item = json.dumps([{"part": str(part), "groups": list(range(pq.ParquetFile(part).num_row_groups))}])
    (table,) = encode_row_groups(item, str(model), sha256_file(model), 70_000, 1)
    assert table.schema == shard_schema(70_000)
    writer = ShardWriter(tmp_path, "train", shard_schema(70_000), target_bytes=1 << 30)
    writer.add(table)
    writer.flush()
    (entry,) = writer.shards
    tokens, offsets = read_shard_tokens(tmp_path / entry["file"])
    assert tokens.dtype == np.uint32 and len(tokens) == entry["tokens"] == offsets[-1]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    for i, text in enumerate(texts):
        assert tokens[offsets[i] : offsets[i + 1]].tolist() == sp.encode(text) + [sp.eos_id()]
    ds = datasets.Dataset.from_file(str(tmp_path / entry["file"]))
    assert ds.features["input_ids"].feature.dtype == "uint32" and ds[1]["input_ids"] == sp.encode(texts[1]) + [2]


def _reservoir_with_randrange(texts, max_lines, max_bytes, seed):
    """The textbook reservoir sample: what ``sample_lines`` must return, draw for draw."""
    rng, reservoir, seen = random.Random(seed), [], 0
    for doc, text in enumerate(texts):
        for raw in text.split("\n"):
            for line in split_long_line(raw, max_bytes) if raw.strip() else []:
                if len(reservoir) < max_lines:
                    reservoir.append((seen, line, doc))
                elif (j := rng.randrange(seen + 1)) < max_lines:
                    reservoir[j] = (seen, line, doc)
                seen += 1
    return [line for _, line, _ in sorted(reservoir)], len({doc for *_, doc in reservoir})


# Blank to str.strip or not: every kind of whitespace, alone, around text, at a line's ends.
ODD_LINES = ["x" * 3000 + "\n" + "é" * 900, " \n\t\n", "", "\u3000\xa0\n\x1c\x85\r\n \u2028 x\n\x00\n  \u205f", "\r\n\t y \u3000"]


@pytest.mark.parametrize("max_lines", [100, 3000, 10**6])
def test_sample_draws_what_randrange_draws(max_lines):
    docs = _corpus() + ODD_LINES
    sample = sample_lines(iter(docs), max_lines, 512, seed=5)
    assert (sample, sample.documents) == _reservoir_with_randrange(docs, max_lines, 512, 5)
    assert WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())


@pytest.mark.parametrize("max_lines", [40, 3000])
def test_sample_of_clean_parts_in_threads_is_the_sample_of_their_texts(tmp_path, max_lines):
    """Row groups read and split in threads, and the sample file written from Arrow: the same
    lines, documents and bytes as ``sample_lines`` (few lines: kept lines pruned many times)."""
    docs = ODD_LINES + _corpus()
    parts = [tmp_path / "part-00000.parquet", tmp_path / "part-00001.parquet"]
    for part, chunk in zip(parts, (docs[:700], docs[700:])):
        pq.write_table(pa.table({"text": chunk}), part, row_group_size=64)
    lines, documents = sample_clean_parts(parts, max_lines, 512, seed=3, threads=2)
    expected = sample_lines(iter(docs), max_lines, 512, seed=3)
    assert (lines.to_pylist(), documents) == (expected, expected.documents)
    assert write_lines(lines, tmp_path / "sample.txt") == len(("\n".join(expected) + "\n").encode())
    assert (tmp_path / "sample.txt").read_text(encoding="utf-8") == "\n".join(expected) + "\n"


def test_bulk_draws_are_randranges_draw_for_draw():
    """Across bit lengths (also past 2**32, drawn word by word) and continued from batch to batch."""
    for seed in (0, 7):
        rng, draws = random.Random(seed), RandrangeDraws(seed)
        for n0, count in ((1, 3000), (5000, 70_000), ((1 << 32) - 3, 6)):
            assert draws.below(n0, count).tolist() == [rng.randrange(n0 + i) for i in range(count)]


def _giant_document() -> str:
    # Lines that start with spaces, blank lines, digits and non-Latin text: every way a line can start.
    return "\n".join(TEXTS + _corpus()[:150]) + "\n\n  trailing line"


@pytest.mark.parametrize("n_pieces", [1, 2, 7])
def test_document_pieces_join_back_to_the_ids_of_the_whole(trained, tmp_path, n_pieces):
    import sentencepiece as spm

    out, _ = trained
    model = out / "a.model"
    assert splits_at_newlines(model)
    doc = _giant_document()
    cuts = line_cuts(doc, n_pieces)
    assert cuts[0] == 0 and cuts[-1] == len(doc) and all(doc[c - 1] == "\n" for c in cuts[1:-1])
    part = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": ["before", "giant"], "text": ["x", doc]}), part)
    items = [json.dumps([{"part": str(part), "group": 0, "row": 1, "piece": i, "of": n_pieces}]) for i in range(n_pieces)]
    pieces = [piece for item in items for piece in encode_row_groups(item, str(model), sha256_file(model), 1000, 1)]
    assert [last for _, last in pieces] == [None] * (n_pieces - 1) + [("giant", len(doc.encode("utf-8")))]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert np.concatenate([ids for ids, _ in pieces]).tolist() == sp.encode(doc, add_eos=True)


def test_a_model_without_byte_fallback_is_never_cut(trained, tmp_path):
    """Without byte fallback a run of unknown characters ("\n\n") is one <unk>; cut inside the
    run it would be two, so such a model encodes every document whole."""
    from sentencepiece import sentencepiece_model_pb2

    out, _ = trained
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((out / "a.model").read_bytes())
    proto.trainer_spec.byte_fallback = False
    (tmp_path / "no_fallback.model").write_bytes(proto.SerializeToString())
    assert splits_at_newlines(out / "a.model")
    assert not splits_at_newlines(tmp_path / "no_fallback.model")


def test_giant_documents_are_cut_into_tasks_and_joined_in_order(trained, tmp_path, monkeypatch):
    """``encode_parts`` in process: a document over the piece size spreads over several tasks;
    the row-group tables that come back hold what encoding each document whole gives."""
    import sentencepiece as spm

    out, _ = trained
    model = out / "a.model"
    monkeypatch.setattr(shards_mod, "MIN_PIECE_BYTES", 4096)
    texts = _corpus()[:40] + [_giant_document()] + _corpus()[40:60] + [_giant_document()[::-1]]
    part = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts}), part, row_group_size=25)
    items = work_items([part], cpus=2)
    assert sum('"piece"' in item for item in items) >= 4
    tables = list(encode_parts([part], str(model), sha256_file(model), 1000, LocalRunner()))
    assert [t.num_rows for t in tables] == [25, 25, 12]
    table = pa.concat_tables(tables)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    assert table.column("id").to_pylist() == [f"d{i}" for i in range(len(texts))]
    assert table.column("input_ids").to_pylist() == sp.encode(texts, add_eos=True)
    assert table.column("n_bytes").to_pylist() == [len(t.encode("utf-8")) for t in texts]


def test_a_small_local_corpus_is_encoded_without_ray(tmp_path):
    paths = RunPaths(tmp_path / "run")
    paths.clean.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"], "text": ["one document"]}), paths.clean / "part-00000.parquet")
    cfg = PipelineConfig.model_validate({"data": {"sample_corpus": True}, "runtime": {"num_cpus": 2}})
    with encode_runner(cfg, paths) as runner:
        assert isinstance(runner, ProcessPoolRunner) and runner.cpus() == 2
