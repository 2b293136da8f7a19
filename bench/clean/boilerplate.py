"""Boilerplate recall and good-text retention on a labelled sample: our boilerplate filter against
datatrove's C4 filter (default settings), alone and inside the default clean chain.

    python bench/clean/boilerplate.py [--sample tests/data/boilerplate_labelled.jsonl] [--show-errors] [--cost-docs 3000]

The sample holds short documents labelled ``boilerplate`` (cookie and consent banners, privacy and
terms notices, menus, footers, sign-in, subscribe and share pages) or ``good`` (prose, man pages,
code documentation, and hard negatives: technical text about cookies, privacy, subscriptions,
sharing and logins). Recall: share of boilerplate documents dropped; retention: share of good
documents kept. datatrove's C4 filter needs spaCy for sentences by default, which this project
does not install: it gets our regex sentence splitter (data_prep.filters.c4.SENTENCE_PATTERN) and
whitespace words, as in bench/clean/run.py.

Cost: the share of the default clean chain's CPU time (``Cleaner.clean_one`` over the stdlib
docstring corpus) spent in the boilerplate filter; the median of three rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data_prep.cleaner import Cleaner  # noqa: E402
from data_prep.filters import DocStats  # noqa: E402
from data_prep.filters.boilerplate import Boilerplate  # noqa: E402
from pretrain_pipeline.config import DataConfig  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "boilerplate_labelled.jsonl"


def datatrove_c4() -> Callable[[str], bool]:
    """datatrove's C4QualityFilter with its default settings: text -> kept."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter
    from run import regex_word_tokenizer  # bench/clean/run.py, beside this script

    c4 = C4QualityFilter(language=regex_word_tokenizer())

    def keep(text: str) -> bool:
        result = c4.filter(Document(text=text, id="x"))
        return result is True or (isinstance(result, tuple) and result[0])

    return keep


def cleaner_keeps(cfg: DataConfig) -> Callable[[str], bool]:
    cleaner = Cleaner(cfg)
    return lambda text: cleaner.clean_one(text).drop_reason is None


def filter_keeps(cfg: DataConfig) -> Callable[[str], bool]:
    boilerplate = Boilerplate(**cfg.boilerplate.params())
    return lambda text: boilerplate(text, DocStats(text)) is None


def measure(keep: Callable[[str], bool], docs: list[dict]) -> tuple[float, float, list[str]]:
    """(recall on boilerplate, retention of good documents, ids decided wrongly)."""
    wrong = [d["id"] for d in docs if keep(d["text"]) != (d["label"] == "good")]
    bad = [d for d in docs if d["label"] == "boilerplate"]
    good = [d for d in docs if d["label"] == "good"]
    recall = sum(not keep(d["text"]) for d in bad) / len(bad)
    retention = sum(keep(d["text"]) for d in good) / len(good)
    return recall, retention, wrong


def cost_share(n_docs: int, rounds: int = 3) -> float:
    """Share of the default chain's CPU time spent in the boilerplate filter (median of rounds).

    Timed inside one run rather than as two runs on and off: on a shared machine two runs swing
    by more than the filter costs."""
    from data_prep.sample_corpus import build_sample_corpus

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sample.jsonl"
        build_sample_corpus(path, n_docs, seed=0)
        texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    cleaner = Cleaner(DataConfig())
    (boilerplate,) = [f for f in cleaner.filters if isinstance(f, Boilerplate)]
    spent = [0.0]
    check = boilerplate.check

    def timed_check(text: str, stats: DocStats) -> str | None:
        start = time.process_time()
        try:
            return check(text, stats)
        finally:
            spent[0] += time.process_time() - start

    boilerplate.check = timed_check  # this instance only
    [cleaner.clean_one(t) for t in texts[:200]]  # warm-up: the language model loads on first use
    shares = []
    for _ in range(rounds):
        spent[0], start = 0.0, time.process_time()
        for text in texts:
            cleaner.clean_one(text)
        shares.append(spent[0] / (time.process_time() - start))
    return statistics.median(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sample", type=Path, default=SAMPLE)
    ap.add_argument("--show-errors", action="store_true", help="List the ids each setup decides wrongly.")
    ap.add_argument("--cost-docs", type=int, default=3000, help="Docstrings timed for the cost (0: skip).")
    args = ap.parse_args()
    docs = [json.loads(line) for line in args.sample.read_text(encoding="utf-8").splitlines() if line.strip()]
    default = DataConfig()
    before = default.model_copy(update={"boilerplate": default.boilerplate.model_copy(update={"enabled": False})})
    with_c4 = before.model_copy(update={"c4": default.c4.model_copy(update={"enabled": True})})
    setups = {
        "boilerplate filter alone (ours)": filter_keeps(default),
        "datatrove C4QualityFilter alone (defaults)": datatrove_c4(),
        "default clean chain, boilerplate off (before)": cleaner_keeps(before),
        "default clean chain + C4 (ours), boilerplate off": cleaner_keeps(with_c4),
        "default clean chain (after: boilerplate on)": cleaner_keeps(default),
    }
    # "tune": the rules were written against it; "heldout": written after a first version and
    # used for one more round of rules; "test": written last, never tuned on.
    splits = {name: [d for d in docs if d["split"] == name] for name in ("tune", "heldout", "test")}
    header = " | ".join(f"{name} ({sum(d['label'] == 'boilerplate' for d in ds)} bp / {sum(d['label'] == 'good' for d in ds)} good)"
                        for name, ds in splits.items())
    print(f"recall on boilerplate / retention of good documents, per split of {args.sample.name}\n")
    print(f"| setup | {header} |\n|---|{'---|' * len(splits)}")
    errors: dict[str, list[str]] = {}
    for name, keep in setups.items():
        cells = []
        for ds in splits.values():
            recall, retention, wrong = measure(keep, ds)
            errors.setdefault(name, []).extend(wrong)
            cells.append(f"{recall:.0%} / {retention:.0%}")
        print(f"| {name} | {' | '.join(cells)} |")
    if args.show_errors:
        for name, wrong in errors.items():
            print(f"\n{name}: {' '.join(wrong) or '-'}")
    if args.cost_docs:
        print(f"\ncost: share of the default clean chain's CPU time in the boilerplate filter, {args.cost_docs} "
              f"docstrings: {cost_share(args.cost_docs):.1%}")


if __name__ == "__main__":
    main()
