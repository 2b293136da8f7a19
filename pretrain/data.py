"""Token batches from the Arrow shards that ``data_prep`` writes.

Each split is one flat token stream (documents end with EOS), memory-mapped shard by shard.
Samples are ``block_size + 1`` tokens at stride ``block_size``, visited in a seeded permutation
per epoch that all ranks walk together (``pretrain.sampler``): optimizer step k reads the same
global batch on any number of ranks. The position in that walk (epoch, cursor, seed, skipped
ranges, global batch) is the loader's state, so a resumed run sees exactly the batches it would
have had, also on another number of ranks with the same global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from pretrain.global_batch import BatchLayout
from pretrain.sampler import GlobalSampler, MixtureSampler
from pretrain_pipeline.artifacts import read_json, sha256_file

MANIFEST = "manifest.json"


class DataIntegrityError(RuntimeError):
    """A shard or tokenizer on disk is not the one the manifest describes."""


def read_shard_tokens(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(flat token stream, document offsets) of one shard, zero-copy from a memory map."""
    try:  # the data_prep reader is the reference; this fallback reads the same schema
        from data_prep.shards import read_shard_tokens as reader
    except ImportError:
        reader = None
    if reader is not None:
        return reader(path)
    import pyarrow as pa

    column = pa.ipc.open_stream(pa.memory_map(str(path))).read_all().column("input_ids").combine_chunks()
    return column.values.to_numpy(zero_copy_only=True), column.offsets.to_numpy()


def _int_entry(key: str) -> property:
    return property(lambda self: int(self.raw[key]), doc=f"The manifest's ``{key}``.")


@dataclass(frozen=True)
class Manifest:
    path: Path
    raw: dict[str, Any]

    @property
    def run_dir(self) -> Path:
        # manifest lives in runs/<name>/shards/; tokenizer_path is relative to runs/<name>/
        return self.path.parent.parent

    vocab_size = _int_entry("vocab_size")
    eos_id = _int_entry("eos_id")
    bos_id = _int_entry("bos_id")
    pad_id = _int_entry("pad_id")

    @property
    def tokenizer_path(self) -> Path:
        return self.run_dir / self.raw["tokenizer_path"]

    def shard_entries(self, split: str) -> list[dict[str, Any]]:
        try:
            return list(self.raw["splits"][split])
        except KeyError:
            raise DataIntegrityError(f"{self.path}: no split {split!r}") from None

    def shard_paths(self, split: str) -> list[Path]:
        return [self.path.parent / e["file"] for e in self.shard_entries(split)]

    def verify(self, splits: tuple[str, ...] = ("train", "val")) -> None:
        """Refuse shards or a tokenizer whose bytes differ from what the manifest recorded."""
        tok = self.tokenizer_path
        if not tok.exists():
            raise DataIntegrityError(f"tokenizer {tok} named by {self.path} does not exist")
        if sha256_file(tok) != self.raw["tokenizer_sha256"]:
            raise DataIntegrityError(
                f"tokenizer {tok} does not match tokenizer_sha256 in {self.path}; "
                "the shards were encoded with a different tokenizer (re-run the shards stage)"
            )
        for split in splits:
            for entry in self.shard_entries(split):
                shard = self.path.parent / entry["file"]
                if not shard.exists():
                    raise DataIntegrityError(f"shard {shard} listed in {self.path} is missing")
                if sha256_file(shard) != entry["sha256"]:
                    raise DataIntegrityError(f"shard {shard} does not match its sha256 in {self.path}")


def load_manifest(shards_dir_or_file: str | Path) -> Manifest:
    path = Path(shards_dir_or_file)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the shards stage first")
    raw = read_json(path)
    if raw.get("format") != "arrow-ipc-stream" or raw.get("token_column") != "input_ids":
        raise DataIntegrityError(f"{path}: unsupported shard format {raw.get('format')!r}")
    return Manifest(path=path, raw=raw)


class TokenStream:
    """Several memory-mapped shards seen as one 1-D token array (slices may span shards)."""

    def __init__(self, paths: list[Path]):
        self.parts = [read_shard_tokens(p)[0] for p in paths]
        self.parts = [p for p in self.parts if len(p)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        if start < 0 or stop > len(self) or start > stop:
            raise IndexError(f"[{start}, {stop}) outside a stream of {len(self)} tokens")
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        pieces = []
        while start < stop:
            lo = start - int(self.starts[i])
            hi = min(stop, int(self.starts[i + 1])) - int(self.starts[i])
            pieces.append(self.parts[i][lo:hi])
            start += hi - lo
            i += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def windows_to_batch(windows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.from_numpy(np.stack(windows).astype(np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


class GlobalWalkMixin:
    """What a loader exposes of its ``sampler``'s global walk (``pretrain.sampler``)."""

    sampler: GlobalSampler | MixtureSampler

    position = property(lambda self: self.sampler.position, doc="Global position of the next sample.")

    @property
    def recording(self) -> bool:
        """Whether the walk keeps every micro-step's global sample ids for :meth:`take_consumed`."""
        return self.sampler.recording

    @recording.setter
    def recording(self, on: bool) -> None:
        self.sampler.recording = on

    def take_consumed(self) -> np.ndarray:
        """Global sample ids every rank read since the last call (set ``recording`` first)."""
        return self.sampler.take_consumed()

    def skip(self, lo: int, hi: int) -> None:
        """Never serve global positions ``[lo, hi)`` (e.g. the window that led to a loss spike)."""
        self.sampler.skip(lo, hi)


class ShardDataset(GlobalWalkMixin):
    """Endless, resumable batches of one split: this rank's share of the global walk
    (``pretrain.sampler``), so the samples of a step do not depend on the number of ranks."""

    def __init__(
        self,
        manifest: Manifest | str | Path,
        split: str,
        block_size: int,
        micro_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        verify: bool = True,
        grad_accum_steps: int = 1,
    ):
        self.manifest = manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
        if verify:
            self.manifest.verify((split,))
        self.split, self.block_size, self.micro_batch_size = split, block_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.layout = BatchLayout(micro_batch_size, grad_accum_steps, world_size)
        self.stream = TokenStream(self.manifest.shard_paths(split))
        self.num_samples = max(0, (len(self.stream) - 1) // block_size)
        if self.num_samples < self.layout.global_batch:
            raise ValueError(
                f"split {split!r} of {self.manifest.path} has {len(self.stream)} tokens = {self.num_samples} samples "
                f"of {block_size + 1}; a global batch of {self.layout.describe()}: need at least "
                f"{self.layout.global_batch}: use more data or a smaller block/batch"
            )
        self.samples_per_rank = self.num_samples // world_size  # validation's per-rank share
        self.sampler = GlobalSampler(self.num_samples, self.layout, rank, seed)

    epoch = property(lambda self: self.sampler.epoch, doc="Epoch of the next sample.")

    def window(self, sample_id: int) -> np.ndarray:
        """Sample ``sample_id``: ``block_size + 1`` tokens starting at ``sample_id x block_size``."""
        start = int(sample_id) * self.block_size
        return self.stream.slice(start, start + self.block_size + 1)

    def windows(self, sample_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch([self.window(i) for i in sample_ids])

    def sample_indices(self) -> np.ndarray:
        """Indices of this rank's next micro-batch's samples (without advancing); for tests and logging."""
        return self.sampler.peek()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.windows(self.sampler.next_ids())

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a walk saved on any number of ranks with the same global batch."""
        self.sampler.load_state_dict(state)

    def eval_batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first ``n_batches`` of this rank's share in stream order (the same set every call)."""
        order = np.arange(self.samples_per_rank * self.world_size)[self.rank :: self.world_size]
        mb = self.micro_batch_size
        for b in range(min(n_batches, len(order) // mb)):
            yield self.windows(order[b * mb : (b + 1) * mb])


class MixtureDataset(GlobalWalkMixin):
    """Batches drawn from several named datasets by weight (Megatron blends, llm-foundry streams).

    The mixture walks one stream of global positions; each chunk of ``micro_batch_size`` of them
    comes from the source that a pure function of (seed, chunk index) picks, and each source
    serves from its own global walk (``pretrain.sampler.MixtureSampler``), so the samples of a step
    do not depend on the number of ranks. The weights go into ``state_dict`` and a resumed run
    refuses different ones instead of silently re-mixing.
    """

    def __init__(self, sources: dict[str, ShardDataset], weights: dict[str, float], seed: int = 0):
        if set(sources) != set(weights) or not sources:
            raise ValueError(f"mixture weights {sorted(weights)} must name exactly the sources {sorted(sources)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {weights}")
        self.names = sorted(sources)
        self.sources = sources
        total = float(sum(weights.values()))
        self.weights = {n: float(weights[n]) / total for n in self.names}
        first = sources[self.names[0]]
        self.layout = first.layout
        self.sampler = MixtureSampler({n: s.sampler for n, s in sources.items()}, self.weights, first.rank, seed)

    counts = property(lambda self: self.sampler.counts, doc="Samples each source served (all ranks).")

    def source_at(self, chunk_index: int) -> str:
        return self.sampler.source_at(chunk_index)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        source, ids = self.sampler.next_ids()
        return windows_to_batch([self.sources[self.names[s]].window(i) for s, i in zip(source, ids)])

    def realised_proportions(self) -> dict[str, float]:
        """Share of samples each source served since step 0 (to log next to the configured weights)."""
        n = max(1, sum(self.counts.values()))
        return {k: v / n for k, v in self.counts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"mixture": dict(self.weights), **self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: float(v) for k, v in state["mixture"].items()}
        if set(saved) != set(self.weights) or any(abs(saved[k] - self.weights[k]) > 1e-9 for k in saved):
            raise ValueError(f"checkpoint was trained on mixture {saved}, this run is configured with {self.weights}")
        self.sampler.load_state_dict(state)

    def eval_batches(self, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Evaluation stays per source; a mixture evaluates on its first (sorted) source."""
        return self.sources[self.names[0]].eval_batches(n_batches)


def build_mixture(
    manifests: dict[str, Manifest | str | Path],
    weights: dict[str, float],
    split: str,
    block_size: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    verify: bool = True,
    grad_accum_steps: int = 1,
) -> MixtureDataset:
    """One ``ShardDataset`` per named manifest (each source walks with its own derived seed)."""
    sources = {
        name: ShardDataset(m, split, block_size, micro_batch_size, rank, world_size, seed + 1000 * i, verify,
                           grad_accum_steps)
        for i, (name, m) in enumerate(sorted(manifests.items()))
    }
    tokenizers = {s.manifest.raw["tokenizer_sha256"] for s in sources.values()}
    if len(tokenizers) > 1:
        raise DataIntegrityError(f"mixture sources were encoded with different tokenizers: {sorted(manifests)}")
    return MixtureDataset(sources, weights, seed)


def build_train_loader(cfg, paths, rank: int = 0, world_size: int = 1, verify: bool = False):
    """The training loader ``cfg.train`` asks for: this run's shards, or a weighted mixture.

    ``cfg.train.data_mixture`` maps run names (``<runs_root>/<name>/shards``; this run's own name
    means ``paths.shards``) to weights. Both kinds share ``next_batch``/``state_dict``/
    ``load_state_dict``, and a mixture's state carries its weights, so a resumed run keeps them.
    """
    tc, block = cfg.train, cfg.model.block_size
    if not tc.data_mixture:
        return ShardDataset(load_manifest(paths.shards), "train", block, tc.micro_batch_size, rank, world_size, tc.seed,
                            verify, tc.grad_accum_steps)
    runs_root = Path(cfg.runtime.runs_root)
    manifests = {
        name: paths.shards if name == cfg.runtime.run_name else runs_root / name / "shards" for name in tc.data_mixture
    }
    return build_mixture(manifests, tc.data_mixture, "train", block, tc.micro_batch_size, rank, world_size, tc.seed,
                         verify, tc.grad_accum_steps)
