"""The clean stage's funnel (pipeline order, reasons grouped by filter, languages folded) and the
samples of dropped documents (excerpt, score, place) a person tunes the filters with."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_prep.inspect import dropped_samples, examples_by_reason, fold_languages, format_samples, funnel, funnel_rows

STATS = {
    "docs_in": 1000,
    "skipped_blank_lines": 2,
    "kept": 570,
    "quarantined": 5,
    "quarantine_reasons": {"bad_json": 4, "invalid_utf8": 1},
    # Alphabetical, as stats.json holds them: the funnel must not keep this order.
    "dropped": {
        "c4:too_few_sentences": 40,
        "contamination:lambada": 3,
        "exact_duplicate": 30,
        "fineweb:line_punct_ratio": 20,
        "gopher_quality:too_few_words": 50,
        "gopher_repetition:top_2_gram": 60,
        "language:de": 50,
        "language:es": 20,
        "language:fr": 30,
        "language:it": 10,
        "language:ja": 8,
        "language:low_score": 12,
        "language:nl": 7,
        "language:pl": 7,
        "long_document": 1,
        "minhash_duplicate": 77,
    },
    "pii_redacted": {"email": 9, "ip": 0, "phone": 2},
}


def test_funnel_runs_in_pipeline_order_and_every_count_adds_up():
    steps = funnel(STATS)
    assert [s.step for s in steps] == [
        "input", "read", "repair", "language", "repetition", "quality", "decontamination", "PII",
        "exact dedup", "near dedup", "kept",
    ]
    assert steps[0].left == 1002  # lines in, blank ones included
    for before, step in zip(steps, steps[1:-1]):
        assert step.left == before.left - step.removed == before.left - sum(n for _, n in step.reasons)
    assert steps[-2].left == steps[-1].left == STATS["kept"]
    by_name = {s.step: s for s in steps}
    assert by_name["read"].reasons == [("quarantine:bad_json", 4), ("blank line", 2), ("quarantine:invalid_utf8", 1)]
    # Reasons are grouped under their filter's step, most frequent first.
    assert [r for r, _ in by_name["quality"].reasons] == ["gopher_quality:too_few_words", "c4:too_few_sentences", "fineweb:line_punct_ratio"]
    assert by_name["near dedup"].reasons == [("minhash_duplicate", 77)]
    assert by_name["PII"].removed == 0 and by_name["PII"].note == "redacted 9 email, 2 phone"


def test_languages_fold_to_the_top_five_plus_other():
    language = {s.step: s for s in funnel(STATS)}["language"]
    assert language.reasons == [
        ("language:de", 50), ("language:fr", 30), ("language:es", 20), ("language:other", 14),
        ("language:low_score", 12), ("language:it", 10), ("language:ja", 8),
    ]
    assert language.removed == 144
    # Ties among the folded ones are broken by name, so the fold is deterministic.
    assert fold_languages({"language:b": 1, "language:a": 1, "x": 3}, top=1) == {"x": 3, "language:a": 1, "language:other": 1}
    assert fold_languages({"language:en": 4}) == {"language:en": 4}


def test_unknown_filters_get_their_own_step_before_pii_and_rows_have_shares():
    stats = {"docs_in": 10, "kept": 7, "dropped": {"my_filter:odd": 3}}
    steps = funnel(stats)
    names = [s.step for s in steps]
    assert names.index("other filters") == names.index("PII") - 1 and steps[names.index("other filters")].removed == 3
    rows = funnel_rows(stats)
    assert rows[0] == {"step": "input", "removed": 0, "left": 10, "left_share": "100.0%", "reasons": ""}
    assert rows[-1]["step"] == "kept" and rows[-1]["left_share"] == "70.0%"


SPAM = "buy cheap pills now " * 60
FRENCH = "Le chat dort sur la table de la cuisine pendant que les enfants jouent dans le jardin avec le chien."
MENU = "Home About Contact\nClick here to subscribe now\nShare this with all of your friends today"
GOOD = ("The river runs through the valley and the farmers bring their goods to the market in town. They have "
        "done this for many years. The town has grown with the trade that came to it. The old bridge was built "
        "of stone and has stood for a long time. People still cross it every day on their way to work.")


@pytest.fixture(scope="module")
def cleaned_run(ray_cluster, tmp_path_factory):
    """The sample corpus (it has duplicates) plus planted documents for known filters, cleaned on Ray."""
    from data_prep.clean import clean_corpus
    from data_prep.sample_corpus import build_sample_corpus
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import build_config

    root = tmp_path_factory.mktemp("inspect")
    build_sample_corpus(root / "raw.jsonl", max_docs=300)
    planted = [{"id": "spam", "text": SPAM}, {"id": "french", "text": FRENCH}, {"id": "menu", "text": MENU},
               {"id": "good", "text": GOOD}, {"id": "good-again", "text": GOOD}]
    with open(root / "raw.jsonl", "a") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in planted)
    cfg = build_config({
        "data": {
            "inputs": [str(root / "raw.jsonl")], "c4": {"enabled": True}, "dropped_excerpt_chars": 120,
            "language": {"threshold": 0},  # the spam is English, but not surely enough for the default
        },
        "runtime": {"runs_root": str(root / "runs"), "run_name": "r", "num_cpus": 2},
    })
    clean_corpus(cfg, RunPaths(cfg.run_dir()))
    return cfg, root


@pytest.mark.integration
def test_dropped_documents_keep_an_excerpt_and_the_filters_score(cleaned_run):
    cfg, _ = cleaned_run
    (spam,) = [r for r in dropped_samples(cfg.run_dir(), "gopher_repetition", n=10_000) if r["id"] == "spam"]
    assert spam["drop_reason"] == "gopher_repetition:top_2_gram" and spam["excerpt"] == SPAM[:120]
    # "buy cheap" is 9 characters, 60 times, in a text of 1199: the share that crossed 0.2.
    assert spam["score"] == pytest.approx(9 * 60 / len(SPAM.strip()))
    assert spam["source"].endswith("raw.jsonl") and spam["line"] > 300 - 10
    (french,) = [r for r in dropped_samples(cfg.run_dir(), "language", n=10_000) if r["id"] == "french"]
    assert french["drop_reason"] == "language:fr" and 0.65 <= french["score"] <= 1 and french["excerpt"] == FRENCH[:120]
    # C4 rewrites before it judges: the excerpt shows the document as C4 got it, not its empty rewrite.
    (menu,) = [r for r in dropped_samples(cfg.run_dir(), "c4", n=10_000) if r["id"] == "menu"]
    assert menu["drop_reason"] == "c4:too_few_sentences" and menu["excerpt"] == MENU and menu["score"] == 0
    (dup,) = dropped_samples(cfg.run_dir(), "exact_duplicate")
    assert dup["id"] == "good-again" and dup["score"] is None and dup["excerpt"] == GOOD[:120]


@pytest.mark.integration
def test_samples_are_seeded_and_an_unknown_reason_names_the_known_ones(cleaned_run):
    cfg, _ = cleaned_run
    any_reason = dropped_samples(cfg.run_dir(), n=5, seed=3)
    assert len(any_reason) == 5 and any_reason == dropped_samples(cfg.run_dir(), n=5, seed=3)
    assert any_reason != dropped_samples(cfg.run_dir(), n=5, seed=4)
    with pytest.raises(ValueError, match="no dropped document has reason 'c4:nothing'.*gopher_repetition:top_2_gram"):
        dropped_samples(cfg.run_dir(), "c4:nothing")
    examples = examples_by_reason(cfg.run_dir(), top=3, per_reason=3)
    assert len(examples) == 3 and all(0 < len(rows) <= 3 for rows in examples.values())
    assert all(r["drop_reason"] == reason for reason, rows in examples.items() for r in rows)
    assert "\n    buy cheap pills now buy cheap" in format_samples([r for r in dropped_samples(cfg.run_dir(), "gopher_repetition", n=10_000) if r["id"] == "spam"])


@pytest.mark.integration
def test_cli_report_and_funnel_show_what_was_dropped(cleaned_run, tmp_path, capsys):
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.cli import main
    from pretrain_pipeline.config import dump_config
    from pretrain_pipeline.report import write_report

    cfg, _ = cleaned_run
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(cfg))
    assert main(["inspect", "-c", str(config), "--reason", "language:fr", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("language:fr  score 0.") and "  id french  " in out and f"\n    {FRENCH[:40]}" in out
    assert main(["inspect", "-c", str(config), "--reason", "no_such_filter"]) == 2
    assert "no dropped document has reason 'no_such_filter'" in capsys.readouterr().err
    assert main(["inspect", "-c", str(config)]) == 0
    steps = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert steps[:4] == ["input", "read", "repair", "language"] and steps[-1] == "kept"

    report = write_report(RunPaths(cfg.run_dir())).read_text()
    funnel_table = report[report.index("| step | removed | left | reasons |"):]
    rows = [line.split("|")[1].strip() for line in funnel_table.splitlines()[2:] if line.startswith("|")]
    assert rows[:3] == ["input", "read", "repair"] and rows[-1] == "kept"
    examples = report[report.index("Dropped documents, three for each"):]
    assert examples.count("\n**") == 5 and examples.count("\n- `") >= 5
    assert (cfg.run_dir() / "plots" / "filter_funnel.png").stat().st_size > 0
