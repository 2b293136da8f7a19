"""C4 rules (Raffel et al. 2020), line by line in datatrove's order; the line rules rewrite the
text, the document rules drop it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from data_prep.filters.base import DocStats, Drop, LineFilter

_CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
# Sentences within a kept line: text up to a run of . ! ? followed by whitespace or the end; a
# line with none is one sentence (datatrove counts it so with a regex sentence splitter).
SENTENCE_PATTERN = re.compile(r"[^.!?]+[.!?]+(?=\s|$)")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# C4 keeps lines ending in . ? ! or a quote, but not in an ellipsis.
_END_PUNCTUATION = (".", "?", "!", '"', "'")


def _count_sentences(line: str) -> int:
    return max(1, len(SENTENCE_PATTERN.findall(line)))


@dataclass(kw_only=True)
class C4Quality(LineFilter):
    """Drops lines with a huge word, removes citation marks, drops lines without terminal
    punctuation or with too few words, drops javascript lines and policy notices; drops the
    document on lorem ipsum, on a curly bracket, or with too few sentences in the kept lines."""

    name = "c4"

    min_words_per_line: int
    min_sentences: int
    max_word_length: int
    drop_no_terminal_punct: bool
    drop_curly_bracket: bool
    drop_lorem_ipsum: bool
    drop_javascript_lines: bool
    drop_policy_lines: bool
    remove_citations: bool

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
            if self.drop_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
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
            return Drop("too_few_sentences", 0) if self.min_sentences else "no_lines_left"
        if self.drop_lorem_ipsum and "lorem ipsum" in text.lower():
            return "lorem_ipsum"
        if self.drop_curly_bracket and "{" in text:
            return "curly_bracket"
        if self.min_sentences and (n := sum(_count_sentences(line) for line in text.split("\n") if line)) < self.min_sentences:
            return Drop("too_few_sentences", n)
        return None
