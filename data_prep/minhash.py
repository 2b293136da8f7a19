"""Exact and MinHash LSH near-duplicate detection, as a shuffle by key.

Each live document contributes one row per key: its exact-text hash (kind 0) and one hash per LSH
band of its MinHash signature (kind 1). Rows are shuffled so equal keys meet in one partition
(``ray.data ... groupby(partition).map_groups(edges_of_partition)``), each partition turns every
group of equal keys into edges ``(smallest ordinal, other)``, and only those edges (few: one per
duplicate per band) come back to the driver, where union-find makes clusters. The copy kept in a
cluster is the one with the smallest ordinal, i.e. the first in (file, line) order: deterministic
however the shuffle was partitioned.

Signatures follow datasketch / datatrove: 32-bit shingle hashes, permutations ``(a*h + b) mod p``
with p the Mersenne prime 2^61-1, kept to 32 bits; vectorised over all shingles and permutations.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import xxhash

EXACT, NEAR = 0, 1
_PRIME = np.uint64((1 << 61) - 1)
_MAX_HASH = np.uint64((1 << 32) - 1)
_WORD = re.compile(r"\w+")
_DIGIT = re.compile(r"\d")
# Shingles per vectorised step: bounds the (shingles x permutations) matrix of a long document.
_CHUNK = 4096
KEYS_SCHEMA = pa.schema([("ord", pa.uint64()), ("kind", pa.int8()), ("key", pa.uint64())])


def ordinal(file_index: int, line: int) -> int:
    """A document's place in (file, line) order as one integer: the dedup tie-breaker."""
    return (file_index << 32) | line


def split_ordinal(ord_: int) -> tuple[int, int]:
    return ord_ >> 32, ord_ & 0xFFFFFFFF


def exact_key(text_hash_hex: str) -> int:
    return int(text_hash_hex[:16], 16)


class MinHasher:
    def __init__(self, n_gram: int = 5, bands: int = 14, rows: int = 8, seed: int = 1) -> None:
        self.n_gram, self.bands, self.rows = n_gram, bands, rows
        rng = np.random.RandomState(seed)
        n = bands * rows
        self.a = rng.randint(1, int(_PRIME), size=n, dtype=np.uint64)
        self.b = rng.randint(0, int(_PRIME), size=n, dtype=np.uint64)

    def shingles(self, text: str) -> np.ndarray:
        """Unique 32-bit hashes of the word n-grams of the simplified text (case, punctuation
        and digits do not matter, as in datatrove's ``simplify_text``)."""
        words = _WORD.findall(_DIGIT.sub("0", text.lower()))
        if not words:
            return np.zeros(1, dtype=np.uint64)
        wh = np.fromiter((xxhash.xxh64_intdigest(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        n = min(self.n_gram, len(wh))
        m = len(wh) - n + 1
        # Order-sensitive combination of n consecutive word hashes (uint64 arithmetic wraps).
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h = h * np.uint64(0x100000001B3) ^ wh[k : k + m]
            h ^= h >> np.uint64(29)
            h *= np.uint64(0xBF58476D1CE4E5B9)
        return np.unique(h >> np.uint64(32))

    def signature(self, text: str) -> np.ndarray:
        sh = self.shingles(text)
        sig = np.full(len(self.a), _MAX_HASH, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for start in range(0, len(sh), _CHUNK):
                block = sh[start : start + _CHUNK, None]
                phv = ((block * self.a + self.b) % _PRIME) & _MAX_HASH
                np.minimum(sig, phv.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def band_keys(self, text: str) -> list[int]:
        """One 64-bit key per band; the band index seeds the hash so bands never collide."""
        sig = self.signature(text).reshape(self.bands, self.rows)
        return [xxhash.xxh64_intdigest(sig[i].tobytes(), seed=i) for i in range(self.bands)]


def key_rows(ords: list[int], text_hashes: list[str], texts: list[str] | None, hasher: MinHasher | None) -> pa.Table:
    """The shuffle's input rows for some live documents: (ord, kind, key)."""
    out_ord: list[int] = []
    out_kind: list[int] = []
    out_key: list[int] = []
    for i, (o, th) in enumerate(zip(ords, text_hashes)):
        if th:
            out_ord.append(o)
            out_kind.append(EXACT)
            out_key.append(exact_key(th))
        if hasher is not None and texts is not None:
            keys = hasher.band_keys(texts[i])
            out_ord += [o] * len(keys)
            out_kind += [NEAR] * len(keys)
            out_key += keys
    return pa.table(
        {"ord": pa.array(out_ord, pa.uint64()), "kind": pa.array(out_kind, pa.int8()), "key": pa.array(out_key, pa.uint64())},
        schema=KEYS_SCHEMA,
    )


def add_partition(batch: pa.Table, n_partitions: int) -> pa.Table:
    key = batch.column("key").to_numpy(zero_copy_only=False)
    return batch.append_column("part", pa.array((key % np.uint64(n_partitions)).astype(np.int64)))


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
