"""What every document filter shares: the per-document figures (:class:`DocStats`) and the
:class:`Filter` protocol.

A filter is called as ``f(text, stats)`` and returns None to keep a document or the drop reason
``"<filter name>:<why>"``; subclasses implement ``check``, which returns only the ``<why>``, as a
plain string or as a :class:`Drop` that also carries the measured value (the filter's score).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np


class DocStats:
    """Figures several filters need, computed once per document and only when first asked for;
    the language filter records its decision here too."""

    def __init__(self, text: str) -> None:
        self.words = text.split()
        self.n_words = len(self.words)
        self.language = ""
        self.language_score = 0.0
        self._grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @cached_property
    def vocab(self) -> dict[str, int]:
        """Distinct words -> dense ids in order of first occurrence."""
        ids: dict[str, int] = {}
        self._ids = np.fromiter((ids.setdefault(w, len(ids)) for w in self.words), dtype=np.int64, count=self.n_words)
        return ids

    @cached_property
    def word_ids(self) -> np.ndarray:
        self.vocab  # noqa: B018 - fills self._ids
        return self._ids

    @cached_property
    def word_counts(self) -> np.ndarray:
        return np.bincount(self.word_ids, minlength=len(self.vocab))

    @cached_property
    def _len_cumsum(self) -> np.ndarray:
        out = np.zeros(self.n_words + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, self.words), dtype=np.int64, count=self.n_words), out=out[1:])
        return out

    @property
    def word_chars(self) -> int:
        """Characters in all words together (whitespace not counted)."""
        return int(self._len_cumsum[-1])

    def gram_chars(self, n: int, sep: int = 1) -> np.ndarray:
        """Characters of the n-gram at each position, words joined by ``sep`` characters."""
        cs = self._len_cumsum
        return cs[n:] - cs[:-n] + sep * (n - 1)

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(id of the n-gram at each position, occurrences of each id); exact, no hashing:
        an n-gram's id is the id of (its first n-1 words' id, its last word's id)."""
        if n in self._grams:
            return self._grams[n]
        if n == 1:
            ids, counts = self.word_ids, self.word_counts
        else:
            prev, prev_counts = self.grams(n - 1)
            m = len(prev) - 1
            # An n-gram can only repeat where its first n-1 words do: only those positions are
            # sorted; every other position is an n-gram of its own (count 1).
            maybe = prev_counts[prev[:-1]] > 1
            ids = np.empty(m, dtype=np.int64)
            if maybe.any():
                pair = prev[:-1][maybe] * np.int64(len(self.vocab)) + self.word_ids[n - 1 :][maybe]
                _, inv, repeated = np.unique(pair, return_inverse=True, return_counts=True)
                ids[maybe] = inv.reshape(-1)
                n_single = m - len(pair)
                ids[~maybe] = np.arange(len(repeated), len(repeated) + n_single)
                counts = np.concatenate([repeated, np.ones(n_single, dtype=repeated.dtype)])
            else:
                ids[:] = np.arange(m)
                counts = np.ones(m, dtype=np.int64)
        self._grams[n] = (ids, counts)
        return ids, counts


class Drop(str):
    """A drop reason that carries the filter's score: the measured value that crossed its
    threshold (a ratio, a count), kept next to the document in ``dropped.parquet`` for tuning."""

    score: float | None

    def __new__(cls, why: str, score: float | None = None) -> "Drop":
        reason = super().__new__(cls, why)
        reason.score = None if score is None else float(score)
        return reason


class Filter:
    """Keeps or drops one document; ``name`` prefixes its drop reasons and names its config section."""

    name = "filter"

    def __call__(self, text: str, stats: DocStats) -> Drop | None:
        reason = self.check(text, stats)
        return None if reason is None else Drop(f"{self.name}:{reason}", getattr(reason, "score", None))

    def check(self, text: str, stats: DocStats) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


class LineFilter(Filter):
    """A filter that may also rewrite the text (drop lines); ``rewrite`` runs before ``check``."""

    def rewrite(self, text: str) -> str:
        return text


def count_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated items, characters in them): the second and later copies count."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars
