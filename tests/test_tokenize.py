"""Tokenizer training without Ray: Llama-like settings, round-trips, determinism, long lines."""

from __future__ import annotations

import importlib
import json

import pytest

from data_prep.tokenizer import _train, sample_lines, split_long_line, trainer_settings
from pretrain_pipeline.artifacts import sha256_file
from pretrain_pipeline.config import TokenizerConfig

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
