"""Benchmark decontamination (GPT-3, Brown et al. 2020; datatrove's NGramsDecontFilter): a document
sharing one normalised word n-gram (13 words by default) with the text a benchmark shows its
model is dropped as ``contamination:<task>``.

The n-grams of the benchmark texts are collected once, in the driver (``data_prep.benchmarks``),
into a :class:`BenchmarkNgrams` index that is shipped to every worker. Words are hashed to 64
bits and an n-gram's hash is a sum of its words' hashes times per-position odd constants: a
document's n-grams are then hashed in a few numpy operations, and only n-grams made of words the
benchmarks contain are looked up at all.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from data_prep.filters.base import DocStats, Filter

# Lowercased letters and digits; punctuation and whitespace only separate words.
_WORD = re.compile(r"[^\W_]+")
# Fixed, so the hash of an n-gram is the same in the driver and in every worker.
_POSITION_SEED = 0x5EED_DEC0


def normalized_words(text: str) -> list[str]:
    """Lowercase, strip punctuation, split into words: "Hello, World!" -> ["hello", "world"]."""
    return _WORD.findall(text.lower())


def word_hash(word: str) -> int:
    """A stable 64-bit hash of a word (Python's ``hash`` differs between processes); never 0,
    which stands for a word no benchmark contains."""
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little") or 1


def _position_factors(n: int) -> np.ndarray:
    return np.random.default_rng(_POSITION_SEED).integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def gram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of the n-gram starting at each position of a sequence of word hashes (uint64 wraps)."""
    m = len(hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    out = np.zeros(m, dtype=np.uint64)
    for k, factor in enumerate(_position_factors(n)):
        out += hashes[k : k + m] * factor
    return out


@dataclass(frozen=True)
class BenchmarkNgrams:
    """The n-grams of the benchmark texts: sorted n-gram hashes with the task each came from.

    ``vocabulary`` maps every word of the benchmark texts to its hash; ``sha256`` identifies the
    texts and ``n`` (part of the clean stage fingerprint).
    """

    n: int
    tasks: tuple[str, ...]
    vocabulary: Mapping[str, int]
    grams: np.ndarray  # uint64, sorted
    task_of_gram: np.ndarray  # index into tasks, aligned with grams
    ngrams_per_task: Mapping[str, int]
    sha256: str

    @classmethod
    def build(cls, texts: Mapping[str, Iterable[str]], n: int) -> "BenchmarkNgrams":
        """Index ``task -> texts``. An n-gram found in several tasks is credited to the first of
        them in sorted order, so the drop reason does not depend on the order tasks were listed."""
        tasks = tuple(sorted(texts))
        vocabulary: dict[str, int] = {}
        digest = hashlib.sha256(f"n={n}".encode())
        per_task: list[np.ndarray] = []
        for task in tasks:
            grams = []
            for text in texts[task]:
                digest.update(f"\0{task}\0{text}".encode())
                words = normalized_words(text)
                hashes = np.fromiter((vocabulary.setdefault(w, word_hash(w)) for w in words), dtype=np.uint64, count=len(words))
                grams.append(gram_hashes(hashes, n))
            per_task.append(np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64))
        all_grams = np.concatenate([*per_task, np.zeros(0, dtype=np.uint64)])
        owners = np.concatenate([np.full(len(g), i, dtype=np.int32) for i, g in enumerate(per_task)] + [np.zeros(0, np.int32)])
        # Stable sort: among equal hashes the first task in sorted order comes first and is kept.
        order = np.argsort(all_grams, kind="stable")
        all_grams, owners = all_grams[order], owners[order]
        first = np.ones(len(all_grams), dtype=bool)
        first[1:] = all_grams[1:] != all_grams[:-1]
        return cls(n, tasks, vocabulary, all_grams[first], owners[first],
                   {t: len(g) for t, g in zip(tasks, per_task)}, digest.hexdigest())

    def first_match(self, text: str) -> str | None:
        """The task of the first n-gram of ``text`` found in the benchmarks, or None."""
        words = normalized_words(text)
        if len(words) < self.n or not len(self.grams):
            return None
        vocab = self.vocabulary
        hashes = np.fromiter((vocab.get(w, 0) for w in words), dtype=np.uint64, count=len(words))
        # An n-gram holding a word no benchmark contains cannot match: skip those positions.
        unknown = np.concatenate([[0], np.cumsum(hashes == 0)])
        candidates = np.flatnonzero(unknown[self.n :] == unknown[: -self.n])
        if not len(candidates):
            return None
        grams = gram_hashes(hashes, self.n)[candidates]
        where = np.minimum(np.searchsorted(self.grams, grams), len(self.grams) - 1)
        hits = np.flatnonzero(self.grams[where] == grams)
        return self.tasks[self.task_of_gram[where[hits[0]]]] if len(hits) else None


class Decontaminate(Filter):
    """Drops a document sharing an n-gram with a benchmark's texts: ``contamination:<task>``."""

    name = "contamination"

    def __init__(self, benchmarks: BenchmarkNgrams) -> None:
        self.benchmarks = benchmarks

    def check(self, text: str, stats: DocStats) -> str | None:
        return self.benchmarks.first_match(text)
