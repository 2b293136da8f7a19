"""Per-document cleaning: repair steps, then the filters, then PII redaction.

A *repair* step returns new text; a *filter* (``data_prep.filters``, ``data_prep.langid``) returns
None to keep a document or a drop reason ``"<filter>:<why>"``. ``Cleaner`` runs, in order:

    cap length -> ftfy repair -> whitespace -> language -> Gopher repetition -> Gopher quality
    -> C4 (rewrites lines, then may drop) -> FineWeb -> boilerplate -> decontamination -> PII redaction

``clean_batch`` applies it to a batch; the first filter that objects decides ``drop_reason``.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pandas as pd

from data_prep.langid import LanguageFilter
from data_prep.pii import PIIRedactor
from data_prep.filters import (BenchmarkNgrams, Boilerplate, C4Quality, Decontaminate, DocStats, Filter, FineWebQuality,
                               GopherQuality, GopherRepetition, LineFilter)
from data_prep.readers import EXCERPT_CHARS, text_problem
from pretrain_pipeline.config import DataConfig

__all__ = ["PII_KINDS", "Cleaner", "UnicodeRepair", "build_filters", "clean_batch", "normalize_whitespace", "text_hash",
           "truncate"]

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
        # Fast path: on ASCII text without an HTML entity or a control character, every fix in
        # this config is the identity (mojibake, C1 controls, surrogates and NFC all need
        # non-ASCII), so ftfy's per-line passes are skipped. Most of a web or code corpus is ASCII.
        if text.isascii() and "&" not in text and not _ASCII_CONTROL.search(text):
            return text
        return self._ftfy.fix_text(text, self._config)


# ASCII control characters other than tab and newline (CR, VT, FF and ESC included).
_ASCII_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f]")


# Zero-width and BOM characters carry nothing for a language model and break exact dedup.
_INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
# Unicode space separators (NBSP, thin space, ...) become a plain space; tabs and newlines stay.
_ODD_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_SEPS = re.compile("\r\n?|[\u2028\u2029\x0b\x0c\x85]")
_TRAILING_WS = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")
# Unicode category Cc except tab and newline (CR, VT, FF became newlines above).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def normalize_whitespace(text: str) -> str:
    """Unify line breaks and odd spaces; keep indentation (code and lists need it)."""
    if text.isascii() and not _ASCII_CONTROL.search(text):
        # Only the last two rules can apply to clean ASCII.
        return _MANY_BLANK_LINES.sub("\n\n", _TRAILING_WS.sub("\n", text)).strip()
    text = _LINE_SEPS.sub("\n", text)
    text = _INVISIBLE.sub("", text)
    text = _ODD_SPACES.sub(" ", text)
    text = _CONTROL.sub("", text)
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


def build_filters(cfg: DataConfig, benchmarks: BenchmarkNgrams | None = None) -> list[Filter]:
    """The enabled filters in the order they run; each takes its config section's settings as they are.

    Boilerplate runs after the cheaper rules, on what they keep; decontamination runs last, on the
    text the others kept (C4 may have dropped lines), with the n-grams built once in the driver by
    ``data_prep.benchmarks.benchmark_ngrams``."""
    families = [
        (cfg.language, LanguageFilter),
        (cfg.gopher_repetition, GopherRepetition),
        (cfg.gopher_quality, GopherQuality),
        (cfg.c4, C4Quality),
        (cfg.fineweb, FineWebQuality),
        (cfg.boilerplate, Boilerplate),
    ]
    filters = [make(**section.params()) for section, make in families if section.enabled]
    if cfg.decontaminate.tasks:
        if benchmarks is None:
            raise ValueError("data.decontaminate.tasks is set but no benchmark n-grams were given "
                             "(build them once with data_prep.benchmarks.benchmark_ngrams)")
        filters.append(Decontaminate(benchmarks))
    return filters


# --------------------------------------------------------------------------------------------
# Batch entry point


def text_hash(text: str) -> str:
    """Hash of the text as dedup sees it: case-folded, whitespace collapsed."""
    return hashlib.sha1(" ".join(text.casefold().split()).encode("utf-8")).hexdigest()


@dataclass
class Cleaned:
    text: str
    drop_reason: str | None
    n_words: int
    language: str
    language_score: float
    pii: Counter
    drop_score: float | None = None  # the measured value behind drop_reason, when the filter gives one


class Cleaner:
    """Repair + filters + PII for one config; cheap to build (the language model is cached per process)."""

    def __init__(self, cfg: DataConfig, benchmarks: BenchmarkNgrams | None = None) -> None:
        self.cfg = cfg
        self.repair = UnicodeRepair() if cfg.unicode_repair else None
        self.filters = build_filters(cfg, benchmarks)
        self.pii = PIIRedactor(**cfg.pii.model_dump()) if cfg.pii.entities else None

    def clean_one(self, text: str) -> Cleaned:
        cfg = self.cfg
        # The length rule runs first, so no later step (ftfy, regexes) ever sees a huge document.
        # Some slack lets whitespace normalisation shrink the text before the final cut.
        if len(text) > cfg.max_chars and cfg.long_doc_rule == "drop":
            return Cleaned(text[: cfg.max_chars], "long_document", len(text[: cfg.max_chars].split()), "", 0.0, Counter(), len(text))
        text = truncate(text, cfg.max_chars + 4096)
        if self.repair is not None:
            text = self.repair(text)
        if cfg.normalize_whitespace:
            text = normalize_whitespace(text)
        text = truncate(text, cfg.max_chars)
        stats = DocStats(text)
        reason = None
        for f in self.filters:
            given = text
            if isinstance(f, LineFilter):
                rewritten = f.rewrite(text)
                if rewritten != text:
                    text, stats = rewritten, _carry(DocStats(rewritten), stats)
            if reason := f(text, stats):
                # Kept as the filter got it, before its own rewrite: what dropped.parquet's excerpt shows.
                text = given
                break
        pii: Counter = Counter()
        if self.pii is not None and reason is None:
            text, pii = self.pii.redact(text)
            stats = _carry(DocStats(text), stats)
        score = getattr(reason, "score", None)
        return Cleaned(text, reason and str(reason), stats.n_words, stats.language, stats.language_score, pii, score)


def _carry(new: DocStats, old: DocStats) -> DocStats:
    new.language, new.language_score = old.language, old.language_score
    return new


PII_KINDS = ("email", "ip", "phone")


def clean_batch(batch: dict[str, list] | pd.DataFrame, cfg: DataConfig, benchmarks: BenchmarkNgrams | None = None) -> dict[str, list] | pd.DataFrame:
    """Repair and filter a batch of reader rows.

    Adds ``drop_reason``, ``drop_score``, ``text_hash``, ``n_chars``, ``n_words``, ``language``, ``language_score``
    and ``pii_<kind>`` counts. Quarantined rows (``quarantine`` set by the reader) pass through
    untouched with no drop reason: they are counted as quarantined, not as dropped.
    """
    is_frame = isinstance(batch, pd.DataFrame)
    texts = list(batch["text"])
    quarantine = list(batch["quarantine"]) if "quarantine" in batch else [None] * len(texts)
    excerpts = list(batch["excerpt"]) if "excerpt" in batch else [None] * len(texts)
    # Rows from the readers hold a string or are quarantined already; any other caller's None,
    # number, bytes, list or NUL-laden text is quarantined here (and counted), not cleaned.
    for i, (text, q) in enumerate(zip(texts, quarantine)):
        if not _is_set(q) and (reason := text_problem(text)):
            quarantine[i], excerpts[i], texts[i] = reason, repr(text)[:EXCERPT_CHARS], ""
    cleaner = Cleaner(cfg, benchmarks)
    cols: dict[str, list] = {k: [] for k in ("text", "drop_reason", "drop_score", "text_hash", "n_chars", "n_words", "language", "language_score")}
    pii_cols: dict[str, list] = {f"pii_{k}": [] for k in PII_KINDS}
    for text, q in zip(texts, quarantine):
        if _is_set(q):
            row = (text, None, None, "", 0, 0, "", 0.0)
            pii: Counter = Counter()
        else:
            c = cleaner.clean_one(text)
            # The exact-dedup key is only needed for documents that survive and when exact dedup is on.
            th = text_hash(c.text) if cfg.exact_dedup and c.drop_reason is None else ""
            row = (c.text, c.drop_reason, c.drop_score, th, len(c.text), c.n_words, c.language, c.language_score)
            pii = c.pii
        for key, value in zip(cols, row):
            cols[key].append(value)
        for kind in PII_KINDS:
            pii_cols[f"pii_{kind}"].append(pii.get(kind, 0))
    columns: dict[str, Any] = {**cols, **pii_cols, "quarantine": quarantine, "excerpt": excerpts}
    if is_frame:
        out = batch.copy()
        for key, values in columns.items():
            dtype = "int64" if key in ("n_chars", "n_words") or key.startswith("pii_") else ("float64" if key in ("language_score", "drop_score") else object)
            out[key] = pd.Series(values, index=batch.index, dtype=dtype)
        return out
    return {**batch, **columns}


def _is_set(value: Any) -> bool:
    """True for a real string; pandas turns missing values into None or NaN."""
    return isinstance(value, str) and value != ""
