"""Benchmark decontamination: lm-eval task texts (local task YAMLs + jsonl shipped in
tests/data/lm_eval_tasks, read by lm-eval's own TaskManager, nothing downloaded) against planted
contaminated documents, from the n-gram index to the clean stage's stats."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_prep.benchmarks import load_benchmark_texts
from data_prep.filters import DocStats
from data_prep.filters.decontamination import BenchmarkNgrams, Decontaminate, normalized_words

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests" / "data" / "lm_eval_tasks"


@pytest.fixture
def task_dir(tmp_path, monkeypatch):
    """The shipped task YAMLs with absolute data paths (the shipped ones are relative to the repo root)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    out = tmp_path / "tasks"
    out.mkdir()
    for path in TASKS.iterdir():
        text = path.read_text()
        if path.suffix == ".yaml":
            text = text.replace("tests/data/lm_eval_tasks/", f"{out}/")
        (out / path.name).write_text(text)
    return out


def _qa(i: int) -> dict:
    return json.loads((TASKS / "tiny_qa.jsonl").read_text().splitlines()[i])


def test_task_texts_are_context_and_every_continuation(task_dir) -> None:
    texts = load_benchmark_texts(["tiny_qa", "tiny_choice"], str(task_dir))
    assert sorted(texts) == ["tiny_choice", "tiny_qa"]
    first = _qa(0)
    assert texts["tiny_qa"][0] == f"Question: {first['question']}\nAnswer: {first['answer']}"
    choice = json.loads((TASKS / "tiny_choice.jsonl").read_text().splitlines()[0])
    # Every choice is scored after the context, so every choice is text the model is shown.
    assert texts["tiny_choice"][:2] == [f"{choice['context']} {c}" for c in choice["choices"]]
    assert len(texts["tiny_choice"]) == 4


def test_unknown_task_is_refused_by_name(task_dir) -> None:
    with pytest.raises(ValueError, match="no_such_benchmark"):
        load_benchmark_texts(["tiny_qa", "no_such_benchmark"], str(task_dir))


def _index(n: int = 13) -> BenchmarkNgrams:
    texts = {"tiny_qa": [f"Question: {q['question']}\nAnswer: {q['answer']}" for q in map(_qa, range(3))],
             "tiny_choice": ["The engineer opened the relief valve very slowly so that the pressure inside the steel tank would fall"]}
    return BenchmarkNgrams.build(texts, n)


def _reason(index: BenchmarkNgrams, text: str) -> str | None:
    return Decontaminate(index)(text, DocStats(text))


def test_thirteen_shared_words_drop_twelve_keep() -> None:
    index = _index()
    question = _qa(1)["question"]
    words = question.rstrip("?").split()
    assert len(words) >= 14
    planted = f"Some quiz notes. {' '.join(words[:13]).upper()}! And then the essay goes on about other things."
    near_miss = f"Some quiz notes. {' '.join(words[:12])}, and then the essay goes on about other things."
    assert _reason(index, planted) == "contamination:tiny_qa"
    assert _reason(index, near_miss) is None
    # Punctuation and case do not hide an n-gram; an n-gram across question and answer counts.
    straddle = " ".join(normalized_words(f"{question} Answer: {_qa(1)['answer']}")[-13:])
    assert _reason(index, f"From a forum: {straddle}.") == "contamination:tiny_qa"
    assert _reason(index, "the engineer opened the relief valve very slowly so that the pressure inside the steel") == "contamination:tiny_choice"


def test_ngram_size_is_configurable_and_part_of_the_hash() -> None:
    text = " ".join(_qa(2)["question"].split()[:8])
    assert _reason(_index(13), text) is None
    assert _reason(_index(8), text) == "contamination:tiny_qa"
    assert _index(8).sha256 != _index(13).sha256
    assert _index(13).sha256 == _index(13).sha256


def test_an_ngram_in_two_tasks_is_credited_to_the_first_in_sorted_order() -> None:
    shared = "one two three four five six seven eight nine ten eleven twelve thirteen"
    index = BenchmarkNgrams.build({"zeta": [shared], "alpha": [f"intro {shared}"]}, 13)
    assert index.first_match(f"x {shared} y") == "alpha"
    assert index.ngrams_per_task == {"alpha": 2, "zeta": 1}


def test_filter_runs_last_and_needs_the_ngrams_built_in_the_driver() -> None:
    from data_prep.cleaner import build_filters
    from pretrain_pipeline.config import DataConfig

    cfg = DataConfig(decontaminate={"tasks": ["tiny_qa"]})
    with pytest.raises(ValueError, match="benchmark_ngrams"):
        build_filters(cfg)
    assert isinstance(build_filters(cfg, _index())[-1], Decontaminate)
    assert not any(isinstance(f, Decontaminate) for f in build_filters(DataConfig(), _index()))


# --------------------------------------------------------------------------------------------
# The clean stage: planted documents are dropped with their task's name, counted per task, and
# the task texts are part of the stage fingerprint.

PROSE = [
    "The library committee met on Tuesday to discuss the budget for the coming year. Members agreed to "
    "extend the opening hours on weekends and to buy more audiobooks, which are now the items that are "
    "borrowed most often. A public consultation will run until the end of the month.",
    "Coral reefs cover less than one percent of the ocean floor, yet they support about a quarter of all "
    "marine species. The corals live together with tiny algae that give them most of their energy, and "
    "when the water stays too warm for too long the corals lose the algae and turn white.",
    "Bees tell each other where to find food by dancing. A forager that comes back to the hive runs in a "
    "straight line while she shakes her body, and the angle of that run shows the other bees the direction "
    "of the flowers, while the length of the dance tells them how far away the flowers are.",
]

NEAR_MISS_PROSE = (
    "Glaciers move because ice slowly deforms under its own weight. Near the base, water from melting ice "
    "can let the glacier slide over the rock, which is why some glaciers surge forward in a single season."
)


@pytest.mark.integration
def test_clean_stage_drops_planted_documents_per_task(task_dir, tmp_path, ray_cluster) -> None:
    from data_prep.clean import clean_corpus
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import build_config

    q = _qa(0)
    choice = json.loads((task_dir / "tiny_choice.jsonl").read_text().splitlines()[1])
    docs = [{"id": f"clean{i}", "text": t} for i, t in enumerate(PROSE)]
    docs += [
        {"id": "leak-qa", "text": f"{PROSE[0]} In the pub quiz the host asked: {q['question']} Everybody knew that {q['answer']}"},
        {"id": "leak-choice", "text": f"{PROSE[1]} {choice['context']} {choice['choices'][0]}"},
        # Its own prose: a near copy of a kept document would be dropped by MinHash, not kept.
        {"id": "near-qa", "text": f"{NEAR_MISS_PROSE} {' '.join(q['question'].split()[:12])} and that is all we know."},
    ]
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg = build_config({
        "data": {"inputs": [str(raw)], "decontaminate": {"tasks": ["tiny_qa", "tiny_choice"]}},
        "eval": {"lm_eval_include_path": str(task_dir)},
        "runtime": {"runs_root": str(tmp_path / "runs"), "run_name": "decont", "num_cpus": 2},
    })
    paths = RunPaths(cfg.run_dir())
    result = clean_corpus(cfg, paths)
    dropped = {r["id"]: r["drop_reason"] for r in pq.read_table(paths.clean / "dropped.parquet").to_pylist()}
    assert dropped == {"leak-qa": "contamination:tiny_qa", "leak-choice": "contamination:tiny_choice"}
    assert result.kept == 4
    stats = json.loads((paths.clean / "stats.json").read_text())
    assert stats["contamination"]["documents"] == {"tiny_choice": 1, "tiny_qa": 1}
    assert stats["contamination"]["ngram"] == 13
    from pretrain_pipeline.report import write_report

    report = write_report(paths).read_text()
    assert "| tiny_qa | 1 |" in report and "| tiny_choice | 1 |" in report

    # Same config, same inputs: current. A task's data changes (the YAML and names do not): stale,
    # and the changed question no longer matches the planted document.
    assert clean_corpus(cfg, paths).skipped
    rows = (task_dir / "tiny_qa.jsonl").read_text().splitlines()
    (task_dir / "tiny_qa.jsonl").write_text("\n".join([json.dumps({"question": "Who wrote it?", "answer": "Nobody."}), *rows[1:]]) + "\n")
    again = clean_corpus(cfg, paths)
    assert not again.skipped and again.fingerprint != result.fingerprint
    assert "contamination:tiny_qa" not in again.dropped
