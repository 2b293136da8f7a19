"""Which samples each rank reads at each step: one global walk, cut per rank.

Epoch ``e`` visits a split's ``num_samples`` windows in the seeded permutation
``default_rng([seed, e]).permutation(num_samples)``, cut to whole global batches (``G`` =
micro_batch_size x grad_accum_steps x world size samples; the ragged tail is dropped). The epochs
laid end to end form one stream of global *positions*. In each micro-step the ranks together take
the next micro_batch_size x world_size positions and rank ``r`` reads the ``r``-th micro-batch of
them, so optimizer step ``k`` reads positions ``[k*G, (k+1)*G)`` on any number of ranks: a run
resumed on other ranks with the same ``G`` reads the same samples at every step (as torchtitan's
and Megatron's samplers do by consumed-sample count, but kept across a change of world size).

Skipped ranges (``skip(lo, hi)``: the data window that led to a loss spike) are positions the walk
jumps over; they are part of the state, so no later run serves them. A mixture walks its own
stream of positions the same way and gives each chunk of them to a source chosen by (seed, chunk
index); each source walks its own global permutation.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable

import numpy as np

from pretrain.global_batch import BatchLayout

Range = tuple[int, int]
# A mixture's sample id: source index above these bits, the sample's id in that source below.
SOURCE_SHIFT = 40


def merge_ranges(ranges: Iterable[Iterable[int]]) -> list[Range]:
    """Sorted, disjoint ``[lo, hi)`` ranges covering the same positions."""
    merged: list[Range] = []
    for lo, hi in sorted((int(lo), int(hi)) for lo, hi in ranges):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def served_positions(start: int, count: int, skipped: list[Range]) -> np.ndarray:
    """The first ``count`` positions at or after ``start`` outside the ``skipped`` ranges."""
    pieces, position, need = [], start, count
    for lo, hi in skipped:
        if hi <= position:
            continue
        if lo >= position + need:
            break
        if lo > position:
            pieces.append(np.arange(position, lo, dtype=np.int64))
            need -= lo - position
        position = max(position, hi)
    pieces.append(np.arange(position, position + need, dtype=np.int64))
    return np.concatenate(pieces)


def sample_digest(sample_ids: np.ndarray) -> int:
    """A 48-bit hash of a set of sample ids (exact in a float64 metric; order does not matter)."""
    data = np.sort(np.asarray(sample_ids, dtype=np.int64)).astype("<i8").tobytes()
    return int(hashlib.sha256(data).hexdigest()[:12], 16)


def _check_global_batch(state: dict[str, Any], layout: BatchLayout) -> None:
    saved = BatchLayout.from_state(state)
    if saved is not None and saved.global_batch != layout.global_batch:
        raise ValueError(
            f"data state was saved for a global batch of {saved.describe()}; this run's is {layout.describe()}. "
            f"Set train.grad_accum_steps so that micro_batch_size x grad_accum_steps x ranks = "
            f"{saved.global_batch} (a launch with train.resume: auto does this itself)"
        )


class _Walk:
    """A stream of global positions walked a micro-step at a time, minus the skipped ranges."""

    def __init__(self, layout: BatchLayout, rank: int, seed: int):
        self.layout, self.rank, self.seed = layout, rank, seed
        self.position = 0  # of the next sample the ranks read
        self.skipped: list[Range] = []
        self.recording = False  # keep the global ids of every micro-step (take_consumed)
        self._consumed: list[np.ndarray] = []

    def _next_positions(self) -> np.ndarray:
        return served_positions(self.position, self.layout.micro_step, self.skipped)

    def rank_share(self, values: np.ndarray) -> np.ndarray:
        """This rank's micro-batch of a micro-step's values (all ranks', in rank order)."""
        mb = self.layout.micro_batch_size
        return values[self.rank * mb : (self.rank + 1) * mb]

    def take_consumed(self) -> np.ndarray:
        """Global sample ids (all ranks') read since the last call, while ``recording``."""
        consumed, self._consumed = self._consumed, []
        return np.concatenate(consumed) if consumed else np.empty(0, dtype=np.int64)

    def skip(self, lo: int, hi: int) -> None:
        """Never serve global positions ``[lo, hi)``."""
        if not 0 <= lo < hi:
            raise ValueError(f"skip range [{lo}, {hi}) must satisfy 0 <= lo < hi (global sample positions)")
        self.skipped = merge_ranges([*self.skipped, (lo, hi)])


class GlobalSampler(_Walk):
    """Positions -> sample ids of one split, and this rank's share of each micro-step."""

    def __init__(self, num_samples: int, layout: BatchLayout, rank: int = 0, seed: int = 0):
        if num_samples < layout.global_batch:
            raise ValueError(f"{num_samples} samples are fewer than one global batch of {layout.describe()}")
        super().__init__(layout, rank, seed)
        self.num_samples = num_samples
        self.epoch_length = num_samples // layout.global_batch * layout.global_batch
        self._perms: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        return self.position // self.epoch_length

    @property
    def cursor(self) -> int:
        """Position within the epoch."""
        return self.position % self.epoch_length

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)[: self.epoch_length]
            if len(self._perms) >= 2:  # a micro-step spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """The sample ids (window indices into the split) at global ``positions``."""
        positions = np.asarray(positions, dtype=np.int64)
        epochs = positions // self.epoch_length
        ids = np.empty_like(positions)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            ids[here] = self.permutation(int(epoch))[positions[here] % self.epoch_length]
        return ids

    def peek(self) -> np.ndarray:
        """Sample ids of this rank's next micro-batch, without advancing."""
        return self.ids_at(self.rank_share(self._next_positions()))

    def next_ids(self) -> np.ndarray:
        """Sample ids of this rank's next micro-batch; every rank advances past the whole micro-step."""
        positions = self._next_positions()
        self.position = int(positions[-1]) + 1
        if self.recording:
            self._consumed.append(self.ids_at(positions))
        return self.ids_at(self.rank_share(positions))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "skipped": [list(r) for r in self.skipped], **self.layout.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a walk saved on any world size with the same global batch (refused otherwise)."""
        _check_global_batch(state, self.layout)
        self.seed, self._perms, self._consumed = int(state["seed"]), {}, []  # a rollback drops what it undoes
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if "global_batch" not in state:
            # Saved by the per-rank walk (rank r read perm[r::w]): after `cursor` micro-samples
            # per rank, all ranks together had read the epoch's first cursor x w positions.
            cursor = min(cursor * int(state.get("world_size", 1)), self.epoch_length)
        self.position = epoch * self.epoch_length + cursor
        self.skipped = merge_ranges(state.get("skipped", []))


class MixtureSampler(_Walk):
    """A weighted mixture of sources' walks, with one stream of global positions of its own.

    Position ``q`` belongs to chunk ``q // chunk`` (``chunk`` = the first run's micro_batch_size,
    kept in the state), and each chunk to the source ``source_at(chunk index)``: a pure function
    of (seed, chunk index), so the choice does not depend on the world size. Each source serves
    its chunks from its own walk in order. Skipped positions use up their source's samples too.
    Recorded ids are ``source index << SOURCE_SHIFT | sample id``.
    """

    def __init__(self, sources: dict[str, GlobalSampler], weights: dict[str, float], rank: int = 0, seed: int = 0):
        self.names = sorted(sources)
        super().__init__(sources[self.names[0]].layout, rank, seed)
        self.sources, self.weights, self.chunk = sources, weights, self.layout.micro_batch_size
        self.counts = {n: 0 for n in self.names}  # samples each source served (all ranks)
        self._cdf = np.cumsum([weights[n] for n in self.names])

    def source_at(self, chunk_index: int) -> str:
        u = np.random.default_rng([self.seed, chunk_index]).random()
        return self.names[min(int(np.searchsorted(self._cdf, u, side="right")), len(self.names) - 1)]

    def _walk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample id) of positions ``[start, stop)``; advances the sources past them."""
        first = start // self.chunk
        picks = np.array([self.names.index(self.source_at(c)) for c in range(first, (stop - 1) // self.chunk + 1)])
        source = picks[np.arange(start, stop) // self.chunk - first]
        ids = np.empty(stop - start, dtype=np.int64)
        for i, name in enumerate(self.names):
            here = source == i
            walk = self.sources[name]
            ids[here] = walk.ids_at(walk.position + np.arange(int(here.sum())))
            walk.position += int(here.sum())
        return source, ids

    def next_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(source index, sample id) of this rank's next micro-batch; advances the whole micro-step."""
        positions = self._next_positions()
        source, ids = self._walk(self.position, int(positions[-1]) + 1)
        served = positions - self.position
        source, ids = source[served], ids[served]
        self.position = int(positions[-1]) + 1
        for i, name in enumerate(self.names):
            self.counts[name] += int((source == i).sum())
        if self.recording:
            self._consumed.append((source << SOURCE_SHIFT) | ids)
        return self.rank_share(source), self.rank_share(ids)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "chunk": self.chunk,
                "skipped": [list(r) for r in self.skipped], "counts": dict(self.counts),
                "sources": {n: self.sources[n].state_dict() for n in self.names}, **self.layout.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "position" not in state:
            raise ValueError("mixture data state was saved by the per-rank loader (before the global walk) and "
                             "cannot be continued; set train.resume: never to start over")
        _check_global_batch(state, self.layout)
        self.position, self.seed, self.chunk = int(state["position"]), int(state["seed"]), int(state["chunk"])
        self._consumed = []  # a rollback drops what it undoes
        self.skipped = merge_ranges(state.get("skipped", []))
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        for n in self.names:
            self.sources[n].load_state_dict(state["sources"][n])
