"""One training rank: ``python -m torch.distributed.run ... -m pretrain.train --run-dir runs/<name>``.

Started by ``pretrain.launch`` (torchrun or the deepspeed launcher), never by plain python: the
rank, world size and rendezvous come from the launcher's environment.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from pretrain.checkpoint import latest_tag, load_checkpoint, rng_state, save_checkpoint, set_rng_state, tag_for
from pretrain.data import DataIntegrityError, MixtureDataset, ShardDataset, build_train_loader, load_manifest
from pretrain.distributed import init_distributed
from pretrain.model import GPT, resolve_vocab_size
from pretrain_pipeline.artifacts import RunPaths, atomic_write_json
from pretrain_pipeline.config import PipelineConfig, load_config

EXIT_PREEMPTED = 143  # 128 + SIGTERM: saved and stopped early, not finished
EXIT_NONFINITE = 4  # NaN/inf loss (train.nonfinite_loss): stopped without saving the bad state

# Fault injection for the reliability tests: comma-separated micro-batch indices (0-based, counted
# from this process's start) at which rank 0's loss is replaced by NaN before the policy check, or
# (the _GRAD_ variable) keeps a finite loss whose backward gives NaN gradients.
FAULT_NONFINITE_ENV = "PRETRAIN_FAULT_NONFINITE_MICROBATCHES"
FAULT_NONFINITE_GRAD_ENV = "PRETRAIN_FAULT_NONFINITE_GRAD_MICROBATCHES"


def injected_nonfinite(rank: int, env: str = FAULT_NONFINITE_ENV) -> set[int]:
    raw = os.environ.get(env, "")
    return {int(v) for v in raw.split(",") if v.strip()} if rank == 0 else set()


class _NaNGradient(torch.autograd.Function):
    """The identity forward, NaN backward: a finite loss whose gradients are not (fault injection)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def nonfinite_failure(tc, skipped: int, paths: RunPaths, what: str) -> str | None:
    """The message that stops the run after a non-finite loss or gradients, or None to skip on
    (``train.nonfinite_loss: skip`` with ``skipped`` still within ``train.max_skipped_batches``)."""
    if tc.nonfinite_loss == "skip" and skipped <= tc.max_skipped_batches:
        return None
    why = ("train.nonfinite_loss=stop" if tc.nonfinite_loss == "stop"
           else f"{skipped} skipped micro-batches > train.max_skipped_batches={tc.max_skipped_batches}")
    return (
        f"{what}; stopped without saving ({why}); latest checkpoint "
        f"{latest_tag(paths.checkpoints) or '(none)'} is the last good state. "
        "Lower train.lr, raise train.warmup_steps or set train.grad_clip."
    )


def resume_refusal(state: dict[str, Any], zero_stage: int, world: int) -> str | None:
    """Why a checkpoint (its client state) cannot resume on ``zero_stage`` x ``world`` ranks, or None.

    DeepSpeed lays out optimizer state per stage, and under ZeRO per rank: it cannot read another
    stage's files or re-partition ZeRO state for a new world size, and fails deep inside its loader
    (a ZeRO-0 engine given a ZeRO checkpoint finds its optimizer state missing). ZeRO-0 state is
    whole, so it resumes on any world size. Checkpoints from before the stage was recorded are
    judged by their files (``pretrain.checkpoint.zero_stages_of``).
    """
    stages = [state["zero_stage"]] if "zero_stage" in state else state.get("zero_stages_from_files", [])
    saved_world = state.get("world_size", len(state.get("rng", [])))
    if not stages or (zero_stage in stages and (zero_stage == 0 or saved_world == world)):
        return None
    return f"was written by {saved_world} rank(s) running ZeRO-{'/'.join(map(str, stages))}"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible")
    return device


def memory_metrics(device: str) -> dict[str, float]:
    """Peak memory this rank has used: CUDA allocator peak on GPU, process max RSS on CPU."""
    if device.startswith("cuda"):
        return {
            "memory/max_allocated_gb": torch.cuda.max_memory_allocated() / 1024**3,
            "memory/max_reserved_gb": torch.cuda.max_memory_reserved() / 1024**3,
        }
    import resource

    return {"memory/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}  # KiB on Linux


class StopFlag:
    """Set by SIGTERM/SIGINT; checked between steps so a checkpoint is never half-taken."""

    def __init__(self) -> None:
        self.requested = False
        # Ray Train runs the training function in a worker thread, where Python cannot install
        # handlers; there a lost worker is restarted from the last checkpoint instead.
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def all_mean(value: float, device: str) -> float:
    if dist.get_world_size() == 1:  # a collective with no peers still costs a dispatch per call
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def any_rank(flag: bool, device: str) -> bool:
    if dist.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def step_consensus(local_loss: float, stop_requested: bool, device: str) -> tuple[float, bool]:
    """The step's mean loss over ranks and whether any rank was asked to stop, in one all-reduce."""
    world = dist.get_world_size()
    if world == 1:
        return local_loss, stop_requested
    t = torch.tensor([local_loss, 1.0 if stop_requested else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t[0]) / world, bool(t[1] > 0)


@torch.no_grad()
def validate(engine, val: ShardDataset, n_batches: int, device: str) -> float:
    engine.eval()
    total, count = 0.0, 0
    for x, y in val.eval_batches(n_batches):
        _, loss = engine(x.to(device), y.to(device))
        total, count = total + float(loss), count + 1
    engine.train()
    return all_mean(total / max(count, 1), device)


def run(cfg: PipelineConfig, paths: RunPaths) -> int:
    device = resolve_device(cfg.train.device)
    init_distributed("gloo" if device == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    tc = cfg.train
    stop = StopFlag()

    manifest = load_manifest(paths.shards)
    vocab_size = resolve_vocab_size(cfg.model, manifest.vocab_size)
    # Same seed on every rank for identical initial weights; per-rank seeds afterwards (dropout).
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model, vocab_size)
    random.seed(tc.seed + rank)
    np.random.seed(tc.seed + rank)
    torch.manual_seed(tc.seed + rank)

    # Only rank 0 re-hashes the shards; the others wait for its verdict instead of reading twice.
    if rank == 0:
        manifest.verify()
        if tc.data_mixture:  # and every mixture source's shards and tokenizer against its manifest
            build_train_loader(cfg, paths, rank, world, verify=True)
    dist.barrier()
    # This run's shards, or the weighted mixture of train.data_mixture (its state carries the weights).
    train_data = build_train_loader(cfg, paths, rank, world, verify=False)
    if isinstance(train_data, MixtureDataset):
        foreign = [n for n, src in train_data.sources.items()
                   if src.manifest.raw["tokenizer_sha256"] != manifest.raw["tokenizer_sha256"]]
        if foreign:
            raise DataIntegrityError(
                f"train.data_mixture sources {foreign} were not encoded with {manifest.tokenizer_path} "
                f"(the tokenizer of {manifest.path})"
            )
    # Validation stays on this run's own held-out split, so val/loss is comparable across mixtures.
    val_data = ShardDataset(manifest, "val", cfg.model.block_size, tc.micro_batch_size, rank, world, tc.seed, verify=False)

    from pretrain.engine import build_engine, effective_zero_stage, zero_stage_note

    engine = build_engine(model, tc, world)
    step, tokens_seen, wandb_id = 0, 0, None
    last_loss = float("nan")
    skipped = 0  # micro-batches dropped by train.nonfinite_loss: skip

    zero_stage = effective_zero_stage(tc, world)

    def same_model(state: dict[str, Any]) -> None:  # checked before DeepSpeed reads the weights
        if state.get("model_fingerprint") != cfg.model.fingerprint():
            raise RuntimeError(
                f"{paths.checkpoints} holds checkpoints of a different model config; "
                "set train.resume: never (they are moved aside) or use another run name"
            )
        refused = resume_refusal(state, zero_stage, world)
        if refused:
            raise RuntimeError(
                f"{paths.checkpoints} {refused}; this launch runs ZeRO-{zero_stage_note(tc, world)} on {world} "
                "rank(s), and DeepSpeed cannot read ZeRO optimizer state across stages or world sizes. Resume "
                "with the same ranks and stage, or set train.resume: never (the checkpoints are moved aside) "
                "to start over"
            )

    # The newest tag whose files match its completion record (rank 0 verifies, all ranks load);
    # a damaged newer one is refused by name and the previous complete one is used.
    resumed = None
    if tc.resume == "auto":
        resumed = load_checkpoint(engine, paths.checkpoints, log_line=lambda m: rank == 0 and print(f"[pretrain] {m}", flush=True), check=same_model)
    if resumed:
        resumed_tag, state = resumed
        load_path = paths.checkpoints / resumed_tag
        step, tokens_seen, wandb_id = state["step"], state["tokens_seen"], state.get("wandb_run_id")
        last_loss = state.get("loss", float("nan"))
        skipped = state.get("skipped_batches", 0)
        train_data.load_state_dict(state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        if rank == 0:
            print(f"[pretrain] resumed from {load_path} at step {step}", flush=True)

    tracker = None
    if rank == 0:
        from pretrain.tracking import Tracker

        tracker = Tracker(
            cfg.tracking,
            paths.root,
            config_dict={**cfg.model_dump(mode="json"), "world_size": world, "params": model.num_params()},
            resume_id=wandb_id,
            run_name=cfg.runtime.run_name,
        )
        wandb_id = tracker.run_id
        from pretrain.plan import make_plan

        for line in make_plan(cfg, manifest.vocab_size, world).lines():
            print(f"[pretrain] plan: {line}", flush=True)
        print(
            f"[pretrain] {model.num_params():,} params, world {world}, device {device}, "
            f"zero {zero_stage_note(tc, world)}, {tc.precision}, steps {step}->{tc.max_steps}"
            + (", activation checkpointing" if getattr(model, "activation_checkpointing", False) else "")
            + (", compiled" if engine.is_compiled else ""),
            flush=True,
        )

    from pretrain.plan import mfu, peak_flops

    peak = peak_flops(tc.peak_tflops) if device.startswith("cuda") else (tc.peak_tflops * 1e12 or None)
    flops_per_token = model.flops_per_token()
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * cfg.model.block_size * world
    last_saved = -1

    def save(at_step: int) -> str:
        nonlocal last_saved
        # RNG states differ per rank but only rank 0 writes client state, so gather them first.
        rngs: list[Any] = [None] * world
        dist.all_gather_object(rngs, rng_state())
        tag = tag_for(at_step)
        # Our state goes to its own client_state.pt (tensors and plain data, read back with
        # weights_only=True), not into DeepSpeed's pickles; rank 0 writes it, then the completion record.
        client = {
            "step": at_step,
            "tokens_seen": tokens_seen,
            "data": train_data.state_dict(),
            "rng": rngs,
            "wandb_run_id": wandb_id,
            "vocab_size": vocab_size,
            "model_fingerprint": cfg.model.fingerprint(),
            "loss": last_loss,
            "skipped_batches": skipped,
            "world_size": world,
            "zero_stage": zero_stage,
        }
        save_checkpoint(engine, paths.checkpoints, tag, client, keep=tc.keep_last_checkpoints)
        last_saved = at_step
        return tag

    engine.train()
    t0, window_tokens = time.perf_counter(), 0
    preempted = False
    failure: str | None = None  # set when train.nonfinite_loss stops the run
    inject, drawn = injected_nonfinite(rank), 0
    inject_grad = injected_nonfinite(rank, FAULT_NONFINITE_GRAD_ENV)
    grads_finite = True
    stop_agreed = any_rank(stop.requested, device)  # later steps agree on it with their loss
    while step < tc.max_steps:
        if stop_agreed:
            preempted = True
            break
        lr = engine.set_lr(step)
        loss_sum, good = 0.0, 0
        while good < tc.grad_accum_steps:
            x, y = train_data.next_batch()
            _, loss = engine(x.to(device), y.to(device))
            if drawn in inject:
                loss = loss + float("nan")
            if drawn in inject_grad:
                loss = _NaNGradient.apply(loss)
            drawn += 1
            # Checked on every rank before backward, and agreed by all-reduce: ZeRO reduces gradients
            # inside backward and DeepSpeed counts micro-steps to find the accumulation boundary, so
            # all ranks must skip (or stop on) the same micro-batch.
            if any_rank(not bool(torch.isfinite(loss.detach())), device):
                skipped += 1
                failure = nonfinite_failure(
                    tc, skipped, paths,
                    f"non-finite loss at step {step + 1} (micro-batch {good + 1} of {tc.grad_accum_steps}, lr {lr:.3g})",
                )
                if failure:
                    break
                if rank == 0:
                    print(f"[pretrain] step {step + 1}: non-finite loss, micro-batch skipped "
                          f"({skipped}/{tc.max_skipped_batches})", flush=True)
                continue
            engine.backward(loss)
            # DeepSpeed only updates weights at the accumulation boundary, and not when the
            # gradients there are NaN/inf (a finite loss does not promise finite gradients).
            grads_finite = engine.step()
            loss_sum += float(loss.detach())
            good += 1
        # Every rank sees the same verdict without a collective: the boundary's gradients were
        # all-reduced before the check (ZeRO-0) or DeepSpeed judged their all-reduced norm (ZeRO, bf16).
        if not failure and not grads_finite:
            # The update was not applied, so the weights are still the last good ones: skip the
            # step's micro-batches and redo it with the next ones, or stop, per train.nonfinite_loss.
            skipped += tc.grad_accum_steps
            failure = nonfinite_failure(
                tc, skipped, paths,
                f"non-finite gradients at step {step + 1} (finite loss, lr {lr:.3g}); the update was not applied",
            )
            if not failure and rank == 0:
                print(f"[pretrain] step {step + 1}: non-finite gradients, update not applied, its "
                      f"{tc.grad_accum_steps} micro-batch(es) skipped ({skipped}/{tc.max_skipped_batches})", flush=True)
            if not failure:
                continue
        if failure:
            break
        step += 1
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        last_loss, stop_agreed = step_consensus(loss_sum / tc.grad_accum_steps, stop.requested, device)

        if step % tc.log_every == 0 or step == tc.max_steps or step == 1:
            elapsed = time.perf_counter() - t0
            metrics = {
                "train/loss": last_loss,
                "train/lr": lr,
                "train/grad_norm": engine.grad_norm(),
                "train/tokens_per_s": window_tokens / elapsed if elapsed > 0 else None,
                "train/tokens_seen": tokens_seen,
                "train/skipped_batches": skipped,
                **memory_metrics(device),
            }
            if isinstance(train_data, MixtureDataset):  # realised shares next to the configured weights
                metrics.update({f"data/share/{k}": v for k, v in train_data.realised_proportions().items()})
            if peak and metrics["train/tokens_per_s"]:
                metrics["train/mfu"] = mfu(metrics["train/tokens_per_s"], flops_per_token, world, peak)
            if tracker:
                tracker.log(metrics, step)
                print(f"[pretrain] step {step} loss {last_loss:.4f} lr {lr:.2e}", flush=True)
            t0, window_tokens = time.perf_counter(), 0
        if step % tc.eval_every == 0 or step == tc.max_steps:
            val_loss = validate(engine, val_data, tc.eval_batches, device)
            if tracker:
                tracker.log({"val/loss": val_loss}, step)
                print(f"[pretrain] step {step} val_loss {val_loss:.4f}", flush=True)
        if step % tc.checkpoint_every == 0 and step < tc.max_steps:
            save(step)

    if failure:
        # No save: the bad state must not become the latest checkpoint.
        if rank == 0:
            print(f"[pretrain] error: {failure}", file=sys.stderr, flush=True)
            if tracker:
                tracker.finish(exit_code=EXIT_NONFINITE)
        dist.barrier()
        dist.destroy_process_group()
        return EXIT_NONFINITE
    if step > 0 and last_saved != step:
        save(step)
    tag = latest_tag(paths.checkpoints, verify=False)  # just saved and hashed: sizes suffice
    if rank == 0:
        summary = {
            "final_loss": last_loss,
            "steps": step,
            "max_steps": tc.max_steps,
            "completed": not preempted,
            "tokens_seen": tokens_seen,
            "params": model.num_params(),
            "flops_per_token": model.flops_per_token(),
            "world_size": world,
            "last_checkpoint_tag": tag,
            "checkpoint_dir": str(paths.checkpoints),
            "wandb_run_id": wandb_id,
            "wandb_mode": cfg.tracking.wandb_mode,
            "wandb_dir": tracker.offline_dir if tracker else None,
        }
        if tracker:
            tracker.summary({"final_loss": last_loss, "tokens_seen": tokens_seen})
            tracker.finish(exit_code=EXIT_PREEMPTED if preempted else 0)
        atomic_write_json(paths.train / "summary.json", summary)
    dist.barrier()
    dist.destroy_process_group()
    return EXIT_PREEMPTED if preempted else 0


# torchrun's failure summary then quotes the failing rank's exception (root cause first) instead of
# "error_file: <N/A>", so the launcher's error names the real problem, not a peer's lost connection.
@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain.train", description=__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    paths = RunPaths(args.run_dir.resolve())
    cfg = load_config(paths.config)
    return run(cfg, paths)


if __name__ == "__main__":
    sys.exit(main())
