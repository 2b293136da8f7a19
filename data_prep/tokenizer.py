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
from typing import Any, Iterator

import pyarrow.parquet as pq

from data_prep.ray_runtime import is_quiet
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


def iter_texts(parts: list[Path], batch_size: int = 1024) -> Iterator[str]:
    """Kept documents in clean order."""
    for part in parts:
        for batch in pq.ParquetFile(part).iter_batches(columns=["text"], batch_size=batch_size):
            yield from batch.column("text").to_pylist()


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


def sample_lines(texts: Iterator[str], max_lines: int, max_bytes: int, seed: int) -> LineSample:
    """Seeded reservoir sample of non-blank lines, returned in corpus order (bounded memory).

    The reservoir fills with the first ``max_lines`` lines; after that line ``seen`` replaces slot
    ``random.Random(seed).randrange(seen + 1)`` when that is a slot: the textbook algorithm, its
    draws made in bulk (``RandrangeDraws``) for batches of lines.
    """
    from array import array

    import numpy as np

    short = max_bytes // 4  # a line of at most this many characters fits: no need to encode it
    sample: list[str] = []
    reservoir = None  # the full sample as a numpy object array, once lines start replacing
    order = np.arange(max_lines, dtype=np.int64)  # corpus index of each sample line
    draws: RandrangeDraws | None = None
    pending: list[str] = []  # lines past the filled reservoir, waiting for their draws
    seen = 0  # lines before ``pending``

    def replace() -> None:
        nonlocal draws, reservoir, seen
        if draws is None:
            draws, reservoir = RandrangeDraws(seed), np.empty(len(sample), dtype=object)
            reservoir[:] = sample
        slots = draws.below(seen + 1, len(pending))
        hits = np.flatnonzero(slots < max_lines)
        # The last line drawn for a slot is the one that stays there.
        kept, last = np.unique(slots[hits][::-1], return_index=True)
        lines_at = hits[len(hits) - 1 - last]
        order[kept] = seen + lines_at
        lines = np.empty(len(pending), dtype=object)
        lines[:] = pending
        reservoir[kept] = lines[lines_at]
        seen += len(pending)
        pending.clear()

    doc_ends = array("q")  # lines up to the end of each document that has any
    for text in texts:
        lines = list(filter(str.strip, text.split("\n")))
        if not lines:
            continue
        if max(map(len, lines)) > short:
            lines = [piece for line in lines for piece in split_long_line(line, max_bytes)]
        doc_ends.append((doc_ends[-1] if doc_ends else 0) + len(lines))
        if len(sample) < max_lines:
            fill = min(len(lines), max_lines - len(sample))
            sample += lines[:fill] if fill < len(lines) else lines
            seen += fill
            lines = lines[fill:]
        pending += lines
        if len(pending) >= 1 << 16:
            replace()
    if pending:
        replace()
    if draws is None:
        result, positions = LineSample(sample), np.arange(len(sample))
    else:
        result, positions = LineSample(reservoir[np.argsort(order)].tolist()), order
    result.documents = len(np.unique(np.searchsorted(np.frombuffer(doc_ends, dtype=np.int64), positions, side="right")))
    return result


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

    lines = sample_lines(iter_texts(parts), tok.input_sentence_size, tok.max_sentence_length, tok.seed)
    if not lines:
        raise ValueError(f"{paths.clean}: the clean corpus has no text to train a tokenizer on")

    import sentencepiece as spm

    with stage.outputs(out_dir) as (tmp,), tempfile.TemporaryDirectory(prefix="spm-") as scratch:
        tmp.mkdir(parents=True)
        sample_file = Path(scratch) / "sample.txt"
        with open(sample_file, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
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
            "training_documents": lines.documents,
            "training_bytes": sample_file.stat().st_size,  # each line's UTF-8 bytes and its newline
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
