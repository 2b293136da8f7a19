"""Per-document cleaning steps, datatrove style.

A *repair* step returns new text; a *filter* returns None to keep a document or a drop reason
``"<filter>:<why>"``. ``clean_batch`` runs them in order on a batch and is what Ray Data maps over
the corpus; the first filter that objects decides the document's ``drop_reason``.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pretrain_pipeline.config import DataConfig

# --------------------------------------------------------------------------------------------
# Repair


class UnicodeRepair:
    """Undo mojibake (``cafÃ©`` -> ``café``) and strip control characters with ftfy.

    NFC only: NFKC would rewrite superscripts, ligatures and full-width forms, which changes what
    the tokenizer learns. Quotes and full-width characters are kept as written for the same reason.
    """

    def __init__(self) -> None:
        import ftfy

        self._ftfy = ftfy
        self._config = ftfy.TextFixerConfig(
            normalization="NFC",
            uncurl_quotes=False,
            fix_character_width=False,
            fix_latin_ligatures=False,
            explain=False,
        )

    def __call__(self, text: str) -> str:
        return self._ftfy.fix_text(text, self._config)


# Zero-width and BOM characters carry nothing for a language model and break exact dedup.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
# Unicode space separators (NBSP, thin space, ...) become a plain space; tabs and newlines stay.
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_SEPS = re.compile("\r\n?|[\u2028\u2029\x0b\x0c\x85]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Unify line breaks and odd spaces; keep indentation (code and lists need it)."""
    text = _LINE_SEPS.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _ODD_SPACES.sub(" ", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    text = _TRAILING_WS.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def truncate(text: str, max_chars: int) -> str:
    """Cut at the last whitespace before ``max_chars`` (hard cut when there is none nearby)."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", max_chars - 200, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip()


# --------------------------------------------------------------------------------------------
# Filters


_PUNCT = set(string.punctuation) | {"…", "—", "–", "“", "”", "‘", "’", "«", "»"}


@dataclass
class DocStats:
    """Word-level figures several filters share, computed once per document."""

    words: list[str]
    n_words: int

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


class GopherQuality(Filter):
    """Gopher (Rae et al. 2021) quality rules: length, word length, symbols, alphabetic words."""

    name = "gopher_quality"

    def __init__(
        self,
        min_words: int = 50,
        max_words: int = 100_000,
        min_mean_word_length: float = 3,
        max_mean_word_length: float = 10,
        max_symbol_to_word_ratio: float = 0.1,
        min_alpha_word_fraction: float = 0.8,
    ) -> None:
        self.min_words = min_words
        self.max_words = max_words
        self.min_mean_word_length = min_mean_word_length
        self.max_mean_word_length = max_mean_word_length
        self.max_symbol_to_word_ratio = max_symbol_to_word_ratio
        self.min_alpha_word_fraction = min_alpha_word_fraction

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
        alpha = sum(1 for w in stats.words if any(c.isalpha() for c in w))
        if alpha / n < self.min_alpha_word_fraction:
            return "low_alpha_fraction"
        return None


class GopherRepetition(Filter):
    """Gopher repetition rule: boilerplate pages repeat whole lines (menus, footers)."""

    name = "gopher_repetition"

    def __init__(self, max_duplicate_line_fraction: float = 0.3) -> None:
        self.max_duplicate_line_fraction = max_duplicate_line_fraction

    def check(self, text: str, stats: DocStats) -> str | None:
        lines = [line.strip() for line in text.split("\n") if line.strip()]
        if not lines:
            return None
        duplicates = len(lines) - len(set(lines))
        if duplicates / len(lines) > self.max_duplicate_line_fraction:
            return "duplicate_lines"
        return None


def build_filters(cfg: DataConfig) -> list[Filter]:
    return [
        GopherQuality(
            min_words=cfg.min_words,
            max_words=cfg.max_words,
            min_mean_word_length=cfg.min_mean_word_length,
            max_mean_word_length=cfg.max_mean_word_length,
            max_symbol_to_word_ratio=cfg.max_symbol_to_word_ratio,
            min_alpha_word_fraction=cfg.min_alpha_word_fraction,
        ),
        GopherRepetition(cfg.max_duplicate_line_fraction),
    ]


# --------------------------------------------------------------------------------------------
# Batch entry point


def text_hash(text: str) -> str:
    """Hash of the text as dedup sees it: case-folded, whitespace collapsed."""
    return hashlib.sha1(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


class Cleaner:
    """Repair + filters for one config; built once per batch (cheap) or once per worker."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.repair = UnicodeRepair()
        self.filters = build_filters(cfg)

    def clean_one(self, text: str) -> tuple[str, str | None, int]:
        """(repaired text, drop reason or None, word count)."""
        text = truncate(normalize_whitespace(self.repair(text)), self.cfg.max_chars)
        stats = DocStats.of(text)
        for f in self.filters:
            if reason := f(text, stats):
                return text, reason, stats.n_words
        return text, None, stats.n_words


def clean_batch(batch: dict[str, list] | pd.DataFrame, cfg: DataConfig) -> dict[str, list] | pd.DataFrame:
    """Repair and filter a batch of reader rows; adds ``drop_reason``, ``text_hash``, ``n_chars``, ``n_words``.

    Quarantined rows (``quarantine`` set by the reader) pass through untouched with no drop reason:
    they are counted as quarantined, not as dropped.
    """
    is_frame = isinstance(batch, pd.DataFrame)
    texts = list(batch["text"])
    quarantine = list(batch["quarantine"]) if "quarantine" in batch else [None] * len(texts)
    cleaner = Cleaner(cfg)
    out_text: list[str] = []
    reasons: list[str | None] = []
    hashes: list[str] = []
    n_chars: list[int] = []
    n_words: list[int] = []
    for text, q in zip(texts, quarantine):
        if _is_set(q):
            out_text.append(text)
            reasons.append(None)
            hashes.append("")
            n_chars.append(0)
            n_words.append(0)
            continue
        text, reason, words = cleaner.clean_one(text)
        out_text.append(text)
        reasons.append(reason)
        hashes.append(text_hash(text))
        n_chars.append(len(text))
        n_words.append(words)
    columns: dict[str, Any] = {
        "text": out_text,
        "drop_reason": reasons,
        "text_hash": hashes,
        "n_chars": n_chars,
        "n_words": n_words,
    }
    if is_frame:
        out = batch.copy()
        for key, values in columns.items():
            out[key] = pd.Series(values, index=batch.index, dtype=object if key in ("text", "drop_reason", "text_hash") else "int64")
        return out
    return {**batch, **columns}


def _is_set(value: Any) -> bool:
    """True for a real string; pandas turns missing values into None or NaN."""
    return isinstance(value, str) and value != ""
