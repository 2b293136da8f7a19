"""Clean-stage benchmark: this project (Ray Data) vs datatrove's LocalPipelineExecutor.

    .venv/bin/pip install -c requirements/constraints.txt datatrove==0.10.1   # bench only
    .venv/bin/python bench/clean/run.py --mode filters --docs 20000 --cores 2
    .venv/bin/python bench/clean/run.py --mode minhash --docs 20000 --cores 2
    .venv/bin/python bench/clean/run.py --mode scale   --docs 10000 --cores 2   # 1x vs 4x corpus

Same corpus (stdlib docstrings, replicated with small edits into ``--files`` jsonl files), same
cores, same rules: Gopher repetition + Gopher quality + C4 + FineWeb with published defaults
(``filters``), or MinHash 5-grams 14x8 (``minhash``). Language ID is left out: datatrove's
LanguageFilter needs a fastText model download. Both sides split words on whitespace (datatrove's
English tokenizer needs spaCy), so decisions can be compared; the script prints their agreement.
Times include reading and writing, not interpreter or Ray start-up (both sides start warm).
Peak memory is the largest summed RSS of this process and all its descendants (Ray workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


class _PeakRSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.1)

    def __enter__(self) -> "_PeakRSS":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def make_corpus(out: Path, n_docs: int, n_files: int, seed: int = 0) -> Path:
    from data_prep.sample_corpus import build_sample_corpus

    out.mkdir(parents=True)
    build_sample_corpus(out.parent / "base.jsonl", 4000, seed=seed)
    base = [json.loads(x)["text"] for x in (out.parent / "base.jsonl").read_text().splitlines()]
    rng = random.Random(seed)
    files = [open(out / f"part-{i:03d}.jsonl", "w") for i in range(n_files)]
    for i in range(n_docs):
        words = rng.choice(base).split(" ")
        if i >= len(base):  # later copies get a small edit: near duplicates for the MinHash mode
            words.insert(rng.randrange(len(words) + 1), rng.choice(["river", "lantern", "seven"]))
        files[i % n_files].write(json.dumps({"id": f"d{i}", "text": " ".join(words)}) + "\n")
    for f in files:
        f.close()
    return out


def run_ours(corpus: Path, work: Path, cores: int, mode: str) -> tuple[float, dict]:
    from data_prep.clean import clean_corpus
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import build_config

    filters = mode == "filters"
    data = {
        "inputs": [str(corpus)],
        "language_filter": False,
        "gopher_quality": filters,
        "gopher_repetition": filters,
        "c4_filter": filters,
        "fineweb_filter": filters,
        "pii_redact": False,
        "exact_dedup": False,
        "minhash_dedup": not filters,
        "max_chars": 10_000_000,
    }
    cfg = build_config({"data": data, "runtime": {"runs_root": str(work), "run_name": mode, "num_cpus": cores}})
    start = time.perf_counter()
    res = clean_corpus(cfg, RunPaths(cfg.run_dir()), force=True)
    elapsed = time.perf_counter() - start
    import pyarrow.parquet as pq

    dropped = pq.read_table(RunPaths(cfg.run_dir()).clean / "dropped.parquet").to_pydict()
    return elapsed, {"kept": res.kept, "dropped_ids": set(dropped["id"])}


def run_datatrove(corpus: Path, work: Path, cores: int, mode: str) -> tuple[float, dict]:
    import regex
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        """Whitespace words, regex sentences: what this project's filters use."""

        _sent = regex.compile(r"[^.!?]+[.!?]+(?=\s|$)")

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [s.strip() for s in self._sent.findall(text)]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in self._sent.finditer(text)]

    tok = Whitespace()
    n_files = len(list(corpus.glob("*.jsonl")))
    reader = JsonlReader(str(corpus), glob_pattern="*.jsonl")
    out = work / f"dt-{mode}"
    start = time.perf_counter()
    if mode == "filters":
        from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

        pipeline = [
            reader,
            GopherRepetitionFilter(language=tok, exclusion_writer=JsonlWriter(str(out / "removed"), output_filename="${rank}.jsonl")),
            GopherQualityFilter(language=tok, exclusion_writer=JsonlWriter(str(out / "removed"), output_filename="${rank}-q.jsonl")),
            C4QualityFilter(language=tok, exclusion_writer=JsonlWriter(str(out / "removed"), output_filename="${rank}-c4.jsonl")),
            FineWebQualityFilter(language=tok, exclusion_writer=JsonlWriter(str(out / "removed"), output_filename="${rank}-fw.jsonl")),
            JsonlWriter(str(out / "kept")),
        ]
        LocalPipelineExecutor(pipeline, tasks=n_files, workers=cores, logging_dir=str(out / "logs")).run()
    else:
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )

        from datatrove.utils.hashing import HashConfig

        # sha1: datatrove 0.10.1's xxhash wrapper passes str, which xxhash 4.1 (our pin) refuses.
        mc = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, hash_config=HashConfig(precision=64, hash_fc="sha1"))
        LocalPipelineExecutor([reader, MinhashDedupSignature(str(out / "sigs"), config=mc, language=tok)], tasks=n_files, workers=cores, logging_dir=str(out / "l1")).run()
        LocalPipelineExecutor([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=mc)], tasks=mc.num_buckets, workers=cores, logging_dir=str(out / "l2")).run()
        LocalPipelineExecutor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=mc)], tasks=1, logging_dir=str(out / "l3")).run()
        LocalPipelineExecutor(
            [reader, MinhashDedupFilter(str(out / "remove"), exclusion_writer=JsonlWriter(str(out / "removed"))), JsonlWriter(str(out / "kept"))],
            tasks=n_files, workers=cores, logging_dir=str(out / "l4"),
        ).run()
    elapsed = time.perf_counter() - start
    dropped: set[str] = set()
    import gzip

    for f in (out / "removed").rglob("*"):
        if f.is_file():
            data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
            dropped.update(json.loads(x)["id"] for x in data.decode().splitlines() if x)
    return elapsed, {"dropped_ids": dropped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["filters", "minhash", "scale"], default="filters")
    ap.add_argument("--docs", type=int, default=20_000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("PRETRAIN_PIPELINE_QUIET", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-clean-"))
    os.environ.setdefault("PRETRAIN_PIPELINE_STATE", str(tmp / "state"))
    from data_prep.ray_runtime import ray_session
    from pretrain_pipeline.config import RuntimeConfig

    try:
        with ray_session(RuntimeConfig(num_cpus=args.cores)):
            if args.mode == "scale":
                rows = []
                for factor in (1, 4):
                    corpus = make_corpus(tmp / f"corpus{factor}", args.docs * factor, args.files * factor)
                    for m in ("filters", "minhash"):
                        with _PeakRSS() as mem:
                            t, _ = run_ours(corpus, tmp / f"runs{factor}", args.cores, m)
                        rows.append((m, factor, t, mem.peak))
                for m in ("filters", "minhash"):
                    (_, _, t1, m1), (_, _, t4, m4) = [r for r in rows if r[0] == m]
                    print(f"scale {m}: 1x {args.docs} docs {t1:.2f}s peak {m1 / 2**20:.0f} MiB | 4x {t4:.2f}s peak {m4 / 2**20:.0f} MiB | time x{t4 / t1:.2f}, memory x{m4 / m1:.2f}")
                return
            corpus = make_corpus(tmp / "corpus", args.docs, args.files)
            t_ours, ours = run_ours(corpus, tmp / "runs", args.cores, args.mode)
            t_dt, dt = run_datatrove(corpus, tmp / "dt", args.cores, args.mode)
            agree = 1 - len(ours["dropped_ids"] ^ dt["dropped_ids"]) / args.docs
            print(f"mode={args.mode} docs={args.docs} files={args.files} cores={args.cores}")
            print(f"ours:      {t_ours:8.2f}s {args.docs / t_ours:9.0f} docs/s  dropped {len(ours['dropped_ids'])}")
            print(f"datatrove: {t_dt:8.2f}s {args.docs / t_dt:9.0f} docs/s  dropped {len(dt['dropped_ids'])}")
            print(f"ratio (ours/datatrove throughput): {t_dt / t_ours:.2f}x   same decision on {agree:.2%} of documents")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
