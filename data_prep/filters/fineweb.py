"""FineWeb's own rules (Penedo et al. 2024), as in datatrove: lines ending in punctuation, short
lines, duplicated line characters and the newline-per-word ratio (lists and tables)."""

from __future__ import annotations

from dataclasses import dataclass

import regex

from data_prep.filters.base import DocStats, Drop, Filter, count_duplicates

# Lines "end a sentence" if their last character is a Unicode Sentence_Terminal (. ! ? 。 ...),
# as datatrove's TERMINAL_PUNCTUATION.
_STERM = regex.compile(r"\p{Sentence_Terminal}")


def _ends_sentence(line: str) -> bool:
    return bool(line) and (line[-1] in ".!?" or (not line[-1].isascii() and _STERM.match(line[-1]) is not None))


@dataclass(kw_only=True)
class FineWebQuality(Filter):
    """Drops documents with too few lines ending a sentence, too many short lines, too many
    characters in duplicated lines, or too many newlines per word."""

    name = "fineweb"

    line_punct_ratio: float
    short_line_ratio: float
    short_line_chars: int
    char_duplicates_ratio: float
    new_line_ratio: float

    def check(self, text: str, stats: DocStats) -> str | None:
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        if (ratio := sum(1 for line in lines if _ends_sentence(line)) / len(lines)) < self.line_punct_ratio:
            return Drop("line_punct_ratio", ratio)
        if (ratio := sum(1 for line in lines if len(line) <= self.short_line_chars) / len(lines)) > self.short_line_ratio:
            return Drop("short_line_ratio", ratio)
        if (ratio := count_duplicates(lines)[1] / max(1, len(text) - text.count("\n"))) > self.char_duplicates_ratio:
            return Drop("char_dup_ratio", ratio)
        if (ratio := text.count("\n") / max(1, stats.n_words)) > self.new_line_ratio:
            return Drop("list_ratio", ratio)
        return None
