"""Integration: clean -> tokenizer -> shards on a real local Ray (2 CPUs), one cluster per module."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.clean import clean_corpus
from data_prep.shards import assign_splits, read_shard_tokens, write_shards
from data_prep.tokenizer import train_tokenizer
from pretrain_pipeline.artifacts import RunPaths, read_json, sha256_file
from pretrain_pipeline.config import PipelineConfig, build_config

pytestmark = pytest.mark.integration

WORDS = (
    "river mountain village garden window morning evening silver golden bridge market "
    "harbor library teacher student letter journey winter summer forest meadow castle "
    "painter music story kitchen bread coffee table candle lantern station"
).split()


def _prose(rng: random.Random, n_sentences: int) -> str:
    sentences = []
    for _ in range(n_sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(6, 14))]
        sentences.append(" ".join(words).capitalize() + f" in {rng.randint(1800, 2024)}.")
    return " ".join(sentences)


MOJIBAKE_DOC = "The cafÃ© on the corner serves coffee and bread to every traveller who passes by."
DUP_TEXT = "This exact paragraph appears in two different files of the raw corpus today."


def _make_corpus(root: Path) -> dict[str, object]:
    rng = random.Random(0)
    root.mkdir(parents=True)
    a = [{"id": f"a{i}", "text": _prose(rng, 6)} for i in range(120)]
    a.insert(3, {"id": "moji", "text": MOJIBAKE_DOC})
    a.insert(5, {"id": "dup-first", "text": DUP_TEXT})
    a.insert(7, {"id": "short", "text": "too short"})
    lines = [json.dumps(r).encode() for r in a]
    lines.insert(10, b"{broken json")  # line 11
    lines.insert(20, b'{"id": "x", "text": "bad \xff utf8"}')  # line 21
    (root / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")

    b = [{"id": f"b{i}", "text": _prose(rng, 5)} for i in range(80)]
    b.append({"id": "dup-second", "text": "  " + DUP_TEXT.upper().replace(" ", "  ")})
    b.append({"id": "dup-exact", "text": a[10]["text"]})
    (root / "b.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in b)))

    c = [{"id": f"c{i}", "text": _prose(rng, 4)} for i in range(40)]
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(json.dumps(r).encode() + b"\n" for r in c)))
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(30)], "text": [_prose(rng, 3) for _ in range(30)]}), root / "d.parquet")
    (root / "e.txt").write_text(_prose(rng, 10) + "\n\nSecond paragraph with café and 漢字 too.\n")
    return {"raw_records": len(a) + 2 + len(b) + len(c) + 30 + 1, "quarantined": 2}


def _tree_hashes(path: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != "_SUCCESS.json"}


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    corpus = _make_corpus(root / "raw")
    cfg: PipelineConfig = build_config(
        {
            # Synthetic word-salad prose: the language, stop-word and repetition rules would drop
            # it; those are exercised on real prose in test_clean_quality.py.
            "data": {
                "inputs": [str(root / "raw")],
                "documents_per_shard": 100,
                "language": {"enabled": False},
                "gopher_repetition": {"enabled": False},
                "gopher_quality": {"min_stop_words": 0},
                "fineweb": {"enabled": False},
            },
            "tokenizer": {"vocab_size": 400, "val_fraction": 0.1, "shard_size_mb": 0.02},
            "runtime": {"runs_root": str(root / "runs"), "run_name": "t", "num_cpus": 2},
        }
    )
    paths = RunPaths(cfg.run_dir())
    clean = clean_corpus(cfg, paths)
    tok = train_tokenizer(cfg, paths)
    shards = write_shards(cfg, paths)
    return {"cfg": cfg, "paths": paths, "clean": clean, "tok": tok, "shards": shards, "corpus": corpus}


def _kept_table(paths: RunPaths) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted(paths.clean.glob("part-*.parquet"))])


# --------------------------------------------------------------------------------------------
# Clean


def test_clean_accounting(run) -> None:
    res, corpus = run["clean"], run["corpus"]
    assert res.docs_in == corpus["raw_records"]
    assert res.docs_in == res.kept + sum(res.dropped.values()) + res.quarantined
    assert res.quarantined == corpus["quarantined"]
    stats = json.loads((run["paths"].clean / "stats.json").read_text())
    assert stats["kept"] == res.kept == _kept_table(run["paths"]).num_rows
    assert sum(v["docs_in"] for v in stats["per_file"].values()) == res.docs_in
    assert sum(h["documents"] for h in stats["length_histogram"]) == res.kept
    assert len(res.parts) == -(-res.kept // 100)


def test_clean_dedup_and_filters(run) -> None:
    res, paths = run["clean"], run["paths"]
    assert res.dropped["exact_duplicate"] == 2
    assert res.dropped["gopher_quality:too_few_words"] >= 1
    dropped = pq.read_table(paths.clean / "dropped.parquet").to_pylist()
    by_id = {d["id"]: d["drop_reason"] for d in dropped}
    assert by_id["dup-second"] == by_id["dup-exact"] == "exact_duplicate"
    assert by_id["short"] == "gopher_quality:too_few_words"
    kept_ids = set(_kept_table(paths).column("id").to_pylist())
    assert "dup-first" in kept_ids and "a10" in kept_ids


def test_clean_repairs_and_orders(run) -> None:
    kept = _kept_table(run["paths"]).to_pylist()
    moji = next(r for r in kept if r["id"] == "moji")
    assert "café" in moji["text"] and "Ã" not in moji["text"]
    keys = [(r["source"], r["line"]) for r in kept]
    assert keys == sorted(keys)
    assert all(r["n_chars"] == len(r["text"]) for r in kept)
    assert "\r" not in "".join(r["text"] for r in kept)


def test_quarantine_names_file_and_line(run) -> None:
    lines = (run["paths"].clean / "quarantine.jsonl").read_text().splitlines()
    recs = [json.loads(line) for line in lines]
    got = {(Path(r["source"]).name, r["line"], r["reason"]) for r in recs}
    assert got == {("a.jsonl", 11, "bad_json"), ("a.jsonl", 21, "invalid_utf8")}
    assert "broken json" in next(r["excerpt"] for r in recs if r["line"] == 11)


def test_clean_rerun_skips_and_force_is_byte_identical(run) -> None:
    cfg, paths = run["cfg"], run["paths"]
    before = _tree_hashes(paths.clean)
    again = clean_corpus(cfg, paths)
    assert again.skipped and again.kept == run["clean"].kept and again.fingerprint == run["clean"].fingerprint
    forced = clean_corpus(cfg, paths, force=True)
    assert not forced.skipped
    assert _tree_hashes(paths.clean) == before


# --------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_roundtrip_and_ids(run) -> None:
    import sentencepiece as spm

    tok = run["tok"]
    sp = spm.SentencePieceProcessor(model_file=str(tok.model_path))
    assert sp.get_piece_size() == tok.vocab_size == 400
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    assert sp.id_to_piece(3) == "<pad>"
    for text in ["Year 2024 and 31415 digits", "café — 漢字 🦙", "runs   of  spaces\n\n\ttab", "Mountain village"]:
        assert sp.decode(sp.encode(text)) == text
    digits = [sp.id_to_piece(i) for i in sp.encode("12345")]
    assert all(len(p.strip("▁")) <= 1 for p in digits)
    meta = json.loads((run["paths"].tokenizer / "meta.json").read_text())
    assert meta["sha256"] == sha256_file(tok.model_path) == tok.sha256


def test_tokenizer_skip_and_deterministic_retrain(run) -> None:
    cfg, paths, tok = run["cfg"], run["paths"], run["tok"]
    assert train_tokenizer(cfg, paths).skipped
    assert train_tokenizer(cfg, paths, force=True).sha256 == tok.sha256


def test_tokenizer_too_big_vocab_is_explained(run, tmp_path) -> None:
    cfg = run["cfg"].model_copy(deep=True)
    cfg.tokenizer.vocab_size = 50_000
    paths = RunPaths(tmp_path / "run")
    import shutil

    shutil.copytree(run["paths"].clean, paths.clean)
    with pytest.raises(ValueError, match=r"tokenizer.vocab_size <= \d+"):
        train_tokenizer(cfg, paths)


# --------------------------------------------------------------------------------------------
# Shards


def test_manifest_matches_files(run) -> None:
    import datasets

    paths = run["paths"]
    manifest = json.loads((paths.shards / "manifest.json").read_text())
    assert manifest["format"] == "arrow-ipc-stream" and manifest["dtype"] == "uint16"
    assert manifest["tokenizer_sha256"] == run["tok"].sha256
    assert (paths.root / manifest["tokenizer_path"]).exists()
    assert len(manifest["splits"]["train"]) > 1  # shard_size_mb rolled
    for split, shards in manifest["splits"].items():
        for s in shards:
            path = paths.shards / s["file"]
            assert s["sha256"] == sha256_file(path) and s["bytes"] == path.stat().st_size
            with pa.ipc.open_stream(pa.memory_map(str(path))) as reader:
                table = reader.read_all()
            assert table.schema.field("input_ids").type == pa.list_(pa.uint16())
            assert table.num_rows == s["documents"]
            tokens, offsets = read_shard_tokens(path)
            assert len(tokens) == s["tokens"] == offsets[-1]
            assert np.all(tokens[offsets[1:] - 1] == 2), "every document ends with </s>"
            assert np.all(np.diff(offsets) >= 2)
            # The same file through Hugging Face datasets: same documents, same ids.
            ds = datasets.Dataset.from_file(str(path))
            assert ds.num_rows == table.num_rows and ds["id"] == table.column("id").to_pylist()
            assert ds["input_ids"] == table.column("input_ids").to_pylist()
        assert manifest["totals"][split]["tokens"] == sum(s["tokens"] for s in shards)
    res = run["shards"]
    assert res.train_docs + res.val_docs == run["clean"].kept
    assert res.val_docs > 0 and res.n_shards == len(manifest["splits"]["train"]) + len(manifest["splits"]["val"])


def _shard_ids(paths: RunPaths, split: str) -> list[str]:
    out: list[str] = []
    for f in sorted(paths.shards.glob(f"{split}-*.arrow")):
        with pa.ipc.open_stream(pa.memory_map(str(f))) as reader:
            out += reader.read_all().column("id").to_pylist()
    return out


def test_shards_split_order_and_content(run) -> None:
    import sentencepiece as spm

    paths, cfg = run["paths"], run["cfg"]
    kept = _kept_table(paths).to_pylist()
    ids = [r["id"] for r in kept]
    expected = assign_splits(ids, cfg.tokenizer.seed, cfg.tokenizer.val_fraction)
    assert _shard_ids(paths, "val") == [i for i, s in zip(ids, expected) if s == "val"]
    assert _shard_ids(paths, "train") == [i for i, s in zip(ids, expected) if s == "train"]
    # First train document decodes back to its clean text, and n_bytes is its UTF-8 length.
    sp = spm.SentencePieceProcessor(model_file=str(run["tok"].model_path))
    first = next(r for r, s in zip(kept, expected) if s == "train")
    tokens, offsets = read_shard_tokens(paths.shards / "train-00000.arrow")
    assert sp.decode(tokens[offsets[0] : offsets[1] - 1].tolist()) == first["text"]
    with pa.ipc.open_stream(pa.memory_map(str(paths.shards / "train-00000.arrow"))) as reader:
        assert reader.read_all().column("n_bytes")[0].as_py() == len(first["text"].encode())


def test_shards_skip_then_force_identical(run) -> None:
    cfg, paths = run["cfg"], run["paths"]
    before = _tree_hashes(paths.shards)
    assert write_shards(cfg, paths).skipped
    assert not write_shards(cfg, paths, force=True).skipped
    assert _tree_hashes(paths.shards) == before


# --------------------------------------------------------------------------------------------
# Named sources sharing one tokenizer (tokenizer.from_run)


def _docstring_corpus(path: Path) -> int:
    """A corpus unlike the prose of run ``t``: standard-library docstrings (English with code)."""
    import importlib

    docs = []
    for name in ["argparse", "json", "logging", "pathlib", "shutil", "textwrap", "zipfile", "csv", "heapq"]:
        mod = importlib.import_module(name)
        docs += [d for d in [mod.__doc__] + [getattr(v, "__doc__", None) for v in vars(mod).values()] if isinstance(d, str)]
    docs = [d for d in dict.fromkeys(docs) if len(d.split()) >= 20]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"code{i}", "text": d}) + "\n" for i, d in enumerate(docs)))
    return len(docs)


def _source_cfg(run, raw: Path, name: str, **tokenizer) -> PipelineConfig:
    base = run["cfg"].model_dump(mode="json")
    base["data"]["inputs"] = [str(raw)]
    base["data"]["gopher_quality"].update(max_symbol_to_word_ratio=1.0, min_alpha_word_fraction=0.0)
    base["tokenizer"].update(tokenizer)
    base["runtime"]["run_name"] = name
    return build_config(base)


def test_named_source_shards_with_the_tokenizer_of_another_run(run, tmp_path) -> None:
    import sentencepiece as spm

    from pretrain.data import DataIntegrityError, build_mixture

    raw = tmp_path / "raw" / "code.jsonl"
    assert _docstring_corpus(raw) > 20
    cfg = _source_cfg(run, raw, "code", from_run="t", vocab_size=999)  # training fields are ignored
    paths = RunPaths(cfg.run_dir())
    clean_corpus(cfg, paths)
    tok = train_tokenizer(cfg, paths)
    shards = write_shards(cfg, paths)

    # The copy is run t's model, verified and recorded; the shards were encoded with it.
    assert (tok.from_run, tok.sha256, tok.vocab_size) == ("t", run["tok"].sha256, 400)
    assert sha256_file(paths.tokenizer / "tokenizer.model") == run["tok"].sha256
    meta = read_json(paths.tokenizer / "meta.json")
    assert meta["from_run"]["run"] == "t" and meta["sha256"] == run["tok"].sha256
    manifest = read_json(paths.shards / "manifest.json")
    assert manifest["tokenizer_sha256"] == run["tok"].sha256 and manifest["config"]["from_run"] == "t"
    assert shards.train_docs + shards.val_docs == _kept_table(paths).num_rows > 20
    sp = spm.SentencePieceProcessor(model_file=str(run["tok"].model_path))
    first = _shard_ids(paths, "train")[0]
    text = next(r["text"] for r in _kept_table(paths).to_pylist() if r["id"] == first)
    tokens, offsets = read_shard_tokens(paths.shards / "train-00000.arrow")
    assert sp.decode(tokens[offsets[0] : offsets[1] - 1].tolist()) == text

    # Its fingerprint follows the shared tokenizer, not this run's corpus or training fields.
    assert train_tokenizer(cfg, paths).skipped
    assert train_tokenizer(cfg.model_copy(update={"tokenizer": cfg.tokenizer.model_copy(update={"vocab_size": 500})}), paths).skipped

    # The training loader mixes the two sources; a source with its own tokenizer is refused.
    mix = build_mixture({"t": run["paths"].shards, "code": paths.shards}, {"t": 1, "code": 1}, "train", 16, 2)
    picks = {mix.source_at(k) for k in range(20)}
    x, _ = mix.next_batch()
    assert picks == {"t", "code"} and x.shape == (2, 16)
    own = _source_cfg(run, raw, "own", from_run=None)
    own_paths = RunPaths(own.run_dir())
    import shutil

    shutil.copytree(paths.clean, own_paths.clean)
    train_tokenizer(own, own_paths)
    write_shards(own, own_paths)
    with pytest.raises(DataIntegrityError, match="different tokenizers"):
        build_mixture({"t": run["paths"].shards, "own": own_paths.shards}, {"t": 1, "own": 1}, "train", 16, 2)


def test_from_run_refuses_a_missing_self_or_tampered_source(run, tmp_path) -> None:
    raw = tmp_path / "raw" / "code.jsonl"
    _docstring_corpus(raw)
    paths = RunPaths(_source_cfg(run, raw, "x").run_dir())
    with pytest.raises(FileNotFoundError, match=r"no finished tokenizer.*tokenize.*'nope'"):
        train_tokenizer(_source_cfg(run, raw, "x", from_run="nope"), paths)
    with pytest.raises(ValueError, match="names this run itself"):
        train_tokenizer(_source_cfg(run, raw, "x", from_run="x"), paths)
    # A source whose model no longer matches its own records is refused, naming the file.
    import shutil

    runs_root = Path(run["cfg"].runtime.runs_root)
    shutil.copytree(run["paths"].tokenizer, runs_root / "tampered" / "tokenizer")
    model = runs_root / "tampered" / "tokenizer" / "tokenizer.model"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ValueError, match=r"tampered/tokenizer/tokenizer\.model: sha256 .* does not match"):
        train_tokenizer(_source_cfg(run, raw, "x", from_run="tampered"), paths)
