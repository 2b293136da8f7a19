"""Tokenization-stage benchmark: ``write_shards`` end to end vs raw SentencePiece encode.

    .venv/bin/python bench/tokenize/run.py --mb 32 --cores 2

Corpus: stdlib docstrings replicated with small edits into clean-stage Parquet parts. One
tokenizer is trained on it with the real stage (``train_tokenizer``). Then, in the same run and
with the same number of threads:

* stage: ``data_prep.shards.write_shards`` (Ray tasks read Parquet row groups and encode them, each task
  load SentencePiece once per worker process, appends EOS, splits train/val, writes Arrow shards + sha256 manifest).
  Ray is started and one stage run made before the clock, so both sides start warm: the raw side
  has imported SentencePiece and loaded the model, the stage's Ray workers have too. That warm-up
  run's time is printed as well.
* raw:   ``SentencePieceProcessor.encode(texts, num_threads=cores)`` on the same texts, already in
  memory (no reading, no writing).

The two sides alternate ``--repeat`` times (default 3) and each reports its median. Prints MB/s of
UTF-8 text, tokens/s and the stage/raw throughput ratio (target >= 0.9), both as the ratio of the
medians and as the median of the per-repeat ratios (each pair ran back to back, so it sees
about the same machine load).
"""

from __future__ import annotations

import argparse
import warnings
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def make_clean_run(root: Path, mb: float, docs_per_part: int, seed: int = 0) -> tuple[list[str], int]:
    import importlib

    from pretrain_pipeline.artifacts import RunPaths, mark_stage_done

    paras: list[str] = []
    for name in ["argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "json",
                 "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "subprocess",
                 "tarfile", "textwrap", "threading", "typing", "unittest", "inspect", "difflib"]:
        mod = importlib.import_module(name)
        for v in [mod, *vars(mod).values()]:
            doc = getattr(v, "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200:
                paras.append(doc)
    paras = list(dict.fromkeys(paras))
    rng = random.Random(seed)
    texts: list[str] = []
    total = 0
    while total < mb * (1 << 20):
        # Small edits (numbers, word order) so documents differ, as a real corpus's do.
        text = "\n\n".join(rng.sample(paras, 3)) + f"\nRevision {rng.randrange(10**6)} of {rng.randrange(3000)}."
        texts.append(text)
        total += len(text.encode("utf-8"))
    paths = RunPaths(root)
    paths.clean.mkdir(parents=True)
    for p, start in enumerate(range(0, len(texts), docs_per_part)):
        chunk = texts[start : start + docs_per_part]
        ids = [f"doc-{start + i:08d}" for i in range(len(chunk))]
        table = pa.table({"id": ids, "text": chunk})
        pq.write_table(table, paths.clean / f"part-{p:05d}.parquet", row_group_size=1000)
    mark_stage_done(paths.clean, f"bench-{seed}-{mb}", {"documents": len(texts)})
    return texts, total


def main() -> None:
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=32.0, help="UTF-8 megabytes of text")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import sentencepiece as spm

    from data_prep.ray_runtime import ray_session
    from data_prep.shards import write_shards
    from data_prep.tokenizer import train_tokenizer
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import PipelineConfig

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        texts, n_bytes = make_clean_run(work / "run", args.mb, docs_per_part=5000)
        paths = RunPaths(work / "run")
        cfg = PipelineConfig.model_validate(
            {"tokenizer": {"vocab_size": args.vocab, "input_sentence_size": 200_000},
             "runtime": {"num_cpus": args.cores}, "data": {"sample_corpus": True}}
        )
        tok = train_tokenizer(cfg, paths)
        sp = spm.SentencePieceProcessor(model_file=str(tok.model_path))
        print(f"corpus: {len(texts)} docs, {n_bytes / 2**20:.1f} MiB, vocab {tok.vocab_size}, cores {args.cores}")

        with ray_session(cfg.runtime):
            # A warm-up stage run, outside the ratio: its workers import pyarrow/SentencePiece and load
            # the model, which the raw side also did before its clock (import + constructor).
            t = time.perf_counter()
            write_shards(cfg, paths, force=True)
            cold_s = time.perf_counter() - t
            stage_s, raw_s = [], []
            for i in range(args.repeat):
                # Alternate which side goes first, so a load spike or a warm cache favours neither.
                for side in ("stage", "raw") if i % 2 == 0 else ("raw", "stage"):
                    t = time.perf_counter()
                    if side == "stage":
                        res = write_shards(cfg, paths, force=True)
                        stage_s.append(time.perf_counter() - t)
                    else:
                        raw = sp.encode(texts, num_threads=args.cores)
                        raw_s.append(time.perf_counter() - t)
            assert ray.is_initialized()
        raw_tokens = sum(len(r) for r in raw)
        stage_tokens = res.train_tokens + res.val_tokens - res.train_docs - res.val_docs  # minus the EOS
        assert stage_tokens == raw_tokens, (stage_tokens, raw_tokens)
        mb = n_bytes / 1e6
        stage_med, raw_med = statistics.median(stage_s), statistics.median(raw_s)
        for name, secs in (("raw encode", raw_med), ("stage", stage_med)):
            print(f"{name:>10}: {secs:7.2f} s  {mb / secs:7.2f} MB/s  {raw_tokens / secs / 1e6:6.3f} Mtok/s  (median of {args.repeat})")
        pair = statistics.median(r / s for r, s in zip(raw_s, stage_s))
        print(f"ratio stage/raw throughput: {raw_med / stage_med:.3f} of medians, {pair:.3f} median per pair  (target >= 0.9)")
        print(f"shards: {res.n_shards}, all times: stage {[round(s, 2) for s in stage_s]} raw {[round(s, 2) for s in raw_s]}, "
              f"stage warm-up (cold workers) {cold_s:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
