"""Tokenization benchmark: what a user waits for, ``pretrain-pipeline tokenize`` against raw
SentencePiece on the same clean texts, settings and cores.

    .venv/bin/python bench/tokenize/run.py                          # 35, 140, 500 MB, medians of 3
    .venv/bin/python bench/tokenize/run.py --sizes 35 --repeats 1   # a quick look

Per size (MB of UTF-8 text), a clean-stage output is generated once and cached under
``--work`` (stdlib docstrings, three per document with small edits; Parquet parts of 50,000
documents in row groups of 1,000, zstd, as the clean stage writes them). Then, whole processes:

* ours: ``pretrain-pipeline tokenize -c <config>`` on a run whose ``clean/`` is that corpus, its
  ``tokenizer/`` and ``shards/`` removed first: start-up, tokenizer sample and training, encoding,
  Arrow shards, sha256s, manifest.
* raw: ``bench/tokenize/raw_sentencepiece.py``: read the same texts, write them to a text file,
  ``SentencePieceTrainer.train`` with the stage's own trainer settings (same vocabulary, same
  sample size, drawn by SentencePiece), ``encode(texts, num_threads=cores)``.

The sides alternate (which goes first flips each repeat); each prints its median, and the ratio is
raw time / our time (above 1: we are faster). This process and so both sides are pinned to the
first ``--cores`` CPUs. A second line repeats the older, narrower comparison: ``write_shards`` on
warm workers against ``encode`` alone on texts already in memory.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
DOCS_PER_PART, ROW_GROUP_DOCS = 50_000, 1_000


def make_clean_corpus(run: Path, mb: float, seed: int = 0) -> None:
    """A clean-stage output of about ``mb`` MB of text in ``run/clean`` (kept if already there)."""
    from pretrain_pipeline.artifacts import RunPaths, mark_stage_done

    paths = RunPaths(run)
    if (paths.clean / "_SUCCESS.json").exists():
        return
    shutil.rmtree(paths.clean, ignore_errors=True)
    paras: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ["argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "json",
                     "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "subprocess",
                     "tarfile", "textwrap", "threading", "typing", "unittest", "inspect", "difflib"]:
            mod = importlib.import_module(name)
            paras += [d for d in [mod.__doc__, *(getattr(v, "__doc__", None) for v in vars(mod).values())]
                      if isinstance(d, str) and len(d) > 200]
    paras = list(dict.fromkeys(paras))
    rng = random.Random(seed)
    texts: list[str] = []
    total = 0
    while total < mb * 1e6:
        # Small edits (numbers, word order) so documents differ, as a real corpus's do.
        text = "\n\n".join(rng.sample(paras, 3)) + f"\nRevision {rng.randrange(10**6)} of {rng.randrange(3000)}."
        texts.append(text)
        total += len(text.encode("utf-8"))
    tmp = paths.clean.with_name("clean.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p, start in enumerate(range(0, len(texts), DOCS_PER_PART)):
        chunk = texts[start : start + DOCS_PER_PART]
        table = pa.table({"id": [f"doc-{start + i:09d}" for i in range(len(chunk))], "text": chunk})
        pq.write_table(table, tmp / f"part-{p:05d}.parquet", row_group_size=ROW_GROUP_DOCS, compression="zstd")
    mark_stage_done(tmp, f"bench-tokenize-{seed}-{mb}", {"documents": len(texts), "text_bytes": total})
    tmp.rename(paths.clean)


def run_ours(run: Path, config: Path) -> tuple[float, dict]:
    for stage in ("tokenizer", "shards"):
        shutil.rmtree(run / stage, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("pretrain-pipeline")), "tokenize", "-c", str(config)],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    secs = time.perf_counter() - t
    records = {s: json.loads((run / s / "_SUCCESS.json").read_text()) for s in ("tokenizer", "shards")}
    return secs, records


def run_raw(run: Path, cores: int, settings: dict) -> tuple[float, dict]:
    out = run.parent / f"{run.name}-raw"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "bench/tokenize/raw_sentencepiece.py"), str(run / "clean"), str(out),
                           str(cores), json.dumps(settings)], check=True, capture_output=True, text=True)
    secs = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return secs, json.loads(proc.stdout.strip().splitlines()[-1])


def warm_writer(run: Path, cfg, cores: int, repeats: int) -> str:
    """The older comparison: ``write_shards`` on warm workers vs ``encode`` of texts in memory."""
    import sentencepiece as spm

    from data_prep.shards import encode_runner, write_shards
    from pretrain_pipeline.artifacts import RunPaths

    paths = RunPaths(run)
    texts = [t for p in sorted(paths.clean.glob("part-*.parquet")) for t in pq.read_table(p, columns=["text"]).column("text").to_pylist()]
    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer / "tokenizer.model"))
    stage_s, raw_s = [], []
    with encode_runner(cfg, paths) as runner:
        write_shards(cfg, paths, force=True, runner=runner)  # warm-up: workers load the model
        for i in range(repeats):
            for side in ("stage", "raw") if i % 2 == 0 else ("raw", "stage"):
                t = time.perf_counter()
                if side == "stage":
                    write_shards(cfg, paths, force=True, runner=runner)
                    stage_s.append(time.perf_counter() - t)
                else:
                    sp.encode(texts, num_threads=cores)
                    raw_s.append(time.perf_counter() - t)
    raw, stage = statistics.median(raw_s), statistics.median(stage_s)
    return f"  warm writer: raw encode {raw:.2f} s, write_shards {stage:.2f} s, ratio {raw / stage:.3f}"


def bench_size(mb: float, args: argparse.Namespace) -> None:
    from data_prep.tokenizer import trainer_settings
    from pretrain_pipeline.config import PipelineConfig

    run = args.work / "runs" / f"tok-{mb:g}mb"
    make_clean_corpus(run, mb)
    spec = {"data": {"sample_corpus": True}, "tokenizer": {"vocab_size": args.vocab},
            "runtime": {"runs_root": str(run.parent), "run_name": run.name, "num_cpus": args.cores}}
    config = args.work / f"tok-{mb:g}mb.json"  # JSON is YAML
    config.write_text(json.dumps(spec))
    cfg = PipelineConfig.model_validate(spec)
    settings = {**trainer_settings(cfg.tokenizer), "seed": cfg.tokenizer.seed}
    times: dict[str, list[float]] = {"ours": [], "raw": []}
    for i in range(args.repeats):
        for side in ("ours", "raw") if i % 2 == 0 else ("raw", "ours"):
            if side == "ours":
                secs, records = run_ours(run, config)
            else:
                secs, raw = run_raw(run, args.cores, settings)
            times[side].append(secs)
    ours, base = statistics.median(times["ours"]), statistics.median(times["raw"])
    tok_s, shards_s = records["tokenizer"]["elapsed_s"], records["shards"]["elapsed_s"]
    tokens = records["shards"]["train_tokens"] + records["shards"]["val_tokens"]
    print(f"{mb:g} MB ({raw['documents']:,} docs): raw {base:.2f} s, ours {ours:.2f} s, ratio raw/ours {base / ours:.3f}"
          f"  (medians of {args.repeats}; all: raw {[round(s, 2) for s in times['raw']]} ours {[round(s, 2) for s in times['ours']]})")
    print(f"  raw: read+write {raw['read_write_s']:.2f} s, train {raw['train_s']:.2f} s, encode {raw['encode_s']:.2f} s, "
          f"{raw['tokens']:,} tokens; ours (last run): tokenizer {tok_s:.2f} s, shards {shards_s:.2f} s, "
          f"start-up and the rest {times['ours'][-1] - tok_s - shards_s:.2f} s, {tokens:,} tokens with EOS")
    if not args.no_warm:
        print(warm_writer(run, cfg, args.cores, args.repeats), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="35,140,500", help="MB of clean text per corpus, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--work", type=Path, default=ROOT / ".state/bench/tokenize", help="cached corpora and runs")
    ap.add_argument("--no-warm", action="store_true", help="skip the warm-writer line")
    args = ap.parse_args()
    if args.cores < len(os.sched_getaffinity(0)):
        os.sched_setaffinity(0, range(args.cores))  # inherited by both sides' processes
    os.environ.setdefault("PRETRAIN_PIPELINE_QUIET", "1")
    print(f"cores {args.cores}, vocab {args.vocab}, ratio = raw time / our time (> 1: ours is faster)", flush=True)
    for mb in (float(s) for s in args.sizes.split(",")):
        bench_size(mb, args)


if __name__ == "__main__":
    main()
