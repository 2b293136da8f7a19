"""Tokenizer stage: SentencePiece trained on a seeded, bounded sample of the clean corpus.

Llama-like settings: byte fallback (no ``<unk>`` at encode time), single digits, no text
normalisation (the clean stage already did NFC; the tokenizer must round-trip what it is given,
whitespace runs included), a dummy prefix space. Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<pad>`` 3, then ``user_defined_symbols``.

The vocabulary size is a hard limit: a corpus too small for the requested size fails with a
message saying the largest size it supports, instead of silently producing a smaller vocabulary
than the model config was written for.

With ``tokenizer.from_run`` the stage trains nothing: it copies another run's finished tokenizer
(sha256 checked against that run's meta.json and completion record), so named sources tokenized as
separate runs share one vocabulary and can be mixed at training time.

Output ``tokenizer/``: tokenizer.model, tokenizer.vocab, meta.json, _SUCCESS.json.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import pyarrow.parquet as pq

from data_prep.ray_runtime import ThreadPoolRunner, is_quiet
from pretrain_pipeline.artifacts import RunPaths, atomic_write_json, read_json, read_stage_record, sha256_file
from pretrain_pipeline.config import PipelineConfig, TokenizerConfig
from pretrain_pipeline.errors import MissingInput, UserError
from pretrain_pipeline.stage import Stage, completed_record

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"

# Fields that only shape the shards; changing them must not retrain the tokenizer.
SHARD_ONLY_FIELDS = ("val_fraction", "shard_size_mb")
# Not a training setting: a run that sets it trains nothing (see reuse_tokenizer).
NOT_TRAINING_FIELDS = (*SHARD_ONLY_FIELDS, "from_run")


@dataclass
class TokenizerResult:
    model_path: Path
    vocab_path: Path
    vocab_size: int
    sha256: str
    skipped: bool = False
    training_lines: int = 0
    elapsed_s: float = 0.0
    from_run: str | None = None  # the run whose tokenizer was copied, when not trained here

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["model_path"] = str(self.model_path)
        out["vocab_path"] = str(self.vocab_path)
        return out


def clean_parts(paths: RunPaths) -> list[Path]:
    completed_record(paths.clean, "clean")
    parts = sorted(paths.clean.glob("part-*.parquet"))
    if not parts:
        raise UserError(f"{paths.clean}: no document survived cleaning; see {paths.clean / 'stats.json'}")
    return parts


def clean_stage_fingerprint(paths: RunPaths) -> str:
    return completed_record(paths.clean, "clean")["fingerprint"]


def training_config(tok: TokenizerConfig) -> dict[str, Any]:
    """The tokenizer settings that shape the trained model (the stage's config section)."""
    return {k: v for k, v in tok.model_dump(mode="json").items() if k not in NOT_TRAINING_FIELDS}


def split_long_line(line: str, max_bytes: int) -> list[str]:
    """Pieces of at most ``max_bytes`` UTF-8 bytes (SentencePiece measures lines in bytes)."""
    if len(line.encode("utf-8")) <= max_bytes:
        return [line]
    pieces: list[str] = []
    # A character is at most 4 bytes, so this many characters always fit.
    step = max(1, max_bytes // 4)
    start = 0
    while start < len(line):
        end = min(len(line), start + max_bytes)
        while len(line[start:end].encode("utf-8")) > max_bytes:
            end = max(start + step, end - step)
        pieces.append(line[start:end])
        start = end
    return pieces


class RandrangeDraws:
    """``random.Random(seed).randrange(n)`` for n = n0, n0 + 1, ... in bulk, draw for draw.

    CPython draws ``randrange(n)`` as ``getrandbits(n.bit_length())`` repeated while the value is
    >= n, and ``getrandbits(k <= 32)`` is the Mersenne Twister's next 32-bit output shifted right
    by 32 - k. numpy's MT19937, given the same state, makes the same outputs, so whole batches are
    decided with array operations; only a word whose fate depends on which line takes it (rare:
    its value lies between the batch's smallest and largest n) is decided one at a time.
    """

    def __init__(self, seed: int) -> None:
        import numpy as np

        _, state, _ = random.Random(seed).getstate()
        self.bits = np.random.MT19937()
        self.bits.state = {"bit_generator": "MT19937", "state": {"key": np.array(state[:-1], dtype=np.uint32), "pos": state[-1]}}
        self.words = np.empty(0, dtype=np.uint64)
        self.p = 0  # next unused word in self.words

    def _window(self, size: int) -> Any:
        import numpy as np

        if len(self.words) - self.p < size:
            fresh = self.bits.random_raw(max(size, 1 << 16))
            self.words, self.p = np.concatenate([self.words[self.p :], fresh]), 0
        return self.words[self.p : self.p + size]

    def _getrandbits(self, k: int) -> int:
        """One ``getrandbits(k)`` for any k, the way CPython fills it: 32-bit words, low word first."""
        value, shift = 0, 0
        while k > 0:
            word = int(self._window(1)[0]) >> max(0, 32 - k)
            self.p += 1
            value |= word << shift
            shift, k = shift + 32, k - 32
        return value

    def below(self, n0: int, count: int) -> Any:
        """An int64 array: element i is ``randrange(n0 + i)``."""
        import numpy as np

        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            n = n0 + done
            k = n.bit_length()
            if k > 32:  # over 4 billion lines: one at a time, still draw for draw
                while (j := self._getrandbits(k)) >= n:
                    pass
                out[done] = j
                done += 1
                continue
            # A batch stays within one bit length; its size keeps undecided words about one per batch.
            end = min(count, (1 << k) - n0, done + max(64, math.isqrt(1 << k)))
            done = self._batch(out, done, end, n0, k)
        return out

    def _batch(self, out: Any, done: int, end: int, n0: int, k: int) -> int:
        import numpy as np

        n_max = n0 + end - 1
        while done < end:
            window = self._window(2 * (end - done) + 16) >> np.uint64(32 - k)
            n = n0 + done
            undecided = np.flatnonzero((window >= n) & (window < n_max))
            decided = window[: undecided[0] if len(undecided) else len(window)]
            accepted = np.flatnonzero(decided < n)
            take = min(len(accepted), end - done)
            out[done : done + take] = decided[accepted[:take]]
            done += take
            if done == end:
                self.p += int(accepted[take - 1]) + 1 if take else 0
                break
            self.p += len(decided)
            if len(decided) < len(window):  # the undecided word: line n0 + done takes it or not
                if window[len(decided)] < n0 + done:
                    out[done] = window[len(decided)]
                    done += 1
                self.p += 1
        return done


class LineSample(list):
    """The sampled lines in corpus order; ``documents``: how many documents they come from."""

    documents: int = 0


# The characters of ``str.isspace``: a line of only these is blank (``str.strip`` leaves nothing).
WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def _text_bytes() -> Any:
    """Per byte value: is it an ASCII character that is not whitespace."""
    import numpy as np

    text = np.zeros(256, dtype=bool)
    text[:128] = [not chr(b).isspace() for b in range(128)]
    return text


def _offsets(strings: Any) -> Any:
    """The value offsets of an Arrow string array, as numpy (no copy)."""
    import numpy as np
    import pyarrow as pa

    dtype = np.int64 if pa.types.is_large_string(strings.type) else np.int32
    return np.frombuffer(strings.buffers()[1], dtype=dtype)[strings.offset : strings.offset + len(strings) + 1]


def _not_blank(strings: Any) -> Any:
    """Per string of an Arrow array: does ``str.strip`` leave anything of it (a numpy bool array)."""
    import numpy as np
    import pyarrow.compute as pc

    text_byte = _text_bytes()
    offsets = _offsets(strings)
    data = np.frombuffer(strings.buffers()[2] or b"\0", dtype=np.uint8)
    sizes = np.diff(offsets)
    # An ASCII byte that is not whitespace is a character that is not: a string that starts or
    # ends with one is not blank. The others (indentation-only lines, mostly) are read in full.
    keep = (sizes > 0) & (text_byte[data.take(offsets[:-1], mode="clip")] | text_byte[data.take(offsets[1:] - 1, mode="clip")])
    unsure = np.flatnonzero((sizes > 0) & ~keep)
    if len(unsure):
        size = sizes[unsure]
        first = np.cumsum(size) - size  # where each one starts among their bytes
        unsure_bytes = data[np.arange(size.sum()) + np.repeat(offsets[unsure] - first, size)]
        keep[unsure] = np.logical_or.reduceat(text_byte[unsure_bytes], first)
        # Only ASCII whitespace is blank; non-ASCII whitespace is rare enough for Arrow's trim.
        odd = unsure[~keep[unsure] & np.logical_or.reduceat(unsure_bytes >= 0x80, first)]
        if len(odd):
            keep[odd] = pc.binary_length(pc.utf8_trim(strings.take(odd), WHITESPACE)).to_numpy() > 0
    return keep


class DocumentLines(NamedTuple):
    """The training lines of a batch of documents: ``lines`` (Arrow strings), ``rows`` (the
    document each comes from, counted in the batch) and ``documents`` (the batch's size)."""

    lines: Any
    rows: Any
    documents: int


def document_lines(text: Any, max_bytes: int) -> DocumentLines:
    """The lines of ``text`` (split at each newline) that ``str.strip`` leaves something of, those
    over ``max_bytes`` cut by ``split_long_line``: in Arrow and numpy, which threads run side by side."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    lists = pc.split_pattern(text, "\n")
    flat = lists.flatten()
    keep = _not_blank(flat)
    sizes = np.diff(_offsets(flat))
    lines, rows = flat.filter(keep), pc.list_parent_indices(lists).to_numpy()[keep]
    if (sizes[keep] > max_bytes).any():
        pieces = [split_long_line(line, max_bytes) for line in lines.to_pylist()]
        lines = pa.array([piece for cut in pieces for piece in cut], type=flat.type)
        rows = np.repeat(rows, [len(cut) for cut in pieces])
    return DocumentLines(lines, rows, len(text))


class _Reservoir:
    """Seeded reservoir sample of lines fed in batches, in bounded memory.

    The reservoir fills with the first ``max_lines`` lines; after that line ``seen`` replaces slot
    ``random.Random(seed).randrange(seen + 1)`` when that is a slot: the textbook algorithm, its
    draws made in bulk (``RandrangeDraws``). Only the lines that still hold a slot at the end of
    their batch are kept (Arrow slices, not Python strings), and pruned to the live ones when they
    pile up.
    """

    def __init__(self, max_lines: int, seed: int) -> None:
        import numpy as np

        self.max_lines, self.draws = max_lines, RandrangeDraws(seed)
        self.slot_line = np.full(max_lines, -1, dtype=np.int64)  # corpus index of each slot's line
        self.kept: list[tuple[Any, Any, Any]] = []  # (lines, their corpus indices, their documents)
        self.kept_count = self.seen = self.documents = 0

    def add(self, batch: DocumentLines) -> None:
        import numpy as np

        n = len(batch.lines)
        fill = min(n, max(0, self.max_lines - self.seen))
        slots = np.arange(self.seen, self.seen + n, dtype=np.int64)
        if n > fill:
            slots[fill:] = self.draws.below(self.seen + fill + 1, n - fill)
        hits = np.flatnonzero(slots < self.max_lines)
        # The last line drawn for a slot is the one that stays there: the largest corpus index.
        np.maximum.at(self.slot_line, slots[hits], self.seen + hits)
        at = hits[self.slot_line[slots[hits]] == self.seen + hits]
        lines = batch.lines if len(at) == n else batch.lines.filter(_mask(n, at))
        self.kept.append((lines, self.seen + at, self.documents + batch.rows[at]))
        self.kept_count += len(at)
        self.seen += n
        self.documents += batch.documents
        if self.kept_count > 4 * self.max_lines:
            self.kept = self._live()
            self.kept_count = self.max_lines

    def _live(self) -> list[tuple[Any, Any, Any]]:
        """``kept`` without the lines that lost their slot since."""
        import numpy as np

        live = np.sort(self.slot_line[self.slot_line >= 0])
        out = []
        for lines, index, documents in self.kept:
            keep = live[np.searchsorted(live, index).clip(max=len(live) - 1)] == index
            out.append((lines.filter(keep), index[keep], documents[keep]))
        return out

    def sample(self) -> tuple[Any, int]:
        """The sampled lines in corpus order (Arrow strings) and how many documents they come from."""
        import numpy as np
        import pyarrow as pa

        live = self._live()
        chunks = [lines for lines, _, _ in live]
        if len({chunk.type for chunk in chunks}) > 1:  # a row group of over 2 GiB among the others
            chunks = [chunk.cast(pa.large_string()) for chunk in chunks]
        lines = pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string())
        documents = np.concatenate([documents for _, _, documents in live] or [np.empty(0)])
        return lines, int(np.count_nonzero(np.diff(documents))) + (len(documents) > 0)


def _mask(n: int, at: Any) -> Any:
    import numpy as np

    mask = np.zeros(n, dtype=bool)
    mask[at] = True
    return mask


def sample_lines(texts: Iterable[str], max_lines: int, max_bytes: int, seed: int) -> LineSample:
    """Seeded reservoir sample of the non-blank lines of ``texts``, in corpus order (see ``_Reservoir``)."""
    import pyarrow as pa

    reservoir = _Reservoir(max_lines, seed)
    texts = iter(texts)
    while batch := list(itertools.islice(texts, 1024)):
        reservoir.add(document_lines(pa.array(batch, pa.large_string()), max_bytes))
    lines, documents = reservoir.sample()
    result = LineSample(lines.to_pylist())
    result.documents = documents
    return result


def _row_group_lines(row_group: tuple[str, int], max_bytes: int) -> DocumentLines:
    import pyarrow as pa

    part, group = row_group
    text = pq.ParquetFile(part).read_row_group(group, columns=["text"], use_threads=False).column("text")
    # Over 2 GiB of text comes in chunks; 64-bit offsets hold it in one array.
    return document_lines(text.chunk(0) if text.num_chunks == 1 else text.cast(pa.large_string()).combine_chunks(), max_bytes)


def sample_clean_parts(parts: list[Path], max_lines: int, max_bytes: int, seed: int, threads: int) -> tuple[Any, int]:
    """``sample_lines`` of the clean parts, their row groups read and split into lines by
    ``threads`` threads (Arrow works without the GIL) while this one draws."""
    reservoir = _Reservoir(max_lines, seed)
    row_groups = [(str(p), g) for p in parts for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    with ThreadPoolRunner(threads) as runner:
        for batch in runner.map(_row_group_lines, row_groups, shared=(max_bytes,), window=2 * threads,
                                describe=lambda rg: f"{rg[0]} row group {rg[1]}", desc="tokenizer sample"):
            reservoir.add(batch)
    return reservoir.sample()


def write_lines(lines: Any, path: Path) -> int:
    """Each line (of an Arrow chunked array of strings) and a newline, as UTF-8; returns the bytes written."""
    import pyarrow.compute as pc

    with open(path, "wb") as f:
        for chunk in pc.binary_join_element_wise(lines, "", "\n").chunks:
            if len(chunk):
                offsets = _offsets(chunk)
                f.write(chunk.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0])))
    return path.stat().st_size


def trainer_settings(tok: TokenizerConfig) -> dict[str, Any]:
    """SentencePiece trainer arguments (without input/output paths), recorded in meta.json."""
    return dict(
        model_type=tok.model_type,
        vocab_size=tok.vocab_size,
        character_coverage=tok.character_coverage,
        byte_fallback=tok.byte_fallback,
        split_digits=tok.split_digits,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentence_length=tok.max_sentence_length,
        input_sentence_size=tok.input_sentence_size,
        shuffle_input_sentence=True,
        seed_sentencepiece_size=1_000_000,
        hard_vocab_limit=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_id=PAD_ID,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        pad_piece="<pad>",
        user_defined_symbols=list(tok.user_defined_symbols),
    )


_TOO_BIG = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def _strip_run_specific(model_file: Path) -> None:
    """Drop the temp paths and thread count SentencePiece records in the model.

    They would make the model bytes (and so its sha256, which names the tokenizer downstream)
    differ between two runs that learned exactly the same pieces.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    for name in ("input", "model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(name)
    model_file.write_bytes(proto.SerializeToString(deterministic=True))


def _train(input_file: Path, prefix: Path, tok: TokenizerConfig, num_threads: int | None = None) -> None:
    import sentencepiece as spm

    settings = trainer_settings(tok)
    spm.set_random_generator_seed(tok.seed)
    try:
        spm.SentencePieceTrainer.train(
            input=str(input_file),
            model_prefix=str(prefix),
            num_threads=num_threads or _cpu_count(),
            minloglevel=2 if is_quiet() else 1,
            # Lists go as lists: the wrapper writes them as CSV, so a symbol may contain a comma.
            **{k: v for k, v in settings.items() if v != []},
        )
    except RuntimeError as err:
        if m := _TOO_BIG.search(str(err)):
            raise ValueError(
                f"tokenizer.vocab_size={m.group(1)} is too large for this corpus: SentencePiece can make at "
                f"most {m.group(2)} pieces from it. Set tokenizer.vocab_size <= {m.group(2)} or use more data."
            ) from None
        raise
    _strip_run_specific(prefix.with_suffix(".model"))


def _cpu_count() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def train_tokenizer(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> TokenizerResult:
    if cfg.tokenizer.from_run is not None:
        return reuse_tokenizer(cfg, paths, force)
    start = time.monotonic()
    tok = cfg.tokenizer
    out_dir = paths.tokenizer
    parts = clean_parts(paths)
    clean_fp = clean_stage_fingerprint(paths)
    stage = Stage("tokenizer", out_dir, training_config(tok), clean_fp, force=force)
    if record := stage.current():
        log.info("tokenizer: clean corpus and settings unchanged, skipping (%s)", out_dir)
        return TokenizerResult(
            model_path=out_dir / MODEL_FILE,
            vocab_path=out_dir / VOCAB_FILE,
            vocab_size=record["vocab_size"],
            sha256=record["sha256"],
            skipped=True,
            training_lines=record.get("training_lines", 0),
            elapsed_s=record.get("elapsed_s", 0.0),
        )

    lines, documents = sample_clean_parts(parts, tok.input_sentence_size, tok.max_sentence_length, tok.seed, _cpu_count())
    if not len(lines):
        raise ValueError(f"{paths.clean}: the clean corpus has no text to train a tokenizer on")

    import sentencepiece as spm

    with stage.outputs(out_dir) as (tmp,), tempfile.TemporaryDirectory(prefix="spm-") as scratch:
        tmp.mkdir(parents=True)
        sample_file = Path(scratch) / "sample.txt"
        sample_bytes = write_lines(lines, sample_file)
        log.info("tokenizer: training %s vocab=%d on %d lines", tok.model_type, tok.vocab_size, len(lines))
        _train(sample_file, tmp / "tokenizer", tok)
        sp = spm.SentencePieceProcessor(model_file=str(tmp / MODEL_FILE))
        sha = sha256_file(tmp / MODEL_FILE)
        meta = {
            "sha256": sha,
            "vocab_size": sp.get_piece_size(),
            "unk_id": sp.unk_id(),
            "bos_id": sp.bos_id(),
            "eos_id": sp.eos_id(),
            "pad_id": sp.pad_id(),
            "settings": trainer_settings(tok),
            "training_lines": len(lines),
            "training_documents": documents,
            "training_bytes": sample_bytes,  # each line's UTF-8 bytes and its newline
            "sample_seed": tok.seed,
            "clean_fingerprint": clean_fp,
        }
        atomic_write_json(tmp / "meta.json", meta)

    result = TokenizerResult(
        model_path=out_dir / MODEL_FILE,
        vocab_path=out_dir / VOCAB_FILE,
        vocab_size=meta["vocab_size"],
        sha256=sha,
        training_lines=len(lines),
        elapsed_s=round(time.monotonic() - start, 3),
    )
    stage.done({**result.to_dict(), "clean_fingerprint": clean_fp})
    log.info("tokenizer: vocab %d, sha256 %s", result.vocab_size, sha[:12])
    return result


def source_tokenizer(cfg: PipelineConfig) -> tuple[Path, dict[str, Any]]:
    """(tokenizer/ of run ``tokenizer.from_run``, its meta.json), its model's sha256 verified."""
    name = cfg.tokenizer.from_run
    if name == cfg.runtime.run_name:
        raise ValueError(f"tokenizer.from_run={name!r} names this run itself; name the run that trained the tokenizer")
    src = RunPaths(Path(cfg.runtime.runs_root) / name).tokenizer
    record = read_stage_record(src)
    if record is None:
        raise MissingInput(
            f"{src}: tokenizer.from_run={name!r}, but that run has no finished tokenizer (no _SUCCESS.json); "
            f"run `pretrain-pipeline tokenize` for {name!r} first"
        )
    meta = read_json(src / "meta.json")
    sha = sha256_file(src / MODEL_FILE)
    if not sha == meta["sha256"] == record["sha256"]:
        raise ValueError(
            f"{src / MODEL_FILE}: sha256 {sha[:12]} does not match its meta.json ({meta['sha256'][:12]}) and "
            f"_SUCCESS.json ({record['sha256'][:12]}); re-run the tokenizer stage of {name!r}"
        )
    return src, meta


def reuse_tokenizer(cfg: PipelineConfig, paths: RunPaths, force: bool = False) -> TokenizerResult:
    """Copy run ``tokenizer.from_run``'s tokenizer: same ids, so the sources can be mixed.

    The fingerprint is the model's sha256 (and the run it came from), not this run's corpus: a
    cleaned corpus that changes re-encodes the shards but keeps the shared tokenizer.
    """
    start = time.monotonic()
    name = cfg.tokenizer.from_run
    out_dir = paths.tokenizer
    src, src_meta = source_tokenizer(cfg)
    sha = src_meta["sha256"]
    stage = Stage("tokenizer", out_dir, {"from_run": name}, sha, force=force)
    result = TokenizerResult(
        model_path=out_dir / MODEL_FILE,
        vocab_path=out_dir / VOCAB_FILE,
        vocab_size=int(src_meta["vocab_size"]),
        sha256=sha,
        from_run=name,
    )
    if stage.current():
        log.info("tokenizer: still the tokenizer of run %r, skipping (%s)", name, out_dir)
        result.skipped = True
        return result

    with stage.outputs(out_dir) as (tmp,):
        tmp.mkdir(parents=True)
        for file in (MODEL_FILE, VOCAB_FILE):
            if (src / file).exists():
                shutil.copyfile(src / file, tmp / file)
        if sha256_file(tmp / MODEL_FILE) != sha:
            raise RuntimeError(f"{src / MODEL_FILE} changed while it was being copied; run the stage again")
        # The source's meta (its training settings and sample) plus where this copy came from.
        meta = {**src_meta, "from_run": {"run": name, "path": str(src.resolve()), "sha256": sha}}
        atomic_write_json(tmp / "meta.json", meta)

    result.elapsed_s = round(time.monotonic() - start, 3)
    stage.done(result.to_dict())
    log.info("tokenizer: reused run %r's tokenizer (vocab %d, sha256 %s)", name, result.vocab_size, sha[:12])
    return result
