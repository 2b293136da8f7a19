"""Clean-stage benchmark: this project (Ray tasks) vs datatrove's LocalPipelineExecutor.

    make bench-setup                                              # installs datatrove (bench extra)
    .venv/bin/python bench/clean/run.py --mode filters --docs 8000 --cores 2
    .venv/bin/python bench/clean/run.py --mode minhash --docs 8000 --cores 2
    .venv/bin/python bench/clean/run.py --mode scale   --docs 4000 --cores 2   # 1x vs 4x corpus
    .venv/bin/python bench/clean/run.py --mode split   --docs 8000 --cores 2   # one big file: 1 task vs parts
    .venv/bin/python bench/clean/run.py --mode onefile --docs 60000 --cores 2  # one .jsonl.gz: 1 task vs streamed

Same corpus (stdlib docstrings, replicated with small edits into ``--files`` jsonl files), same
cores, same steps with the same thresholds on both sides:

* ``filters``: Gopher repetition -> Gopher quality -> C4 -> FineWeb, published defaults (Gopher's
  50-word minimum and 2 stop words; the values are read from one DataConfig and passed to both).
* ``minhash``: MinHash LSH, word 5-grams, 14 bands x 8 rows, datatrove's default text
  simplification and 64-bit xxhash (its four stages, as its MinHash example runs them).

Work only one side does is either given to the other side or switched off, and both are reported
(``--repair``): ``off`` runs neither Unicode repair nor whitespace normalisation in ours (datatrove
has none by default); ``on`` runs ours as shipped and gives datatrove the same steps (its
FTFYFormatter with our ftfy settings, then our whitespace normaliser as a formatter). Language ID
and PII are off on both (datatrove's LanguageFilter needs a fastText download). Both sides split
words on whitespace and sentences with the same regex (datatrove's English tokenizer needs spaCy),
so decisions can be compared: the script prints on how many documents they agree. For MinHash
the comparison is per duplicate cluster (datatrove keeps the copy its union-find happens to make
root, we keep the first in file order), so both are canonicalised to "keep the first".

Times include reading and writing, not interpreter or Ray start-up: one warm-up run per side is
not timed, then ``--repeats`` alternating runs; medians are printed. Peak memory is the largest
summed RSS of this process and all its descendants (Ray workers). The machine may be shared, so
compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

# Gopher's published minimums (Rae et al. 2021), which are also datatrove's defaults; the project's
# own defaults are lower for docstring corpora.
GOPHER_MIN_WORDS = 50
GOPHER_MIN_STOP_WORDS = 2


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


def data_config(corpus: Path, mode: str, repair: bool) -> dict:
    filters = mode == "filters"
    return {
        "inputs": [str(corpus)],
        "unicode_repair": repair,
        "normalize_whitespace": repair,
        "language": {"enabled": False},
        "gopher_quality": {"enabled": filters, "min_words": GOPHER_MIN_WORDS, "min_stop_words": GOPHER_MIN_STOP_WORDS},
        "gopher_repetition": {"enabled": filters},
        "c4": {"enabled": filters},
        "fineweb": {"enabled": filters},
        "boilerplate": {"enabled": False},  # datatrove has none; bench/clean/boilerplate.py prices it
        "pii": {"entities": []},
        "exact_dedup": False,
        "minhash_dedup": not filters,
        "max_chars": 10_000_000,
    }


def run_ours(corpus: Path, work: Path, cores: int, mode: str, repair: bool, name: str, **data: object) -> tuple[float, dict]:
    import pyarrow.parquet as pq

    from data_prep.clean import clean_corpus
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.config import build_config

    data_cfg = {**data_config(corpus, mode, repair), **data}
    cfg = build_config({"data": data_cfg, "runtime": {"runs_root": str(work), "run_name": name, "num_cpus": cores}})
    start = time.perf_counter()
    res = clean_corpus(cfg, RunPaths(cfg.run_dir()), force=True)
    elapsed = time.perf_counter() - start
    dropped = pq.read_table(RunPaths(cfg.run_dir()).clean / "dropped.parquet").to_pydict()
    shutil.rmtree(cfg.run_dir(), ignore_errors=True)
    return elapsed, {"kept": res.kept, "dropped_ids": set(dropped["id"])}


def _xxhash64_str(data) -> int:
    # datatrove 0.10.1's default shingle hash passes str to xxhash, which xxhash 4.x refuses;
    # the same hash of the UTF-8 bytes (defined here so datatrove's workers unpickle it by value).
    import xxhash

    return xxhash.xxh64_intdigest(data.encode("utf-8") if isinstance(data, str) else data)


def _corpus_ids(corpus: Path) -> list[list[str]]:
    return [[json.loads(x)["id"] for x in f.read_text().splitlines() if x] for f in sorted(corpus.glob("*.jsonl"))]


def _canonical_minhash_drops(remove_dir: Path, ids: list[list[str]]) -> set[str]:
    """Every member of a datatrove duplicate cluster except its first (file, line)."""
    clusters: dict[int, list[tuple[int, int]]] = {}
    for f in remove_dir.glob("*.clusters"):
        file_id = int(f.name.split(".")[0])
        data = f.read_bytes()
        for doc, cid in struct.iter_unpack("<2I", data):
            clusters.setdefault(cid, []).append((file_id, doc))
    out = set()
    for members in clusters.values():
        for file_id, doc in sorted(members)[1:]:
            out.add(ids[file_id][doc])
    return out


def regex_word_tokenizer():
    """A datatrove word tokenizer with whitespace words and regex sentences: what this project's
    filters use (datatrove's English tokenizer needs spaCy)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    from data_prep.filters.c4 import SENTENCE_PATTERN

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [s.strip() for s in SENTENCE_PATTERN.findall(text)]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in SENTENCE_PATTERN.finditer(text)]

    return Whitespace()


def run_datatrove(corpus: Path, work: Path, cores: int, mode: str, repair: bool, name: str) -> tuple[float, dict]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.formatters import FTFYFormatter
    from datatrove.pipeline.formatters.base import BaseFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    from pretrain_pipeline.config import DataConfig

    class WhitespaceFormatter(BaseFormatter):
        """This project's whitespace normalisation, as a datatrove formatter."""

        name = "whitespace"

        def format(self, text: str) -> str:
            from data_prep.cleaner import normalize_whitespace

            return normalize_whitespace(text)

    cfg = DataConfig(**data_config(corpus, mode, repair))
    rep, quality, c4, fw = cfg.gopher_repetition, cfg.gopher_quality, cfg.c4, cfg.fineweb
    tok = regex_word_tokenizer()
    n_files = len(list(corpus.glob("*.jsonl")))
    reader = JsonlReader(str(corpus), glob_pattern="*.jsonl")
    repair_steps = [FTFYFormatter(normalization="NFC", fix_line_breaks=True), WhitespaceFormatter()] if repair else []
    out = work / f"dt-{name}"
    start = time.perf_counter()
    if mode == "filters":
        from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

        def removed(tag: str) -> JsonlWriter:
            return JsonlWriter(str(out / "removed"), output_filename="${rank}-" + tag + ".jsonl")

        pipeline = [
            reader,
            *repair_steps,
            GopherRepetitionFilter(
                dup_line_frac=rep.dup_line_frac, dup_para_frac=rep.dup_para_frac,
                dup_line_char_frac=rep.dup_line_char_frac, dup_para_char_frac=rep.dup_para_char_frac,
                top_n_grams=tuple(sorted(rep.top_n_grams.items())), dup_n_grams=tuple(sorted(rep.dup_n_grams.items())),
                language=tok, exclusion_writer=removed("rep"),
            ),
            GopherQualityFilter(
                min_doc_words=quality.min_words, max_doc_words=quality.max_words, min_avg_word_length=quality.min_mean_word_length,
                max_avg_word_length=quality.max_mean_word_length, max_symbol_word_ratio=quality.max_symbol_to_word_ratio,
                max_bullet_lines_ratio=quality.max_bullet_lines_ratio, max_ellipsis_lines_ratio=quality.max_ellipsis_lines_ratio,
                max_non_alpha_words_ratio=quality.min_alpha_word_fraction, min_stop_words=quality.min_stop_words,
                language=tok, exclusion_writer=removed("q"),
            ),
            C4QualityFilter(
                min_words_per_line=c4.min_words_per_line, min_num_sentences=c4.min_sentences, max_word_length=c4.max_word_length,
                language=tok, exclusion_writer=removed("c4"),
            ),
            FineWebQualityFilter(
                line_punct_thr=fw.line_punct_ratio, short_line_thr=fw.short_line_ratio,
                short_line_length=fw.short_line_chars, char_duplicates_ratio=fw.char_duplicates_ratio,
                new_line_ratio=fw.new_line_ratio, language=tok, exclusion_writer=removed("fw"),
            ),
            JsonlWriter(str(out / "kept")),
        ]
        LocalPipelineExecutor(pipeline, tasks=n_files, workers=cores, logging_dir=str(out / "logs")).run()
        elapsed = time.perf_counter() - start
        dropped: set[str] = set()
        for f in (out / "removed").rglob("*"):
            if f.is_file():
                data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
                dropped.update(json.loads(x)["id"] for x in data.decode().splitlines() if x)
    else:
        from datatrove.pipeline.dedup.minhash import (
            MinhashConfig,
            MinhashDedupBuckets,
            MinhashDedupCluster,
            MinhashDedupFilter,
            MinhashDedupSignature,
        )

        mc = MinhashConfig(n_grams=cfg.minhash_ngram, num_buckets=cfg.minhash_bands, hashes_per_bucket=cfg.minhash_rows, seed=cfg.minhash_seed)
        sig = MinhashDedupSignature(str(out / "sigs"), config=mc, language=tok)
        sig._hash_func = _xxhash64_str
        LocalPipelineExecutor([reader, *repair_steps, sig], tasks=n_files, workers=cores, logging_dir=str(out / "l1")).run()
        LocalPipelineExecutor([MinhashDedupBuckets(str(out / "sigs"), str(out / "buckets"), config=mc)], tasks=mc.num_buckets, workers=cores, logging_dir=str(out / "l2")).run()
        LocalPipelineExecutor([MinhashDedupCluster(str(out / "buckets"), str(out / "remove"), config=mc, save_cluster_id=True)], tasks=1, logging_dir=str(out / "l3")).run()
        LocalPipelineExecutor(
            [reader, *repair_steps, MinhashDedupFilter(str(out / "remove"), exclusion_writer=JsonlWriter(str(out / "removed"))), JsonlWriter(str(out / "kept"))],
            tasks=n_files, workers=cores, logging_dir=str(out / "l4"),
        ).run()
        elapsed = time.perf_counter() - start
        dropped = _canonical_minhash_drops(out / "remove", _corpus_ids(corpus))
    shutil.rmtree(out, ignore_errors=True)
    return elapsed, {"dropped_ids": dropped}


def _quiet_datatrove() -> None:
    from datatrove.utils.logging import logger

    logger.remove()
    logger.add(sys.stderr, level="WARNING")


def compare(args, tmp: Path, repair: bool) -> None:
    corpus = tmp / "corpus"
    if not corpus.exists():
        make_corpus(corpus, args.docs, args.files)
    label = "on (both repair)" if repair else "off (neither repairs)"
    # Warm-up, not timed: Ray workers import the project, datatrove's pool starts.
    run_ours(corpus, tmp / "runs", args.cores, args.mode, repair, "warm")
    run_datatrove(corpus, tmp / "dt", args.cores, args.mode, repair, "warm")
    t_ours, t_dt, ratios = [], [], []
    for i in range(args.repeats):
        a, ours = run_ours(corpus, tmp / "runs", args.cores, args.mode, repair, f"r{i}")
        b, dt = run_datatrove(corpus, tmp / "dt", args.cores, args.mode, repair, f"r{i}")
        t_ours.append(a)
        t_dt.append(b)
        ratios.append(b / a)
    agree = 1 - len(ours["dropped_ids"] ^ dt["dropped_ids"]) / args.docs
    mo, md = statistics.median(t_ours), statistics.median(t_dt)
    print(f"mode={args.mode} repair={label} docs={args.docs} files={args.files} cores={args.cores} repeats={args.repeats}")
    print(f"  ours:      median {mo:7.2f}s {args.docs / mo:8.0f} docs/s  dropped {len(ours['dropped_ids'])}   runs {' '.join(f'{t:.2f}' for t in t_ours)}")
    print(f"  datatrove: median {md:7.2f}s {args.docs / md:8.0f} docs/s  dropped {len(dt['dropped_ids'])}   runs {' '.join(f'{t:.2f}' for t in t_dt)}")
    print(f"  ratio (ours/datatrove throughput): median {statistics.median(ratios):.2f}x (per run {' '.join(f'{r:.2f}' for r in ratios)})"
          f"   same decision on {agree:.2%} of documents", flush=True)


def scale(args, tmp: Path) -> None:
    rows = []
    for factor in (1, 4):
        corpus = make_corpus(tmp / f"corpus{factor}", args.docs * factor, args.files * factor)
        for m in ("filters", "minhash"):
            run_ours(corpus, tmp / f"runs{factor}", args.cores, m, True, "warm")
            times, peaks = [], []
            for i in range(args.repeats):
                with _PeakRSS() as mem:
                    t, _ = run_ours(corpus, tmp / f"runs{factor}", args.cores, m, True, f"r{i}")
                times.append(t)
                peaks.append(mem.peak)
            rows.append((m, factor, statistics.median(times), statistics.median(peaks)))
    for m in ("filters", "minhash"):
        (_, _, t1, m1), (_, _, t4, m4) = [r for r in rows if r[0] == m]
        print(f"scale {m}: 1x {args.docs} docs {t1:.2f}s peak {m1 / 2**20:.0f} MiB | 4x {t4:.2f}s peak {m4 / 2**20:.0f} MiB"
              f" | time x{t4 / t1:.2f}, memory x{m4 / m1:.2f}  (medians of {args.repeats})")


def split(args, tmp: Path) -> None:
    """One big jsonl file (the filters mode's corpus in one file): one task for the whole file
    vs the file cut into 2 parts per core (``data.clean_task_mb``)."""
    corpus = make_corpus(tmp / "corpus", args.docs, 1)
    size_mb = next(corpus.glob("*.jsonl")).stat().st_size / 2**20
    sides = {"whole": {"clean_task_mb": 2 * size_mb}, "parts": {"clean_task_mb": size_mb / (2 * args.cores) * 1.01}}
    times: dict[str, list[float]] = {k: [] for k in sides}
    for i in range(args.repeats + 1):  # the first round warms up
        for side, data in sides.items():
            t, _ = run_ours(corpus, tmp / "runs", args.cores, "filters", True, f"{side}{i}", **data)
            if i:
                times[side].append(t)
    mw, mp = statistics.median(times["whole"]), statistics.median(times["parts"])
    print(f"split: one file of {size_mb:.1f} MiB, {args.docs} docs, {args.cores} cores: whole-file task median {mw:.2f}s, "
          f"{2 * args.cores} parts median {mp:.2f}s, speed-up x{mw / mp:.2f}  (medians of {args.repeats})")


def _cpu_by_process() -> dict[int, float]:
    """CPU seconds so far of this process and of each descendant (the Ray workers), by pid."""
    seconds = {}
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = p.cpu_times()
            seconds[p.pid] = times.user + times.system
        except psutil.Error:
            pass
    return seconds


def _spread(before: dict[int, float], after: dict[int, float]) -> tuple[float, int]:
    """(CPU seconds used, processes that each did at least a fifth of it): how many cores had work,
    whatever else the machine was running at the time."""
    used = {pid: t - before.get(pid, 0.0) for pid, t in after.items()}
    total = sum(used.values())
    return total, sum(1 for t in used.values() if t >= 0.2 * total)


def onefile(args, tmp: Path) -> None:
    """The filters mode's corpus as one .jsonl.gz: one task for the whole file (``clean_batch_mb: 0``,
    the only way before streaming) vs the driver reading it once and its line batches cleaned on
    every core. Besides the wall time it prints how many processes did at least a fifth of the
    CPU work (the driver and the Ray workers): on a shared machine that, not the time, shows
    whether both cores had work."""
    corpus = make_corpus(tmp / "corpus", args.docs, 1)
    plain = next(corpus.glob("*.jsonl"))
    packed = plain.with_name(plain.name + ".gz")
    packed.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=6))
    raw_mb, gz_mb = plain.stat().st_size / 2**20, packed.stat().st_size / 2**20
    plain.unlink()
    sides = {"one task": {"clean_batch_mb": 0}, "streamed": {}}
    times: dict[str, list[float]] = {k: [] for k in sides}
    workers: dict[str, list[int]] = {k: [] for k in sides}
    for i in range(args.repeats + 1):  # the first round warms up
        for side, data in sides.items():
            cpu = _cpu_by_process()
            t, _ = run_ours(corpus, tmp / "runs", args.cores, "filters", True, f"{side.replace(' ', '')}{i}", **data)
            if i:
                used, busy = _spread(cpu, _cpu_by_process())
                times[side].append(t)
                workers[side].append(busy)
                print(f"  {side}: {t:.2f}s wall, {used:.1f} CPU s ({used / t:.2f} cores on average), "
                      f"{busy} processes with >= 1/5 of it", flush=True)
    t1, ts = statistics.median(times["one task"]), statistics.median(times["streamed"])
    print(f"onefile: one .jsonl.gz of {gz_mb:.1f} MiB ({raw_mb:.1f} MiB of jsonl), {args.docs} docs, {args.cores} cores: "
          f"one task median {t1:.2f}s ({min(workers['one task'])}-{max(workers['one task'])} busy processes), "
          f"streamed median {ts:.2f}s ({min(workers['streamed'])}-{max(workers['streamed'])} busy processes), "
          f"speed-up x{t1 / ts:.2f}  (medians of {args.repeats})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["filters", "minhash", "scale", "split", "onefile"], default="filters")
    ap.add_argument("--docs", type=int, default=8000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repair", choices=["off", "on", "both"], default="both", help="see the module docstring")
    args = ap.parse_args()
    os.environ.setdefault("PRETRAIN_PIPELINE_QUIET", "1")
    tmp = Path(tempfile.mkdtemp(prefix="bench-clean-"))
    os.environ.setdefault("PRETRAIN_PIPELINE_STATE", str(tmp / "state"))
    from data_prep.ray_runtime import ray_session
    from pretrain_pipeline.config import RuntimeConfig

    try:
        with ray_session(RuntimeConfig(num_cpus=args.cores)):
            if args.mode in ("scale", "split", "onefile"):
                {"scale": scale, "split": split, "onefile": onefile}[args.mode](args, tmp)
                return
            _quiet_datatrove()
            for repair in {"off": [False], "on": [True], "both": [False, True]}[args.repair]:
                compare(args, tmp, repair)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
