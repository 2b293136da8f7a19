"""The tokenizer report's numbers, each checked against a direct computation on a small hand-made
corpus (two languages, two sources), written by the real tokenize stage."""

from __future__ import annotations

import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from data_prep.tokenizer_report import REPORT_JSON, REPORT_MD, write_tokenizer_report
from pretrain_pipeline import stages
from pretrain_pipeline.artifacts import RunPaths, mark_stage_done, read_json
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.report import write_report

pytestmark = pytest.mark.integration

EN = "river mountain village garden window morning evening silver golden bridge market harbor library".split()
RU = "река гора деревня сад окно утро вечер серебро золото мост рынок гавань библиотека".split()
SOURCES = ("web.jsonl", "books.jsonl")


def _doc(rng: random.Random, words: list[str], rare: str) -> str:
    paragraphs = [" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))).capitalize() + f" {rng.randint(10, 99)}."
                  for _ in range(rng.randint(8, 12))]
    paragraphs[1] += f" {rare}"  # one character seen once in the corpus: below the coverage, so byte fallback or <unk>
    return "\n".join(paragraphs)


def _corpus() -> list[dict]:
    rng = random.Random(7)
    docs = []
    for i in range(24):
        language, words = ("en", EN) if i % 3 else ("ru", RU)
        text = _doc(rng, words, chr(0x4E00 + i) + ("🦙" if i == 5 else ""))
        docs.append({"id": f"d{i:02d}", "text": text, "source": SOURCES[i % 2], "language": language,
                     "n_words": len(text.split())})
    return docs


def _tokenize(root, name: str, byte_fallback: bool) -> tuple[RunPaths, list[dict]]:
    cfg = PipelineConfig.model_validate(
        {"tokenizer": {"vocab_size": 400, "val_fraction": 0.3, "character_coverage": 0.995, "byte_fallback": byte_fallback},
         "runtime": {"runs_root": str(root), "run_name": name, "num_cpus": 2}, "data": {"sample_corpus": True}}
    )
    paths = RunPaths(cfg.run_dir())
    paths.clean.mkdir(parents=True)
    docs = _corpus()
    for p, chunk in enumerate((docs[:10], docs[10:])):
        pq.write_table(pa.Table.from_pylist(chunk), paths.clean / f"part-{p:05d}.parquet", row_group_size=4)
    mark_stage_done(paths.clean, "report-test", {"documents": len(docs)})
    stages.tokenize(cfg, log=lambda _: None)
    return paths, docs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {fallback: _tokenize(root, f"fallback-{fallback}", fallback) for fallback in (True, False)}


def _encoded(paths: RunPaths, docs: list[dict]):
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer / "tokenizer.model"))
    val_shards = sorted(paths.shards.glob("val-*.arrow"))
    val_ids = {i for f in val_shards for i in pa.ipc.open_stream(f.read_bytes()).read_all().column("id").to_pylist()}
    return sp, {d["id"]: sp.encode(d["text"]) for d in docs}, val_ids


def _is_byte_piece(sp, token: int) -> bool:
    return re.fullmatch(r"<0x[0-9A-F]{2}>", sp.id_to_piece(token)) is not None


def _expected_ratios(docs: list[dict], ids: dict[str, list[int]]) -> dict:
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in docs)
    tokens = sum(len(ids[d["id"]]) for d in docs)
    words = sum(len(d["text"].split()) for d in docs)
    return {"documents": len(docs), "bytes": n_bytes, "tokens": tokens, "words": words,
            "bytes_per_token": n_bytes / tokens, "tokens_per_word": tokens / words}


def _fallback_rate(sp, tokens: list[int]) -> float:
    return sum(_is_byte_piece(sp, t) for t in tokens) / len(tokens)


def test_the_stage_writes_the_report_next_to_the_model(runs):
    paths, _ = runs[True]
    report = read_json(paths.tokenizer / REPORT_JSON)
    assert report["inputs"]["tokenizer_sha256"] == read_json(paths.tokenizer / "meta.json")["sha256"]
    md = (paths.tokenizer / REPORT_MD).read_text()
    assert "bytes per token" in md and "### By language" in md and "### Longest pieces" in md
    assert "### Tokenizer report" in write_report(paths).read_text()  # the run report embeds it
    # Current for the same inputs: not rewritten.
    before = (paths.tokenizer / REPORT_JSON).stat().st_mtime_ns
    write_tokenizer_report(paths)
    assert (paths.tokenizer / REPORT_JSON).stat().st_mtime_ns == before


def test_bytes_per_token_and_tokens_per_word_overall_and_per_group(runs):
    paths, docs = runs[True]
    sp, ids, val_ids = _encoded(paths, docs)
    report = read_json(paths.tokenizer / REPORT_JSON)
    assert report["overall"] == pytest.approx(_expected_ratios(docs, ids))
    for label, values in (("language", ("en", "ru")), ("source", SOURCES)):
        rows = {r[label]: r for r in report[f"by_{label}"]}
        assert set(rows) == set(values)
        for value in values:
            group = [d for d in docs if d[label] == value]
            val_tokens = [t for d in group if d["id"] in val_ids for t in ids[d["id"]]]
            expected = {**_expected_ratios(group, ids), "byte_fallback_rate": _fallback_rate(sp, val_tokens)}
            assert {k: v for k, v in rows[value].items() if k != label} == pytest.approx(expected)


def test_byte_fallback_rate_vocabulary_use_and_longest_pieces(runs):
    paths, docs = runs[True]
    sp, ids, val_ids = _encoded(paths, docs)
    val_tokens = [t for d in docs if d["id"] in val_ids for t in ids[d["id"]]]
    byte_tokens = [t for t in val_tokens if _is_byte_piece(sp, t)]
    assert byte_tokens, "the corpus was built to need byte fallback on validation"
    pieces = read_json(paths.tokenizer / REPORT_JSON)["validation_pieces"]
    assert pieces["documents"] == len(val_ids) and pieces["tokens"] == len(val_tokens)
    assert pieces["byte_fallback_tokens"] == len(byte_tokens)
    assert pieces["byte_fallback_rate"] == pytest.approx(len(byte_tokens) / len(val_tokens))
    assert pieces["unknown_tokens"] == 0 and pieces["unknown_rate"] == 0
    assert pieces["vocab_used"] == len(set(val_tokens))
    assert pieces["vocab_used_share"] == pytest.approx(len(set(val_tokens)) / sp.get_piece_size())

    learnt = [i for i in range(sp.get_piece_size()) if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    size = {i: len(sp.id_to_piece(i).replace("▁", " ").encode("utf-8")) for i in learnt}
    top = sorted(learnt, key=lambda i: (-size[i], i))[:20]
    longest = read_json(paths.tokenizer / REPORT_JSON)["longest_pieces"]
    assert [(p["id"], p["piece"], p["bytes"], p["val_count"]) for p in longest] == [
        (i, sp.id_to_piece(i), size[i], val_tokens.count(i)) for i in top]


def test_unknown_piece_rate_without_byte_fallback(runs):
    paths, docs = runs[False]
    _, ids, val_ids = _encoded(paths, docs)
    val_tokens = [t for d in docs if d["id"] in val_ids for t in ids[d["id"]]]
    unknown = val_tokens.count(0)  # <unk> is id 0
    assert unknown >= 1, "each validation document holds a character the tokenizer never kept"
    pieces = read_json(paths.tokenizer / REPORT_JSON)["validation_pieces"]
    assert pieces["unknown_tokens"] == unknown and pieces["byte_fallback_tokens"] == 0
    assert pieces["unknown_rate"] == pytest.approx(unknown / len(val_tokens))


def test_training_sample_counts_every_line_of_a_small_corpus(runs):
    paths, docs = runs[True]
    lines = [line for d in docs for line in d["text"].split("\n") if line.strip()]
    sample = read_json(paths.tokenizer / REPORT_JSON)["training_sample"]
    assert sample["lines"] == len(lines)
    assert sample["bytes"] == sum(len(line.encode("utf-8")) + 1 for line in lines)
    assert sample["documents"] == sample["corpus_documents"] == len(docs)
