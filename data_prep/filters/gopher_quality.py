"""Gopher quality rules (Rae et al. 2021), in datatrove's order: document length, mean word
length, symbols, bullet and ellipsis lines, alphabetic words and stop words.

Words are split on whitespace (datatrove's default word tokenizer needs spaCy/NLTK); with the same
split both give the same decision on every document (bench/clean checks it).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

import regex

from data_prep.filters.base import DocStats, Drop, Filter

# Punctuation in Unicode's sense (general category P*) plus the ASCII punctuation and symbols:
# a "word" made only of these is a symbol, not a word (Gopher's word counts skip it).
_PUNCT_CLASS = r"[\p{P}" + re.escape(string.punctuation) + r"]"
# A whitespace-delimited token made only of punctuation. The regex module's \s lacks the four
# separators U+1C..U+1F that str.split splits on, so they are named.
_WS = r"[\s\x1c-\x1f]"
_SYMBOL_WORD = regex.compile(rf"(?<!(?!{_WS}).){_PUNCT_CLASS}+(?!(?!{_WS}).)", regex.DOTALL)
_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "-")
_ELLIPSES = ("...", "…")


def _has_letter(word: str) -> bool:
    return word.isalpha() or any(c.isalpha() for c in word)


@dataclass(kw_only=True)
class GopherQuality(Filter):
    """Drops documents outside the word-count and mean-word-length bounds, or with too many
    symbols, bullet or ellipsis lines, non-alphabetic words, or too few stop words."""

    name = "gopher_quality"

    min_words: int
    max_words: int
    min_mean_word_length: float
    max_mean_word_length: float
    max_symbol_to_word_ratio: float
    min_alpha_word_fraction: float
    max_bullet_lines_ratio: float
    max_ellipsis_lines_ratio: float
    min_stop_words: int

    def check(self, text: str, stats: DocStats) -> str | None:
        n = stats.n_words
        if n == 0:
            return Drop("too_few_words", 0)
        # Tokens made only of punctuation ("-", "—", "...") are not words for length and size.
        symbols = _SYMBOL_WORD.findall(text)
        n_real = n - len(symbols)
        if n_real < self.min_words:
            return Drop("too_few_words", n_real)
        if n_real > self.max_words:
            return Drop("too_many_words", n_real)
        mean_len = (stats.word_chars - sum(map(len, symbols))) / n_real if n_real else float("nan")
        if mean_len < self.min_mean_word_length:
            return Drop("short_mean_word_length", mean_len)
        if mean_len > self.max_mean_word_length:
            return Drop("long_mean_word_length", mean_len)
        if (ratio := text.count("#") / n) > self.max_symbol_to_word_ratio:
            return Drop("symbol_ratio", ratio)
        if (ratio := (text.count("...") + text.count("…")) / n) > self.max_symbol_to_word_ratio:
            return Drop("symbol_ratio", ratio)
        lines = text.splitlines() or [""]
        if (ratio := sum(1 for line in lines if line.lstrip().startswith(_BULLETS)) / len(lines)) > self.max_bullet_lines_ratio:
            return Drop("bullet_lines", ratio)
        if (ratio := sum(1 for line in lines if line.rstrip().endswith(_ELLIPSES)) / len(lines)) > self.max_ellipsis_lines_ratio:
            return Drop("ellipsis_lines", ratio)
        # Per distinct word, weighted by its count: a word "is alphabetic" if it holds a letter.
        counts = stats.word_counts
        alpha = sum(int(counts[i]) for w, i in stats.vocab.items() if _has_letter(w))
        if alpha / n < self.min_alpha_word_fraction:
            return Drop("low_alpha_fraction", alpha / n)
        # Occurrences of stop words, any case (datatrove counts distinct ones, case-sensitive;
        # on documents of Gopher's 50-word minimum the two practically never disagree).
        if self.min_stop_words and (stop := _stop_words(stats)) < self.min_stop_words:
            return Drop("few_stop_words", stop)
        return None


def _stop_words(stats: DocStats) -> int:
    counts = stats.word_counts
    return sum(int(counts[i]) for w, i in stats.vocab.items() if len(w) <= 4 and w.lower() in _STOP_WORDS)
