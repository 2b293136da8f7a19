"""Gopher repetition rules (Rae et al. 2021), in datatrove's order: repeated paragraphs, lines and
n-grams mark boilerplate and spam.

Words are split on whitespace. The n-gram rules work on the integer word ids of :class:`DocStats`
with numpy instead of joining and hashing strings per n-gram.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from data_prep.filters.base import DocStats, Drop, Filter, count_duplicates

# Below this many words the n-gram rules count word tuples in plain Python: numpy's fixed cost
# per call is then larger than the work.
NUMPY_NGRAMS_FROM_WORDS = 64

_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


def _word_tuples(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[k:] for k in range(n))))


def _top_ngram_chars(stats: DocStats, n: int) -> int | None:
    """Characters in the most frequent n-gram (first seen wins a tie), times its count; None
    when the document has fewer than n words. An n-gram seen once is no repetition: 0
    (datatrove counts it, which drops short documents here; with Gopher's 50-word minimum the
    two agree)."""
    if stats.n_words < n:
        return None
    if stats.n_words < NUMPY_NGRAMS_FROM_WORDS:
        # max() returns the first of equal counts, and a Counter iterates in first-seen order.
        gram, count = max(Counter(_word_tuples(stats.words, n)).items(), key=itemgetter(1))
        return 0 if count < 2 else (sum(map(len, gram)) + n - 1) * count
    ids, counts = stats.grams(n)
    per_position = counts[ids]
    first = int(np.argmax(per_position))  # first position holding a most frequent n-gram
    if per_position[first] < 2:
        return 0
    return int(stats.gram_chars(n)[first]) * int(per_position[first])


def _duplicate_ngram_chars(stats: DocStats, n: int) -> int:
    """Characters (words joined without spaces) in repeated n-grams, counted without overlap as
    datatrove's ``find_all_duplicate``: after a repeat the scan skips ahead by n words.

    Only positions whose n-gram occurs more than once can ever be a repeat, so the scan visits
    just those; the others would only have advanced the cursor by one."""
    if stats.n_words < n:
        return 0
    if stats.n_words < NUMPY_NGRAMS_FROM_WORDS:
        grams = _word_tuples(stats.words, n)
        seen_grams: set[tuple[str, ...]] = set()
        total = pos = 0
        while pos < len(grams):
            if grams[pos] in seen_grams:
                total += sum(map(len, grams[pos]))
                pos += n
            else:
                seen_grams.add(grams[pos])
                pos += 1
        return total
    ids, counts = stats.grams(n)
    candidates = np.flatnonzero(counts[ids] > 1)
    if not len(candidates):
        return 0
    chars = stats.gram_chars(n, sep=0)[candidates].tolist()
    seen: set[int] = set()
    total = resume = 0
    for pos, gram, c in zip(candidates.tolist(), ids[candidates].tolist(), chars):
        if pos < resume:
            continue
        if gram in seen:
            total += c
            resume = pos + n
        else:
            seen.add(gram)
    return total


@dataclass(kw_only=True)
class GopherRepetition(Filter):
    """Drops documents whose duplicated paragraphs, lines or n-grams exceed the given shares.

    ``top_n_grams`` and ``dup_n_grams`` map n to the largest share of characters allowed in the
    most frequent n-gram, and in all repeated n-grams; smaller n are checked first."""

    name = "gopher_repetition"

    dup_line_frac: float
    dup_para_frac: float
    dup_line_char_frac: float
    dup_para_char_frac: float
    top_n_grams: dict[int, float]
    dup_n_grams: dict[int, float]

    def __post_init__(self) -> None:
        self._top = tuple(sorted(self.top_n_grams.items()))
        self._dup = tuple(sorted(self.dup_n_grams.items()))

    def check(self, text: str, stats: DocStats) -> str | None:
        if not text:
            return "empty"
        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, chars = count_duplicates(paragraphs)
        if n_dup / len(paragraphs) > self.dup_para_frac:
            return Drop("duplicate_paragraphs", n_dup / len(paragraphs))
        if chars / len(text) > self.dup_para_char_frac:
            return Drop("duplicate_paragraph_chars", chars / len(text))
        lines = _LINES.split(text)
        n_dup, chars = count_duplicates(lines)
        if n_dup / len(lines) > self.dup_line_frac:
            return Drop("duplicate_lines", n_dup / len(lines))
        if chars / len(text) > self.dup_line_char_frac:
            return Drop("duplicate_line_chars", chars / len(text))
        for n, frac in self._top:
            top = _top_ngram_chars(stats, n)
            if top is not None and top / len(text) > frac:
                return Drop(f"top_{n}_gram", top / len(text))
        for n, frac in self._dup:
            chars = _duplicate_ngram_chars(stats, n)
            if chars / len(text) > frac:
                return Drop(f"duplicated_{n}_grams", chars / len(text))
            if chars == 0:
                break  # no repeated n-gram means no repeated longer one either (n only grows)
        return None
