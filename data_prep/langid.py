"""Language identification with py3langid (the langid.py model ships inside the wheel).

The model takes about half a second to load, so it is loaded once per worker process and shared
by every batch that process cleans.
"""

from __future__ import annotations

from functools import lru_cache

from data_prep.filters import DocStats, Drop, Filter


@lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    # norm_probs: scores are probabilities in [0, 1], so a threshold means the same for every text.
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability). Newlines are spaces to the model (as in datatrove)."""
    lang, score = _identifier().classify(text.replace("\n", " "))
    return str(lang), float(score)


class LanguageFilter(Filter):
    """Keep documents whose most likely language is in ``languages`` with probability >= ``threshold``.

    An empty ``languages`` keeps every language (the language is still recorded).
    """

    name = "language"

    def __init__(self, *, languages: list[str], threshold: float) -> None:
        self.languages = set(languages)
        self.threshold = threshold

    def check(self, text: str, stats: DocStats) -> str | None:
        lang, score = identify(text)
        stats.language, stats.language_score = lang, score
        if self.languages and lang not in self.languages:
            return Drop(lang, score)
        if score < self.threshold:
            return Drop("low_score", score)
        return None
