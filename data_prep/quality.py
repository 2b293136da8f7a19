"""Document quality filters with the published thresholds: Gopher, C4, FineWeb.

Each filter is a small class; ``filter(text, stats)`` returns None to keep a document or the drop
reason ``"<filter>:<why>"``. The rules, their order and their defaults follow datatrove's
implementations of Gopher (Rae et al. 2021), C4 (Raffel et al. 2020) and FineWeb (Penedo et al.
2024), with words split on whitespace (datatrove's default word tokenizer needs spaCy/NLTK), so
with the same word split both give the same decision on every document (bench/clean checks it).

Speed: the figures several rules need (the word split, word ids, n-gram ids and counts) are
computed once per document in :class:`DocStats`, lazily, and the n-gram rules work on integer
ids with numpy instead of joining and hashing strings per n-gram.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cached_property
from operator import itemgetter

import numpy as np
import regex

# Punctuation in Unicode's sense (general category P*) plus the ASCII punctuation and symbols:
# a "word" made only of these is a symbol, not a word (Gopher's word counts skip it).
_PUNCT_CLASS = r"[\p{P}" + re.escape(string.punctuation) + r"]"
# A whitespace-delimited token made only of punctuation. The regex module's \s lacks the four
# separators U+1C..U+1F that str.split splits on, so they are named.
_WS = r"[\s\x1c-\x1f]"
_SYMBOL_WORD = regex.compile(rf"(?<!(?!{_WS}).){_PUNCT_CLASS}+(?!(?!{_WS}).)", regex.DOTALL)
# Lines "end a sentence" if their last character is a Unicode Sentence_Terminal (. ! ? 。 ...),
# as datatrove's TERMINAL_PUNCTUATION.
_STERM = regex.compile(r"\p{Sentence_Terminal}")
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


def ends_sentence(line: str) -> bool:
    return bool(line) and (line[-1] in ".!?" or (not line[-1].isascii() and _STERM.match(line[-1]) is not None))


class DocStats:
    """Figures several filters share, computed once per document (lazily); filters may add to it."""

    def __init__(self, text: str, words: list[str] | None = None) -> None:
        self.text = text
        self.words = text.split() if words is None else words
        self.n_words = len(self.words)
        self.language = ""
        self.language_score = 0.0
        self.extra: dict = {}
        self._grams: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def of(cls, text: str) -> "DocStats":
        return cls(text)

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


class Filter:
    name = "filter"

    def __call__(self, text: str, stats: DocStats) -> str | None:
        reason = self.check(text, stats)
        return None if reason is None else f"{self.name}:{reason}"

    def check(self, text: str, stats: DocStats) -> str | None:  # pragma: no cover - abstract
        raise NotImplementedError


class LineFilter(Filter):
    """A filter that may also rewrite the text (drop lines); ``rewrite`` runs before ``check``."""

    def rewrite(self, text: str) -> str:
        return text


def _duplicates(items: list[str]) -> tuple[int, int]:
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


# Below this many words the n-gram rules count word tuples in plain Python: numpy's fixed cost
# per call is then larger than the work (the two cross at about 70 words).
NUMPY_NGRAMS_FROM_WORDS = 64


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


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile(r"\n+")


class GopherRepetition(Filter):
    """Gopher repetition rules: repeated paragraphs, lines and n-grams mark boilerplate and spam."""

    name = "gopher_repetition"

    def __init__(
        self,
        dup_line_frac: float = 0.3,
        dup_para_frac: float = 0.3,
        dup_line_char_frac: float = 0.2,
        dup_para_char_frac: float = 0.2,
        top_n_grams: tuple[tuple[int, float], ...] = ((2, 0.2), (3, 0.18), (4, 0.16)),
        dup_n_grams: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),
    ) -> None:
        self.dup_line_frac = dup_line_frac
        self.dup_para_frac = dup_para_frac
        self.dup_line_char_frac = dup_line_char_frac
        self.dup_para_char_frac = dup_para_char_frac
        self.top_n_grams = top_n_grams
        self.dup_n_grams = tuple(sorted(dup_n_grams))

    def check(self, text: str, stats: DocStats) -> str | None:
        if not text:
            return "empty"
        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, chars = _duplicates(paragraphs)
        if n_dup / len(paragraphs) > self.dup_para_frac:
            return "duplicate_paragraphs"
        if chars / len(text) > self.dup_para_char_frac:
            return "duplicate_paragraph_chars"
        lines = _LINES.split(text)
        n_dup, chars = _duplicates(lines)
        if n_dup / len(lines) > self.dup_line_frac:
            return "duplicate_lines"
        if chars / len(text) > self.dup_line_char_frac:
            return "duplicate_line_chars"
        for n, frac in self.top_n_grams:
            top = _top_ngram_chars(stats, n)
            if top is not None and top / len(text) > frac:
                return f"top_{n}_gram"
        for i, (n, frac) in enumerate(self.dup_n_grams):
            chars = _duplicate_ngram_chars(stats, n)
            if chars / len(text) > frac:
                return f"duplicated_{n}_grams"
            if chars == 0 and all(m > n for m, _ in self.dup_n_grams[i + 1 :]):
                break  # no repeated n-gram means no repeated longer one either
        return None


_BULLETS = ("•", "-")
_ELLIPSES = ("...", "…")


def _has_letter(word: str) -> bool:
    return word.isalpha() or any(c.isalpha() for c in word)


class GopherQuality(Filter):
    """Gopher quality rules: length, word length, symbols, bullets, ellipses, alphabetic and stop words."""

    name = "gopher_quality"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_mean_word_length: float = 3,
        max_mean_word_length: float = 10,
        max_symbol_to_word_ratio: float = 0.1,
        min_alpha_word_fraction: float = 0.8,
        max_bullet_lines_ratio: float = 0.9,
        max_ellipsis_lines_ratio: float = 0.3,
        min_stop_words: int = 0,
    ) -> None:
        self.min_words = min_words
        self.max_words = max_words
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_to_word_ratio = max_symbol_to_word_ratio
        self.min_alpha_word_fraction = min_alpha_word_fraction
        self.max_bullet_lines_ratio = max_bullet_lines_ratio
        self.max_ellipsis_lines_ratio = max_ellipsis_lines_ratio
        self.min_stop_words = min_stop_words

    def check(self, text: str, stats: DocStats) -> str | None:
        n = stats.n_words
        if n == 0:
            return "too_few_words"
        # Tokens made only of punctuation ("-", "—", "...") are not words for length and size.
        symbols = _SYMBOL_WORD.findall(text)
        n_real = n - len(symbols)
        if n_real < self.min_words:
            return "too_few_words"
        if n_real > self.max_words:
            return "too_many_words"
        mean_len = (int(stats._len_cumsum[-1]) - sum(map(len, symbols))) / n_real if n_real else float("nan")
        if mean_len < self.min_mean_word_length:
            return "short_mean_word_length"
        if mean_len > self.max_mean_word_length:
            return "long_mean_word_length"
        if text.count("#") / n > self.max_symbol_to_word_ratio:
            return "symbol_ratio"
        if (text.count("...") + text.count("…")) / n > self.max_symbol_to_word_ratio:
            return "symbol_ratio"
        lines = text.splitlines() or [""]
        if sum(1 for line in lines if line.lstrip().startswith(_BULLETS)) / len(lines) > self.max_bullet_lines_ratio:
            return "bullet_lines"
        if sum(1 for line in lines if line.rstrip().endswith(_ELLIPSES)) / len(lines) > self.max_ellipsis_lines_ratio:
            return "ellipsis_lines"
        # Per distinct word, weighted by its count: a word "is alphabetic" if it holds a letter.
        counts = stats.word_counts
        alpha = sum(int(counts[i]) for w, i in stats.vocab.items() if _has_letter(w))
        if alpha / n < self.min_alpha_word_fraction:
            return "low_alpha_fraction"
        # Occurrences of stop words, any case (datatrove counts distinct ones, case-sensitive;
        # on documents of Gopher's 50-word minimum the two practically never disagree).
        if self.min_stop_words and self._stop_words(stats) < self.min_stop_words:
            return "few_stop_words"
        return None

    @staticmethod
    def _stop_words(stats: DocStats) -> int:
        counts = stats.word_counts
        return sum(int(counts[i]) for w, i in stats.vocab.items() if len(w) <= 4 and w.lower() in STOP_WORDS)


_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
# Sentences within a kept line: text up to a run of . ! ? followed by whitespace or the end; a
# line with none is one sentence (datatrove counts it so with a regex sentence splitter).
SENTENCE_PATTERN = _SENTENCE = re.compile(r"[^.!?]+[.!?]+(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# C4 keeps lines ending in . ? ! or a quote, but not in an ellipsis.
C4_END_PUNCTUATION = (".", "?", "!", '"', "'")


def count_sentences(line: str) -> int:
    return max(1, len(_SENTENCE.findall(line)))


class C4Quality(LineFilter):
    """C4 rules, line by line in datatrove's order: drop lines with a huge word, remove citation
    marks, drop lines without terminal punctuation or with < 3 words, drop the document on
    lorem ipsum, drop javascript lines, drop the document on a curly bracket, drop policy
    notices; then drop documents with < 5 sentences in the kept lines."""

    name = "c4"

    def __init__(
        self,
        min_words_per_line: int = 3,
        min_sentences: int = 5,
        max_word_length: int = 1000,
        drop_no_terminal_punct: bool = True,
        drop_curly_bracket: bool = True,
        drop_lorem_ipsum: bool = True,
        drop_javascript_lines: bool = True,
        drop_policy_lines: bool = True,
        remove_citations: bool = True,
    ) -> None:
        self.min_words_per_line = min_words_per_line
        self.min_sentences = min_sentences
        self.max_word_length = max_word_length
        self.drop_no_terminal_punct = drop_no_terminal_punct
        self.drop_curly_bracket = drop_curly_bracket
        self.drop_lorem_ipsum = drop_lorem_ipsum
        self.drop_javascript_lines = drop_javascript_lines
        self.drop_policy_lines = drop_policy_lines
        self.remove_citations = remove_citations

    def rewrite(self, text: str) -> str:
        """The kept lines. A line that would drop the whole document (lorem ipsum, a curly
        bracket) is kept, so that ``check`` sees it and drops the document."""
        kept = []
        for line in text.splitlines():
            line = line.strip()
            words = line.split()
            if self.max_word_length and len(line) > self.max_word_length and any(len(w) > self.max_word_length for w in words):
                continue
            if self.remove_citations and "[" in line:
                # Stripped again (datatrove does not): "... end. [1]" is a sentence, not a fragment.
                line = _CITATION.sub("", line).strip()
            if self.drop_no_terminal_punct and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
                continue
            if len(words) < self.min_words_per_line:
                continue
            low = line.lower()
            if self.drop_lorem_ipsum and "lorem ipsum" in low:
                kept.append(line)
                continue
            if self.drop_javascript_lines and "javascript" in low:
                continue
            if self.drop_curly_bracket and "{" in line:
                kept.append(line)
                continue
            if self.drop_policy_lines and any(p in low for p in _POLICY):
                continue
            kept.append(line)
        return "\n".join(kept).strip()

    def check(self, text: str, stats: DocStats) -> str | None:
        if not text.strip():
            return "too_few_sentences" if self.min_sentences else "no_lines_left"
        if self.drop_lorem_ipsum and "lorem ipsum" in text.lower():
            return "lorem_ipsum"
        if self.drop_curly_bracket and "{" in text:
            return "curly_bracket"
        if self.min_sentences and sum(count_sentences(line) for line in text.split("\n") if line) < self.min_sentences:
            return "too_few_sentences"
        return None


class FineWebQuality(Filter):
    """FineWeb's own rules: lines ending in punctuation, short lines, duplicated line characters
    and the newline-per-word ratio (lists and tables)."""

    name = "fineweb"

    def __init__(
        self,
        line_punct_ratio: float = 0.12,
        short_line_ratio: float = 0.67,
        short_line_chars: int = 30,
        char_duplicates_ratio: float = 0.01,
        new_line_ratio: float = 0.3,
    ) -> None:
        self.line_punct_ratio = line_punct_ratio
        self.short_line_ratio = short_line_ratio
        self.short_line_chars = short_line_chars
        self.char_duplicates_ratio = char_duplicates_ratio
        self.new_line_ratio = new_line_ratio

    def check(self, text: str, stats: DocStats) -> str | None:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if sum(1 for line in lines if ends_sentence(line)) / len(lines) < self.line_punct_ratio:
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= self.short_line_chars) / len(lines) > self.short_line_ratio:
            return "short_line_ratio"
        if _duplicates(lines)[1] / max(1, len(text) - text.count("\n")) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, stats.n_words) > self.new_line_ratio:
            return "list_ratio"
        return None


__all__ = ["C4Quality", "DocStats", "Filter", "FineWebQuality", "GopherQuality", "GopherRepetition", "LineFilter",
           "SENTENCE_PATTERN", "STOP_WORDS", "count_sentences", "ends_sentence"]
