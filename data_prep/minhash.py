"""Exact and MinHash LSH near-duplicate detection, as a shuffle by key.

Each live document contributes one row per key: its exact-text hash (kind 0) and one hash per LSH
band of its MinHash signature (kind 1). Each input unit's rows are written sorted by key; the
shuffle then gives each reduce task one range of the (uniform) 64-bit key space, which it reads
from every unit's sorted rows (Parquet row-group statistics skip the rest), so equal keys meet in
one task. A task turns every group of equal keys into edges ``(smallest ordinal, other)``, and
only those edges (few: one per duplicate per band) come back to the driver, where union-find makes
clusters. The copy kept in a cluster is the one with the smallest ordinal, i.e. the first in
(file, line) order: deterministic however the shuffle was partitioned.

Signatures are datatrove's defaults, bit for bit: the text is simplified (lower case, numbers to
``0``, punctuation to spaces, whitespace collapsed, diacritics removed), split on whitespace,
every word 5-gram joined by spaces is hashed with 64-bit xxhash, and permutation ``i`` maps a
shingle ``h`` to ``(a_i*h + b_i) mod (2^61-1)`` in wrapping uint64 arithmetic, with ``a, b`` drawn
from ``RandomState(seed)``. A document with fewer words than the n-gram size has no signature
(exact dedup still sees it). Permutations run vectorised over a whole batch of documents.
"""

from __future__ import annotations

import string
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import regex
import xxhash

EXACT, NEAR = 0, 1
_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 64) - 1)
# Shingles per vectorised step: bounds the (shingles x permutations) uint64 matrix (~7 MiB).
_CHUNK = 8192
KEYS_SCHEMA = pa.schema([("ord", pa.uint64()), ("kind", pa.int8()), ("key", pa.uint64())])
# Sorted key rows are written in row groups of this size, so a reduce task reads only its range.
KEYS_ROW_GROUP = 65536

# Simplification, as datatrove's ``simplify_text`` with its default TextNormConfig. Numbers: digit
# runs with an optional decimal part (., , and the Arabic and APL separators) become "0".
_NUMBER = regex.compile(r"\p{Nd}+(?:[.,\u060c\u066b\u2396\u2397\u2398]\p{Nd}+)?")
_NUMBER_ASCII = regex.compile(rb"[0-9]+(?:[.,][0-9]+)?")  # the regex module: much faster than re here
# Punctuation (Unicode P*, planes 0-1, and ASCII punctuation/symbols) and control characters
# become spaces.
_SPACED = {c for c in range(0x20000) if unicodedata.category(chr(c)).startswith("P")}
_SPACED |= {ord(c) for c in string.punctuation} | set(range(0, 32)) | set(range(127, 160))
_PUNCT_TABLE = {c: " " for c in _SPACED}
# ASCII in one C pass: upper -> lower, punctuation and controls -> space.
_ASCII_TABLE = bytes((32 if (i in _SPACED) else (i + 32 if 65 <= i <= 90 else i)) for i in range(256))
_COMBINING_MARKS = regex.compile(r"\p{Mn}+")


def simplified_words(text: str) -> list[bytes]:
    """The words MinHash shingles are made of, UTF-8 encoded."""
    if text.isascii():
        return _NUMBER_ASCII.sub(b"0", text.encode("ascii")).translate(_ASCII_TABLE).split()
    text = _NUMBER.sub("0", text.lower()).translate(_PUNCT_TABLE)
    text = _COMBINING_MARKS.sub("", unicodedata.normalize("NFD", text))
    return [w.encode("utf-8") for w in text.split()]


def ordinal(file_index: int, line: int) -> int:
    """A document's place in (file, line) order as one integer: the dedup tie-breaker."""
    return (file_index << 32) | line


def exact_key(text_hash_hex: str) -> int:
    return int(text_hash_hex[:16], 16)


class MinHasher:
    def __init__(self, n_gram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1) -> None:
        self.n_gram, self.bands, self.rows = n_gram, bands, rows
        rng = np.random.RandomState(seed)
        n = bands * rows
        self.a = rng.randint(1, _PRIME, size=n, dtype=np.uint64)
        self.b = rng.randint(0, _PRIME, size=n, dtype=np.uint64)
        # Seeds of the band-key mix, one per band, so equal rows in different bands never collide.
        self._band_seeds = (np.arange(bands, dtype=np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)

    def shingles(self, text: str) -> np.ndarray:
        """64-bit xxhash of every word n-gram (words joined by one space) of the simplified text;
        empty when the text has fewer than ``n_gram`` words."""
        words = simplified_words(text)
        n = self.n_gram
        m = len(words) - n + 1
        if m <= 0:
            return np.zeros(0, dtype=np.uint64)
        join, h = b" ".join, xxhash.xxh64_intdigest
        # zip of shifted lists: the n-grams as tuples without slicing, which is faster.
        return np.fromiter((h(join(g)) for g in zip(*(words[k:] for k in range(n)))), dtype=np.uint64, count=m)

    def signatures(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures of the documents that have shingles, shape (k, bands*rows), their indices)."""
        parts = [self.shingles(t) for t in texts]
        has = np.fromiter((len(p) > 0 for p in parts), dtype=bool, count=len(parts))
        docs = np.flatnonzero(has)
        sig = np.full((len(docs), len(self.a)), _MAX_HASH, dtype=np.uint64)
        if not len(docs):
            return sig, docs
        lengths = np.fromiter((len(parts[i]) for i in docs), dtype=np.int64, count=len(docs))
        starts = np.zeros(len(docs), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        flat = np.concatenate([parts[i] for i in docs])
        a, b = self.a, self.b
        with np.errstate(over="ignore"):
            for lo in range(0, len(flat), _CHUNK):
                hi = min(lo + _CHUNK, len(flat))
                phv = (flat[lo:hi, None] * a + b) % _PRIME
                first = int(np.searchsorted(starts, lo, side="right")) - 1
                last = int(np.searchsorted(starts, hi, side="left"))  # exclusive
                local = np.maximum(starts[first:last] - lo, 0)
                np.minimum(sig[first:last], np.minimum.reduceat(phv, local, axis=0), out=sig[first:last])
        return sig, docs

    def signature(self, text: str) -> np.ndarray:
        sig, docs = self.signatures([text])
        return sig[0] if len(docs) else np.full(len(self.a), _MAX_HASH, dtype=np.uint64)

    def band_keys_of(self, sig: np.ndarray) -> np.ndarray:
        """One 64-bit key per band of each signature row (a mix of the band's hashes)."""
        bands = sig.reshape(len(sig), self.bands, self.rows)
        h = np.broadcast_to(self._band_seeds, (len(sig), self.bands)).copy()
        with np.errstate(over="ignore"):
            for r in range(self.rows):
                h = (h ^ bands[:, :, r]) * np.uint64(0xBF58476D1CE4E5B9)
                h ^= h >> np.uint64(31)
        return h

    def band_keys(self, text: str) -> list[int]:
        sig, docs = self.signatures([text])
        return self.band_keys_of(sig)[0].tolist() if len(docs) else []


def key_rows(ords: list[int], text_hashes: list[str], texts: list[str] | None, hasher: MinHasher | None) -> pa.Table:
    """The shuffle's input rows for some live documents: (ord, kind, key), sorted by key."""
    ords_arr = np.asarray(ords, dtype=np.uint64)
    exact = [i for i, th in enumerate(text_hashes) if th]
    cols_ord = [ords_arr[exact]]
    cols_kind = [np.full(len(exact), EXACT, dtype=np.int8)]
    cols_key = [np.fromiter((exact_key(text_hashes[i]) for i in exact), dtype=np.uint64, count=len(exact))]
    if hasher is not None and texts is not None and len(texts):
        sig, docs = hasher.signatures(texts)
        keys = hasher.band_keys_of(sig)
        cols_ord.append(np.repeat(ords_arr[docs], hasher.bands))
        cols_kind.append(np.full(keys.size, NEAR, dtype=np.int8))
        cols_key.append(keys.reshape(-1))
    o, k, key = np.concatenate(cols_ord), np.concatenate(cols_kind), np.concatenate(cols_key)
    order = np.argsort(key, kind="stable")
    return pa.table({"ord": o[order], "kind": k[order], "key": key[order]}, schema=KEYS_SCHEMA)


def read_key_range(path: str, lo: int, hi: int | None) -> pa.Table:
    """Rows of one sorted keys file with ``lo <= key < hi`` (``hi`` None: no upper bound); row
    groups outside the range are not read."""
    pf = pq.ParquetFile(path)
    col = pf.schema_arrow.get_field_index("key")
    groups = []
    for i in range(pf.metadata.num_row_groups):
        st = pf.metadata.row_group(i).column(col).statistics
        if st is not None and st.has_min_max and (st.max < lo or (hi is not None and st.min >= hi)):
            continue
        groups.append(i)
    if not groups:
        return KEYS_SCHEMA.empty_table()
    table = pf.read_row_groups(groups)
    key = table.column("key").to_numpy()
    a = int(np.searchsorted(key, np.uint64(lo), side="left"))
    b = len(key) if hi is None else int(np.searchsorted(key, np.uint64(hi), side="left"))
    return table.slice(a, b - a)


def edges_of_range(paths: list[str], lo: int, hi: int | None) -> pa.Table:
    """One reduce task of the shuffle: the edges among all rows whose key is in [lo, hi)."""
    tables = [t for t in (read_key_range(p, lo, hi) for p in paths) if t.num_rows]
    if not tables:
        return EDGES_SCHEMA.empty_table()
    return edges_of_partition(pa.concat_tables(tables))


EDGES_SCHEMA = pa.schema([("kind", pa.int8()), ("keep", pa.uint64()), ("other", pa.uint64())])


def edges_of_partition(rows: pa.Table) -> pa.Table:
    """Rows of one shuffle partition -> edges (first ordinal of a key group, another ordinal)."""
    if rows.num_rows < 2:
        return EDGES_SCHEMA.empty_table()
    kind = rows.column("kind").to_numpy(zero_copy_only=False)
    key = rows.column("key").to_numpy(zero_copy_only=False)
    ords = rows.column("ord").to_numpy(zero_copy_only=False)
    order = np.lexsort((ords, key, kind))
    kind, key, ords = kind[order], key[order], ords[order]
    starts = np.ones(len(key), dtype=bool)
    starts[1:] = (key[1:] != key[:-1]) | (kind[1:] != kind[:-1])
    first = ords[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    mask = ~starts & (ords != first)
    return pa.table(
        {"kind": pa.array(kind[mask], pa.int8()), "keep": pa.array(first[mask], pa.uint64()), "other": pa.array(ords[mask], pa.uint64())},
        schema=EDGES_SCHEMA,
    )


class UnionFind:
    """Clusters whose root is always the smallest member."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo


def duplicates_from_edges(edges: pa.Table) -> dict[int, str]:
    """ord -> drop reason for every document that is not its cluster's first copy."""
    kind = edges.column("kind").to_numpy(zero_copy_only=False)
    keep = edges.column("keep").to_numpy(zero_copy_only=False).tolist()
    other = edges.column("other").to_numpy(zero_copy_only=False).tolist()
    drops: dict[int, str] = {}
    exact, near = UnionFind(), UnionFind()
    for k, a, b in zip(kind.tolist(), keep, other):
        (exact if k == EXACT else near).union(a, b)
    for x in list(exact.parent):
        if exact.find(x) != x:
            drops[x] = "exact_duplicate"
    # An exact copy is never a near cluster's root: its own first copy has the same bands and a
    # smaller ordinal. So near-dup roots are always live documents.
    for x in list(near.parent):
        if near.find(x) != x and x not in drops:
            drops[x] = "minhash_duplicate"
    return drops
