"""Integration: the clean stage on a realistic corpus, on a real local Ray (2 CPUs).

Real English prose (stdlib docstrings) plus what a scraped corpus really holds: exact copies,
near-copies with small edits, other languages, boilerplate, gibberish, mojibake, PII and broken
lines. Near-duplicates in the base are removed first with datasketch's MinHashLSH, an independent
implementation, so "good documents removed" really counts mistakes.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.clean import WORK_DIR, WorkUnit, _identity, _work_paths, clean_corpus, clean_unit, plan_work, resolve_inputs
from data_prep.cleaner import text_hash
from data_prep.sample_corpus import build_sample_corpus
from pretrain_pipeline.artifacts import RunPaths, sha256_file
from pretrain_pipeline.config import PipelineConfig, RuntimeConfig, build_config

pytestmark = pytest.mark.integration

OTHER_LANGUAGES = [
    "La bibliothèque municipale ouvre ses portes chaque matin à neuf heures. Les lecteurs y trouvent des "
    "romans, des journaux et des revues scientifiques. Le personnel aide les étudiants à chercher des "
    "documents anciens et organise des ateliers pour les enfants pendant les vacances scolaires.",
    "Die Stadtbibliothek öffnet jeden Morgen um neun Uhr. Die Leser finden dort Romane, Zeitungen und "
    "wissenschaftliche Zeitschriften. Das Personal hilft den Studenten bei der Suche nach alten Dokumenten "
    "und veranstaltet in den Schulferien Werkstätten für Kinder und ihre Eltern.",
    "La biblioteca municipal abre sus puertas cada mañana a las nueve. Los lectores encuentran novelas, "
    "periódicos y revistas científicas. El personal ayuda a los estudiantes a buscar documentos antiguos y "
    "organiza talleres para los niños durante las vacaciones escolares de verano.",
]
MOJIBAKE_SENTENCE = "The café near the station serves crème brûlée and a naïve résumé of the menu."
PII_SENTENCE = (
    "For questions write to jane.doe@example.org or call +1 (415) 555-0132, and note that the "
    "build server lives at 93.184.216.34 and 2a00:1450:4001:82a::200e for now."
)
PII_STRINGS = ["jane.doe@example.org", "555-0132", "93.184.216.34", "2a00:1450:4001:82a::200e"]


def _edit(text: str, rng: random.Random) -> str:
    """A near copy: about one word in a hundred substituted, deleted or inserted."""
    words = text.split(" ")
    for _ in range(max(1, len(words) // 100)):
        i = rng.randrange(len(words))
        op = rng.choice(["sub", "del", "ins"])
        if op == "sub":
            words[i] = rng.choice(["river", "lantern", "quietly", "seven"])
        elif op == "del":
            del words[i]
        else:
            words.insert(i, rng.choice(["indeed", "also", "again"]))
    return " ".join(words)


def _base_documents(tmp: Path) -> list[str]:
    """Unique docstrings with no near-duplicate among them (datasketch LSH at Jaccard 0.5)."""
    from datasketch import MinHash, MinHashLSH

    build_sample_corpus(tmp / "s.jsonl", 2500, seed=0)
    seen: set[str] = set()
    lsh = MinHashLSH(threshold=0.5, num_perm=64)
    out: list[str] = []
    for line in (tmp / "s.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        h = text_hash(text)
        if h in seen or len(text.split()) < 20:
            continue
        seen.add(h)
        words = text.lower().split()
        m = MinHash(num_perm=64, seed=7)
        for i in range(max(1, len(words) - 4)):
            m.update(" ".join(words[i : i + 5]).encode())
        if lsh.query(m):
            continue
        lsh.insert(str(len(out)), m)
        out.append(text)
    return out


def _write_jsonl(path: Path, records: list[dict], raw_lines: dict[int, bytes] | None = None) -> None:
    lines = [json.dumps(r).encode() for r in records]
    for at, raw in sorted((raw_lines or {}).items()):
        lines.insert(at, raw)
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _make_corpus(root: Path) -> dict:
    rng = random.Random(11)
    root.mkdir(parents=True)
    base = _base_documents(root.parent)
    records = [{"id": f"g{i}", "text": t} for i, t in enumerate(base)]
    moji_ids = [f"g{i}" for i in rng.sample(range(len(base)), 6)]
    pii_ids = [f"g{i}" for i in rng.sample(range(len(base)), 10)]
    for r in records:
        if r["id"] in moji_ids:
            r["text"] = (r["text"] + "\n\n" + MOJIBAKE_SENTENCE).encode("utf-8").decode("cp1252", errors="replace")
        if r["id"] in pii_ids:
            r["text"] += "\n\n" + PII_SENTENCE
    _write_jsonl(root / "00-base.jsonl", records)

    long_ones = [r for r in records if len(r["text"].split()) >= 100 and r["id"] not in moji_ids + pii_ids]
    near = rng.sample(long_ones, min(80, len(long_ones)))
    exact = rng.sample(records, 40)
    copies = [{"id": f"near-{r['id']}", "text": _edit(r["text"], rng)} for r in near]
    copies += [{"id": f"exact-{r['id']}", "text": r["text"] if i % 2 else "  " + r["text"].upper()} for i, r in enumerate(exact)]
    _write_jsonl(root / "10-copies.jsonl.gz", copies)

    noise = [{"id": f"lang{i}", "text": OTHER_LANGUAGES[i % 3] + f" ({i})"} for i in range(9)]
    menu = "Home | About us | Products | Contact\nLogin | Register | Cart\n"
    noise += [{"id": f"boiler{i}", "text": menu * 8 + f"Copyright {2000 + i} All rights reserved."} for i in range(5)]
    letters = "bcdfghjklmnpqrstvwxz"
    noise += [{"id": f"gib{i}", "text": " ".join("".join(rng.choice(letters) for _ in range(rng.randint(3, 12))) for _ in range(80))} for i in range(5)]
    bad = {2: b"{truncated json", 5: b'{"id": "u", "text": "bad \xff\xfe utf8"}', 7: b'{"id": "n", "text": null}', 9: b'{"id": "z", "text": "nul \\u0000 here"}'}
    _write_jsonl(root / "20-noise.jsonl", noise, bad)
    return {"base": records, "near": near, "exact": exact, "moji_ids": moji_ids, "pii_ids": pii_ids, "noise": noise, "bad_lines": len(bad)}


def _config(root: Path, name: str, **data: object) -> PipelineConfig:
    return build_config(
        {
            # Docstrings are short: Gopher's 50-word minimum and the stop-word rule would drop most.
            "data": {"inputs": [str(root / "raw")], "documents_per_shard": 500, "gopher_quality": {"min_words": 20, "min_stop_words": 0}, **data},
            "runtime": {"runs_root": str(root / "runs"), "run_name": name, "num_cpus": 2},
        }
    )


@pytest.fixture(scope="module")
def run(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("cq")
    corpus = _make_corpus(root / "raw")
    cfg = _config(root, "a")
    paths = RunPaths(cfg.run_dir())
    result = clean_corpus(cfg, paths)
    kept = pq.read_table(paths.clean / "part-00000.parquet").to_pylist() if result.parts else []
    for part in result.parts[1:]:
        kept += pq.read_table(paths.clean / part).to_pylist()
    dropped = pq.read_table(paths.clean / "dropped.parquet").to_pylist()
    quarantine = [json.loads(x) for x in (paths.clean / "quarantine.jsonl").read_text().splitlines()]
    return {"root": root, "cfg": cfg, "paths": paths, "result": result, "corpus": corpus, "kept": kept, "dropped": dropped, "quarantine": quarantine}


def test_every_input_record_is_accounted_for_once(run) -> None:
    seen = [(Path(r["source"]).name, r["line"]) for r in run["kept"] + run["dropped"] + run["quarantine"]]
    expected = []
    for f in sorted((run["root"] / "raw").iterdir()):
        data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        expected += [(f.name, i) for i, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    assert sorted(seen) == sorted(expected)
    res = run["result"]
    assert res.docs_in == len(expected) == res.kept + sum(res.dropped.values()) + res.quarantined
    assert res.quarantined == run["corpus"]["bad_lines"]


def test_near_duplicates_found_and_good_documents_kept(run) -> None:
    by_id = {r["id"]: r["drop_reason"] for r in run["dropped"]}
    kept_ids = {r["id"] for r in run["kept"]}
    # Originals that pass the filters are "good"; a near copy counts when its original is good and
    # the copy itself passes the filters (otherwise a filter, not dedup, decides).
    good = [r["id"] for r in run["corpus"]["base"] if by_id.get(r["id"], "").split(":")[0] not in {"language", "gopher_quality", "gopher_repetition", "fineweb", "c4"}]
    pairs = [(r["id"], f"near-{r['id']}") for r in run["corpus"]["near"] if r["id"] in kept_ids]
    cases = [c for _, c in pairs if c in kept_ids or by_id[c] in ("minhash_duplicate", "exact_duplicate")]
    assert len(cases) >= 40
    recall = sum(1 for c in cases if c not in kept_ids) / len(cases)
    assert recall >= 0.95, recall
    wrongly_removed = [g for g in good if by_id.get(g) in ("minhash_duplicate", "exact_duplicate")]
    assert len(wrongly_removed) <= 0.005 * len(good), wrongly_removed
    # Exact copies (and their upper-case, padded twins) go; the first copy, in file order, stays.
    for r in run["corpus"]["exact"]:
        if r["id"] in kept_ids:
            assert by_id[f"exact-{r['id']}"] == "exact_duplicate"


def test_noise_is_dropped_for_the_right_reason(run) -> None:
    by_id = {r["id"]: r["drop_reason"] for r in run["dropped"]}
    for r in run["corpus"]["noise"]:
        reason = by_id[r["id"]]
        if r["id"].startswith("lang"):
            assert reason in ("language:fr", "language:de", "language:es"), (r["id"], reason)
        elif r["id"].startswith("boiler"):
            assert reason.startswith(("gopher_repetition", "fineweb", "gopher_quality", "language")), reason
        else:
            assert reason.startswith(("language", "gopher_quality")), reason
    reasons = {q["reason"] for q in run["quarantine"]}
    assert reasons == {"bad_json", "invalid_utf8", "missing_text", "nul_byte"}


def test_mojibake_repaired_and_pii_redacted(run) -> None:
    kept = {r["id"]: r for r in run["kept"]}
    moji = [kept[i]["text"] for i in run["corpus"]["moji_ids"] if i in kept]
    assert moji, "no mojibake document survived the filters"
    for text in moji:
        assert MOJIBAKE_SENTENCE in text and "Ã" not in text
    pii_docs = [kept[i]["text"] for i in run["corpus"]["pii_ids"] if i in kept]
    assert pii_docs
    for text in pii_docs:
        assert "<EMAIL>" in text and "<PHONE_NUMBER>" in text and text.count("<IP_ADDRESS>") >= 2
    everything = "\n".join(r["text"] for r in run["kept"])
    assert not [s for s in PII_STRINGS if s in everything]
    stats = json.loads((run["paths"].clean / "stats.json").read_text())
    assert stats["pii_redacted"]["email"] >= len(pii_docs)
    assert set(stats["kept_languages"]) == {"en"}
    assert all(r["language"] == "en" and r["language_score"] >= 0.65 for r in run["kept"])


def _outputs(clean: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(clean.iterdir()) if p.is_file() and p.name != "_SUCCESS.json"}


def _plan(cfg: PipelineConfig, paths: RunPaths) -> list[WorkUnit]:
    files = resolve_inputs(cfg, paths)
    return plan_work(cfg.data, files, [_identity(f) for f in files])


def test_rerun_after_crash_redoes_only_unfinished_files(run) -> None:
    cfg = _config(run["root"], "b")
    paths = RunPaths(cfg.run_dir())
    units = _plan(cfg, paths)
    assert [u.part for u in units] == [None, None, None]  # small files: one task each
    work = paths.clean / WORK_DIR
    work.mkdir(parents=True)
    # The state a crash leaves: file 0 finished, file 1 half-written under a temp name, file 2 untouched.
    clean_unit(units[0], str(work), cfg.data)
    (work / f".{_work_paths(work, units[1].key)[0].name}.tmp-999").write_bytes(b"PAR1 half a file")
    result = clean_corpus(cfg, paths)
    assert (result.tasks, result.tasks_reused) == (3, 1)
    assert _outputs(paths.clean) == _outputs(run["paths"].clean)
    assert not (paths.clean / WORK_DIR).exists()


def test_big_files_cleaned_as_parts_give_the_same_corpus(run) -> None:
    """Plain jsonl files over ``clean_task_mb`` become several tasks (the gzip one cannot be cut);
    the outputs, line numbers and quarantine records are those of whole-file tasks, and a rerun
    after a crash redoes only the unfinished parts."""
    cfg = _config(run["root"], "parts", clean_task_mb=0.15)  # the base file is ~1 MB
    paths = RunPaths(cfg.run_dir())
    units = _plan(cfg, paths)
    by_file = {Path(u.path).name: [x.part for x in units if x.path == u.path] for u in units}
    assert len(by_file["00-base.jsonl"]) >= 5
    assert by_file["10-copies.jsonl.gz"] == by_file["20-noise.jsonl"] == [None]
    work = paths.clean / WORK_DIR
    work.mkdir(parents=True)
    clean_unit(units[1], str(work), cfg.data)
    result = clean_corpus(cfg, paths)
    assert (result.tasks, result.tasks_reused) == (len(units), 1)
    whole, parts = _outputs(run["paths"].clean), _outputs(paths.clean)
    assert {k: v for k, v in parts.items() if k != "stats.json"} == {k: v for k, v in whole.items() if k != "stats.json"}
    stats_whole, stats_parts = (json.loads((p.clean / "stats.json").read_text()) for p in (run["paths"], paths))
    for stats in (stats_whole, stats_parts):
        del stats["config"], stats["input_fingerprint"]
    assert stats_parts == stats_whole
