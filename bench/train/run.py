"""Training benchmark: our trainer vs a plain PyTorch loop, and per-rank memory for ZeRO 0-3.

    .venv/bin/python bench/train/run.py                  # make bench-train
    .venv/bin/python bench/train/run.py --steps 200 --repeat 2 --wandb disabled

The same tiny GPT (4 layers, 128 wide, block 128, on synthetic shards from
``tests/synthetic.py``) for the same steps, micro-batch and seed, in the same run:

* ours:  ``pretrain.launch.launch_training`` (the real launcher: torchrun, ``pretrain.trainer`` ranks, the
  DeepSpeed engine, per-step collectives, metrics.jsonl and W&B offline), ZeRO-1 and ZeRO-3, at 1
  and 2 ranks. At 1 rank an fp32 ZeRO-1/3 config runs as ZeRO-0 (``pretrain.engine.effective_zero_stage``:
  nothing to partition); the rows "ZeRO-1 kept" and "ZeRO-3 kept" time DeepSpeed's real stages on
  one rank (``train.zero.keep_stage_on_one_rank``) for reference;
* plain: ``bench/train/plain.py``: GPT, AdamW, clipping and the same loader in a bare loop (DDP
  over gloo for 2 ranks), started with the environment ``pretrain.launch.build_env`` gives the
  ranks, so the thread count (``OMP_NUM_THREADS``) is the same.

Throughput is steady state: both sides time windows of ``--log-every`` steps the same way
(``train/tokens_per_s`` in metrics.jsonl), and only windows after the first ``--warmup`` steps
count, so process start-up, DeepSpeed set-up and first-step allocation are outside the clock.
Printed: tokens/s (all ranks) and the ratio to the plain loop at the same rank count; target at
1 rank on CPU >= 0.95. The cases are interleaved ``--repeat`` times (default 3: this machine's
runs of one case spread by 5-12%) and each keeps its best.

``--device cuda`` instead times our trainer on the machine's GPUs with the gpt2-124m shape (bf16,
ZeRO-1, block 1024, vocabulary padded to 50,304 as GPT-2's; synthetic shards) and prints steady
tokens/s and MFU (``train/mfu``: model FLOPs over the GPUs' bf16 dense peak, ``pretrain.plan``).

Then ``bench/train/memory.py`` builds the real engines for ZeRO 0/1/2/3 at 2 ranks and prints the
bytes each rank holds for weights, gradients, the fp32 master copy and Adam's moments, next to
``pretrain-pipeline plan``'s estimate, and the ratio to ZeRO-0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

MiB = 1024**2


def make_cfg(root: Path, zero: int, nproc: int, args: argparse.Namespace, keep_stage: bool = False,
             precision: str = "fp32"):
    from pretrain_pipeline.config import build_config

    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": args.vocab},
            "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128, "dropout": 0.0},
            "train": {
                "micro_batch_size": args.micro_batch, "grad_accum_steps": 1, "max_steps": args.steps,
                "log_every": args.log_every, "device": "cpu", "precision": precision,
                "zero": {"stage": zero, "keep_stage_on_one_rank": keep_stage},
                "launch": {"nproc_per_node": nproc},
                "optimizer": {"lr": 1e-3},
                "schedule": {"warmup_steps": 5, "min_lr": 1e-4},
                "validation": {"every": 10**6, "batches": 1},
                "checkpoint": {"every": 10**6, "keep_last": 1},
            },
            "tracking": {"wandb_mode": args.wandb},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


def new_run(work: Path, data: Path, name: str):
    from pretrain_pipeline.artifacts import RunPaths

    paths = RunPaths(work / name)
    if paths.root.exists():
        shutil.rmtree(paths.root)
    for sub in ("tokenizer", "shards"):
        shutil.copytree(data / sub, paths.root / sub)
    return paths


def steady_tokens_per_s(records: list[dict], warmup: int, log_every: int) -> tuple[float, float]:
    """(overall, fastest window) tokens/s over the full ``log_every``-step windows that start after
    ``warmup`` steps. Windows hold equal tokens, so the overall rate is their harmonic mean; the
    fastest window is the steadier figure on a machine shared with other work."""
    rates = [r["train/tokens_per_s"] for r in records
             if r.get("train/tokens_per_s") and r["step"] % log_every == 0 and r["step"] - log_every >= warmup]
    if not rates:
        raise RuntimeError(f"no timed window after step {warmup}: raise --steps")
    return len(rates) / sum(1.0 / r for r in rates), max(rates)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_ours(work: Path, data: Path, zero: int, nproc: int, args, keep_stage: bool = False) -> tuple[float, float]:
    from pretrain.launch import launch_training

    paths = new_run(work, data, f"ours-z{zero}{'k' if keep_stage else ''}-n{nproc}")
    cfg = make_cfg(paths.root, zero, nproc, args, keep_stage)
    log = open(work / f"{paths.root.name}.log", "w")
    launch_training(cfg, paths, force=True, log=lambda line: log.write(line + "\n"))
    log.close()
    return steady_tokens_per_s(read_jsonl(paths.metrics), args.warmup, args.log_every)


def run_plain(work: Path, data: Path, nproc: int, args) -> tuple[float, float]:
    from pretrain.launch import build_env
    from pretrain_pipeline.config import dump_config

    paths = new_run(work, data, f"plain-n{nproc}")
    cfg = make_cfg(paths.root, 0, nproc, args)
    paths.config.write_text(dump_config(cfg))
    out = paths.root / "plain.jsonl"
    script = [str(ROOT / "bench" / "train" / "plain.py"), "--run-dir", str(paths.root), "--out", str(out)]
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    with open(work / f"{paths.root.name}.log", "w") as log:
        subprocess.run(launcher + script, env=build_env(cfg), cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return steady_tokens_per_s(read_jsonl(out), args.warmup, args.log_every)


def run_memory(work: Path, data: Path, args, precision: str) -> list[dict]:
    from pretrain.launch import build_env
    from pretrain_pipeline.config import dump_config

    paths = new_run(work, data, f"memory-{precision}")
    cfg = make_cfg(paths.root, 0, 2, args, precision=precision)
    paths.config.write_text(dump_config(cfg))
    out = paths.root / "memory.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "bench" / "train" / "memory.py"), "--run-dir", str(paths.root), "--out", str(out),
           "--persistence-threshold", str(10 * cfg.model.n_embd)]
    with open(work / f"memory-{precision}.log", "w") as log:
        subprocess.run(cmd, env=build_env(cfg), cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
    return read_jsonl(out), cfg


def print_memory(records: list[dict], cfg, vocab_size: int) -> None:
    from pretrain.plan import make_plan
    from pretrain_pipeline.config import build_config

    cols = ("weights", "grads", "master", "adam", "other", "total")
    print(f"\nper-rank parameter + gradient + optimizer memory at 2 ranks, {cfg.train.precision}, MiB "
          f"({records[0]['params']:,} params; measured from the engines after backward)")
    print(f"{'case':<24}{'rank':>5}" + "".join(f"{c:>9}" for c in cols) + f"{'plan':>9}{'vs ZeRO-0':>11}")
    base = max(r["total"] for r in records[0]["per_rank"])
    for rec in records:
        plan = make_plan(build_config(cfg.model_dump(), [f"train.zero.stage={rec['stage']}"]), vocab_size, 2)
        plan_mib = (plan.weights_gb + plan.grads_gb + plan.optimizer_gb) * 1024
        for rank, held in enumerate(rec["per_rank"]):
            row = "".join(f"{held.get(c, 0) / MiB:>9.2f}" for c in cols)
            print(f"{rec['case'] if rank == 0 else '':<24}{rank:>5}{row}{plan_mib:>9.2f}{held['total'] / base:>10.2f}x")
        kept = rec["per_rank"][0]["persistent_params"]
        if rec["stage"] == 3 and kept:
            print(f"{'':<29}({kept} parameter tensors kept whole on every rank: "
                  "below stage3_param_persistence_threshold)")


def run_cuda(work: Path, data: Path, args) -> None:
    """Our trainer on every visible GPU with the gpt2-124m shape: steady tokens/s and MFU."""
    import torch

    from pretrain.launch import launch_training
    from pretrain.plan import planned_peak
    from pretrain_pipeline.config import build_config

    gpus = torch.cuda.device_count()
    paths = new_run(work, data, f"cuda-gpt2-124m-n{gpus}")
    cfg = make_cfg(paths.root, 1, gpus, args, precision="bf16").model_dump()
    cfg["model"] = {"preset": "gpt2-124m", "vocab_size": 50304, "dropout": 0.0}
    cfg["train"]["device"] = "cuda"
    cfg["train"]["plan"]["peak_tflops"] = args.peak_tflops
    cfg = build_config(cfg)
    with open(work / f"{paths.root.name}.log", "w") as log:
        launch_training(cfg, paths, force=True, log=lambda line: log.write(line + "\n"))
    records = read_jsonl(paths.metrics)
    rate, fastest = steady_tokens_per_s(records, args.warmup, args.log_every)
    timed = [r["train/mfu"] for r in records if r.get("train/mfu") and r["step"] - args.log_every >= args.warmup]
    peak, _ = planned_peak(cfg.train)
    peak_note = f"{peak / 1e12:g} TFLOP/s bf16 dense peak each" if peak else "peak FLOP/s unknown: set --peak-tflops"
    print(f"gpt2-124m, block 1024, bf16, ZeRO-1, micro-batch {args.micro_batch}, {gpus} x {torch.cuda.get_device_name()} "
          f"({peak_note}), steps {args.warmup + 1}-{args.steps}:")
    mfu_note = f"; MFU {sum(timed) / len(timed):.1%} (fastest window {max(timed):.1%})" if timed else ""
    print(f"  {rate:,.0f} tokens/s (fastest window {fastest:,.0f}){mfu_note}")


def stage_case(spec: str) -> str:
    return f"ZeRO-{spec[0]}" + (" kept" if spec.endswith("keep") else "")


def main() -> None:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=20, help="steps left out of the timed windows")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--stages", default="1,3,1keep,3keep",
                    help="ZeRO stages of our trainer to time; 'Nkeep' keeps stage N on one rank "
                    "(train.zero.keep_stage_on_one_rank), timed at 1 rank only, for reference")
    ap.add_argument("--wandb", choices=["offline", "disabled"], default="offline")
    ap.add_argument("--threads", type=int, default=0,
                    help="OMP_NUM_THREADS per rank for both sides (default: what pretrain.launch.build_env picks)")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="--device cuda: per-GPU peak for MFU (default: by GPU name, A100/H100/H200)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: our trainer on this machine's GPUs with the gpt2-124m shape, tokens/s and MFU")
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)")
    args = ap.parse_args()
    if args.threads:  # build_env keeps it, so both sides run with it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("PRETRAIN_PIPELINE_STATE", str(ROOT / ".state"))

    from tests.synthetic import make_synthetic_run

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")

    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-train-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "shards" / "manifest.json").exists():
        make_synthetic_run(data, n_train_docs=3000, n_val_docs=100, vocab_size=args.vocab)
    if args.device == "cuda":
        run_cuda(work, data, args)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        return
    ranks = [int(r) for r in args.ranks.split(",")]
    stages = [s.strip() for s in args.stages.split(",")]  # "3" or "3keep"
    best: dict[tuple[str, int], float] = {}  # overall steady-state rate, best of the repeats
    peak: dict[tuple[str, int], float] = {}  # fastest single window over all repeats
    for _ in range(args.repeat):
        for n in ranks:
            cases = [("plain", n, lambda n=n: run_plain(work, data, n, args))]
            cases += [(stage_case(z), n, lambda z=z, n=n: run_ours(work, data, int(z[0]), n, args, z.endswith("keep")))
                      for z in stages if n == 1 or not z.endswith("keep")]
            for name, n_, fn in cases:
                rate, fastest = fn()
                best[(name, n_)] = max(best.get((name, n_), 0.0), rate)
                peak[(name, n_)] = max(peak.get((name, n_), 0.0), fastest)
                print(f"  {name:<8} ranks {n_}: {rate:,.0f} tokens/s (fastest window {fastest:,.0f})", flush=True)

    from pretrain.engine import effective_zero_stage
    from pretrain.launch import build_env

    threads = {n: build_env(make_cfg(work / "x", 0, n, args))["OMP_NUM_THREADS"] for n in ranks}
    print(f"\ntiny GPT 4x128, block 128, vocab {args.vocab}, micro-batch {args.micro_batch}, {args.steps} steps "
          f"(timed: steps {args.warmup + 1}-{args.steps} in windows of {args.log_every}), fp32 CPU, "
          f"W&B {args.wandb}, best of {args.repeat}")
    print(f"{'case':<28}{'ranks':>6}{'threads/rank':>14}{'tokens/s':>11}{'vs plain':>10}"
          f"{'fastest window':>16}{'vs plain':>10}")
    for n in ranks:
        plain, plain_peak = best[("plain", n)], peak[("plain", n)]
        label = "plain PyTorch loop" if n == 1 else "plain PyTorch DDP loop"
        print(f"{label:<28}{n:>6}{threads[n]:>14}{plain:>11,.0f}{1.0:>9.2f}x{plain_peak:>16,.0f}{1.0:>9.2f}x")
        for z in stages:
            if (stage_case(z), n) not in best:
                continue
            rate, fastest = best[(stage_case(z), n)], peak[(stage_case(z), n)]
            actual = effective_zero_stage(make_cfg(work / "x", int(z[0]), n, args, z.endswith("keep")).train, n)
            runs_as = f" (runs as {actual})" if actual != int(z[0]) else ""
            print(f"{'ours ' + stage_case(z) + runs_as:<28}{n:>6}{threads[n]:>14}{rate:>11,.0f}{rate / plain:>9.2f}x"
                  f"{fastest:>16,.0f}{fastest / plain_peak:>9.2f}x")
    timed = [z for z in stages if not z.endswith("keep")]
    if 1 in ranks and timed:
        worst = min(best[(stage_case(z), 1)] / best[("plain", 1)] for z in timed)
        print(f"target at 1 rank: >= 0.95x the plain loop: {'met' if worst >= 0.95 else 'NOT met'} ({worst:.3f}x, "
              f"worst of {', '.join(stage_case(z) for z in timed)} as launched; 'kept' rows are for reference)")

    if not args.no_memory:
        from pretrain.data import load_manifest

        # fp32 as timed above; bf16 as GPU runs train (2-byte weights and gradients, fp32 master).
        for precision in ("fp32", "bf16"):
            records, cfg = run_memory(work, data, args, precision)
            print_memory(records, cfg, load_manifest(data / "shards").vocab_size)
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nlogs and runs kept in {work}")


if __name__ == "__main__":
    main()
