"""Document quality filters with the published thresholds: Gopher, C4, FineWeb.

Each filter is a small class; ``filter(text, stats)`` returns None to keep a document or the drop
reason ``"<filter>:<why>"``. The rules and defaults follow datatrove's implementations of
Gopher (Rae et al. 2021), C4 (Raffel et al. 2020) and FineWeb (Penedo et al. 2024), with words
split on whitespace (datatrove uses an NLTK word tokenizer, so a few borderline documents can
fall on the other side of a threshold).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field

_PUNCT = set(string.punctuation) | {"…", "—", "–", "“", "”", "‘", "’", "«", "»"}
# A line "ends a sentence" if it ends with one of these (datatrove's TERMINAL_PUNCTUATION, abridged
# to the scripts the language filter keeps by default).
TERMINAL_PUNCTUATION = tuple(
    ".!?\"'”’。！？｡։؟۔।॥၊။።፧፨᙮᠃᠉‼‽⁇⁈⁉⸮⸼꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖﹗．"
)
STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


@dataclass
class DocStats:
    """Figures several filters share, computed once per document; filters may add to it."""

    words: list[str]
    n_words: int
    language: str = ""
    language_score: float = 0.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def of(cls, text: str) -> "DocStats":
        words = text.split()
        return cls(words=words, n_words=len(words))


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


def _top_ngram_chars(words: list[str], n: int) -> int:
    grams = Counter(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    if not grams:
        return 0
    gram, count = grams.most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _duplicate_ngram_chars(words: list[str], n: int) -> int:
    # Non-overlapping repeats, as datatrove's find_all_duplicate: a repeated n-gram skips ahead by n.
    seen: set[str] = set()
    chars = i = 0
    while i < len(words) - n + 1:
        gram = "".join(words[i : i + n])
        if gram in seen:
            chars += len(gram)
            i += n
        else:
            seen.add(gram)
            i += 1
    return chars


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
        self.dup_n_grams = dup_n_grams

    def check(self, text: str, stats: DocStats) -> str | None:
        if not text:
            return None
        paragraphs = re.split(r"\n{2,}", text.strip())
        n_dup, chars = _duplicates(paragraphs)
        if n_dup / len(paragraphs) > self.dup_para_frac:
            return "duplicate_paragraphs"
        if chars / len(text) > self.dup_para_char_frac:
            return "duplicate_paragraph_chars"
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        n_dup, chars = _duplicates(lines)
        if lines and n_dup / len(lines) > self.dup_line_frac:
            return "duplicate_lines"
        if chars / len(text) > self.dup_line_char_frac:
            return "duplicate_line_chars"
        words = stats.words
        for n, frac in self.top_n_grams:
            if _top_ngram_chars(words, n) / len(text) > frac:
                return f"top_{n}_gram"
        for n, frac in self.dup_n_grams:
            if _duplicate_ngram_chars(words, n) / len(text) > frac:
                return f"duplicated_{n}_grams"
        return None


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
        if n < self.min_words or n == 0:
            return "too_few_words"
        if n > self.max_words:
            return "too_many_words"
        # Bare punctuation tokens ("-", "—") would drag the mean word length down.
        lengths = [len(w) for w in stats.words if w not in _PUNCT]
        mean_len = sum(lengths) / len(lengths) if lengths else 0.0
        if mean_len < self.min_mean_word_length:
            return "short_mean_word_length"
        if mean_len > self.max_mean_word_length:
            return "long_mean_word_length"
        n_symbols = text.count("#") + text.count("...") + text.count("…")
        if n_symbols / n > self.max_symbol_to_word_ratio:
            return "symbol_ratio"
        lines = text.splitlines() or [""]
        bullets = sum(1 for line in lines if line.lstrip().startswith(("•", "●", "○", "□", "■", "►", "–", "‒", "—", "-")))
        if bullets / len(lines) > self.max_bullet_lines_ratio:
            return "bullet_lines"
        ellipsis = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
        if ellipsis / len(lines) > self.max_ellipsis_lines_ratio:
            return "ellipsis_lines"
        alpha = sum(1 for w in stats.words if any(c.isalpha() for c in w))
        if alpha / n < self.min_alpha_word_fraction:
            return "low_alpha_fraction"
        if self.min_stop_words and sum(1 for w in stats.words if w.lower() in STOP_WORDS) < self.min_stop_words:
            return "few_stop_words"
        return None


_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4Quality(LineFilter):
    """C4 rules: drop lines (no terminal punctuation, < 3 words, javascript, policy notices, huge
    words, citation marks), then drop documents with lorem ipsum, curly brackets or < 5 sentences."""

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

    def _keep_line(self, line: str) -> bool:
        words = line.split()
        if len(words) < self.min_words_per_line:
            return False
        if self.max_word_length and max(len(w) for w in words) > self.max_word_length:
            return False
        if self.drop_no_terminal_punct and not line.endswith(TERMINAL_PUNCTUATION):
            return False
        low = line.lower()
        if self.drop_javascript_lines and "javascript" in low:
            return False
        if self.drop_policy_lines and any(p in low for p in _POLICY):
            return False
        return True

    def rewrite(self, text: str) -> str:
        if self.remove_citations:
            text = _CITATION.sub("", text)
        lines = [line.strip() for line in text.split("\n")]
        return "\n".join(line for line in lines if line and self._keep_line(line))

    def check(self, text: str, stats: DocStats) -> str | None:
        if not text.strip():
            return "no_lines_left"
        low = text.lower()
        if self.drop_lorem_ipsum and "lorem ipsum" in low:
            return "lorem_ipsum"
        if self.drop_curly_bracket and "{" in text:
            return "curly_bracket"
        if self.min_sentences and len(_SENTENCE_END.findall(text)) < self.min_sentences:
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
        if sum(1 for line in lines if line.endswith(TERMINAL_PUNCTUATION)) / len(lines) < self.line_punct_ratio:
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= self.short_line_chars) / len(lines) > self.short_line_ratio:
            return "short_line_ratio"
        if _duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, stats.n_words) > self.new_line_ratio:
            return "list_ratio"
        return None
