"""The clean stage's fast paths give exactly what the plain computation gives (no Ray)."""

from __future__ import annotations

import re
import string
from collections import Counter

import ftfy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep import cleaner
from data_prep.cleaner import UnicodeRepair, normalize_whitespace
from data_prep.filters import DocStats, gopher_repetition
from data_prep.filters.gopher_repetition import _duplicate_ngram_chars, _top_ngram_chars
from data_prep.minhash import MinHasher, simplified_words

FAST = settings(max_examples=200, deadline=None)
ascii_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=300)
any_text = st.text(max_size=300)


@FAST
@given(st.one_of(ascii_text, any_text, st.sampled_from(["caf\u00c3\u00a9 &amp; co", "a &lt;b&gt;", "x\r\ny\x1b[31m", "&#x2019;"])))
def test_unicode_repair_fast_path_is_ftfy(text: str) -> None:
    repair = UnicodeRepair()
    assert repair(text) == ftfy.fix_text(text, repair._config)


def _normalize_slow(text: str) -> str:
    text = cleaner._LINE_SEPS.sub("\n", text)
    text = cleaner._INVISIBLE.sub("", text)
    text = cleaner._ODD_SPACES.sub(" ", text)
    text = cleaner._CONTROL.sub("", text)
    text = cleaner._TRAILING_WS.sub("\n", text)
    return cleaner._MANY_BLANK_LINES.sub("\n\n", text).strip()


@FAST
@given(st.one_of(ascii_text, any_text))
def test_normalize_whitespace_fast_path_is_the_full_rules(text: str) -> None:
    assert normalize_whitespace(text) == _normalize_slow(text)


def _top_naive(words: list[str], n: int) -> int | None:
    grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return None
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count if count > 1 else 0


def _dup_naive(words: list[str], n: int) -> int:
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


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", "bb", "the", "of", "ccc", "a-b"]), max_size=160), st.sampled_from([0, 10**9]))
def test_ngram_rules_equal_string_ngrams_on_both_paths(words: list[str], numpy_from: int) -> None:
    # numpy_from 0: every document takes the numpy path (word ids); 10**9: the plain-Python one.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gopher_repetition, "NUMPY_NGRAMS_FROM_WORDS", numpy_from)
        stats = DocStats(" ".join(words))
        for n in (2, 3, 4):
            assert _top_ngram_chars(stats, n) == _top_naive(words, n)
        for n in range(5, 11):
            assert _duplicate_ngram_chars(stats, n) == _dup_naive(words, n)


_SPACE_ASCII = str.maketrans({c: " " for c in string.punctuation + "".join(map(chr, range(32))) + "\x7f"})


@FAST
@given(ascii_text)
def test_minhash_words_ascii_path_is_the_simplification(text: str) -> None:
    # lower case, numbers to 0, punctuation and controls to spaces, split on whitespace
    expected = re.sub(r"[0-9]+(?:[.,][0-9]+)?", "0", text.lower()).translate(_SPACE_ASCII).split()
    assert [w.decode() for w in simplified_words(text)] == expected


def test_short_documents_have_no_minhash_keys() -> None:
    h = MinHasher(5, 14, 8, seed=1)
    assert h.band_keys("only four words here") == []
    assert len(h.band_keys("five words are just enough")) == 14
