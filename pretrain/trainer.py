"""One training rank: ``python -m torch.distributed.run ... -m pretrain.trainer --run-dir runs/<name>``.

Started by ``pretrain.launch`` (torchrun or the deepspeed launcher) or by a Ray Train worker
(``pretrain.ray_launch``), never by plain python: the rank, world size and rendezvous come from the
launcher's environment. ``Trainer.__init__`` sets up, ``Trainer.train`` is the loop: one
``train_step`` (micro-batches and the non-finite policy), then the log/validate/save cadence, then
``finish`` (or ``abort`` when the non-finite policy stops the run).
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

from pretrain.checkpoint import (latest_tag, load_checkpoint, resume_refusal, rng_state, save_checkpoint,
                                 set_rng_state, tag_for)
from pretrain.data import DataIntegrityError, MixtureDataset, ShardDataset, build_train_loader, load_manifest
from pretrain.device import rank_device
from pretrain.distributed import init_distributed
from pretrain.events import event_line, record_event, restart_count
from pretrain.faults import LossFaults
from pretrain.model import GPT, resolve_vocab_size
from pretrain.spikes import RollBack, SpikeGuard
from pretrain.sampler import sample_digest
from pretrain_pipeline.artifacts import RunPaths, atomic_write_json
from pretrain_pipeline.config import PipelineConfig, TrainConfig, load_config

EXIT_PREEMPTED = 143  # 128 + SIGTERM: saved and stopped early, not finished
EXIT_NONFINITE = 4  # NaN/inf loss (train.recovery.nonfinite_loss): stopped without saving the bad state
# Set to 1, rank 0 logs a hash of each step's global sample ids (data/sample_hash) to metrics.jsonl:
# tests compare it between runs on different cluster shapes.
SAMPLE_HASH_ENV = "PRETRAIN_PIPELINE_SAMPLE_HASH"


def nonfinite_failure(tc: TrainConfig, skipped: int, paths: RunPaths, what: str) -> str | None:
    """The message that stops the run after a non-finite loss or gradients, or None to skip on
    (``train.recovery.nonfinite_loss: skip`` with ``skipped`` still within ``max_skipped_batches``)."""
    policy = tc.recovery
    if policy.nonfinite_loss == "skip" and skipped <= policy.max_skipped_batches:
        return None
    why = ("train.recovery.nonfinite_loss=stop" if policy.nonfinite_loss == "stop"
           else f"{skipped} skipped micro-batches > train.recovery.max_skipped_batches={policy.max_skipped_batches}")
    return stop_message(what, why, paths)


def stop_message(what: str, why: str, paths: RunPaths) -> str:
    """Why the run stopped without saving, naming the checkpoint that stays the last good state."""
    return (
        f"{what}; stopped without saving ({why}); latest checkpoint "
        f"{latest_tag(paths.checkpoints) or '(none)'} is the last good state. "
        "Lower train.optimizer.lr, raise train.schedule.warmup_steps or set train.optimizer.grad_clip."
    )


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


class NonFiniteStop(Exception):
    """``train.recovery`` says stop: the message names the bad step and the last good checkpoint."""


class Trainer:
    """One rank of a training run: ``Trainer(cfg, paths).train()`` returns the rank's exit code."""

    def __init__(self, cfg: PipelineConfig, paths: RunPaths) -> None:
        self.cfg, self.paths, self.tc = cfg, paths, cfg.train
        self.device = rank_device(self.tc.device, int(os.environ.get("LOCAL_RANK", 0)))
        init_distributed("gloo" if self.device == "cpu" else "nccl")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.stop = StopFlag()
        self.manifest = load_manifest(paths.shards)
        self.vocab_size = resolve_vocab_size(cfg.model, self.manifest.vocab_size)
        self.model = self._build_model()
        from pretrain.reshard import optimizer_param_names

        # What maps a ZeRO-0 checkpoint's optimizer state to names when it is converted; read before
        # ZeRO-3 partitions the model.
        self.param_names = optimizer_param_names(self.model)
        self.conversion: dict[str, Any] | None = None  # the record of the conversion the last load went through
        self.train_data, self.val_data = self._load_data()
        self.train_data.recording = self.rank == 0 and os.environ.get(SAMPLE_HASH_ENV) == "1"

        from pretrain.engine import build_engine, effective_zero_stage

        self.engine = build_engine(self.model, self.tc, self.world)
        self.zero_stage = effective_zero_stage(self.tc, self.world)
        # What a checkpoint carries to the next run (restored by _resume).
        self.step, self.tokens_seen, self.wandb_id = 0, 0, None
        self.last_loss = float("nan")
        self.skipped = 0  # micro-batches dropped by train.recovery.nonfinite_loss: skip
        self.last_saved = -1
        self.spikes = SpikeGuard(self.tc.recovery)  # train.recovery.spike_policy; _resume restores its state
        self.events: list[dict[str, Any]] = []  # recorded by this process (W&B gets them once the tracker runs)
        if self.tc.resume == "auto":
            self._resume()
        self.tracker = self._start_tracker() if self.rank == 0 else None
        self._record_start_events()
        self.faults = LossFaults(self.rank)  # tests only: PRETRAIN_FAULT_* (pretrain.faults)

        from pretrain.plan import peak_flops

        tc = self.tc
        on_gpu = self.device.startswith("cuda")
        self.peak = peak_flops(tc.plan.peak_tflops) if on_gpu else (tc.plan.peak_tflops * 1e12 or None)  # for train/mfu
        self.flops_per_token = self.model.flops_per_token()
        self.tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * cfg.model.block_size * self.world

    def _say(self, message: str) -> None:
        """A ``[pretrain]`` line from rank 0 (the launcher streams it to the log)."""
        if self.rank == 0:
            print(f"[pretrain] {message}", flush=True)

    def _event(self, kind: str, step: int | None, message: str, **details: Any) -> None:
        """A timeline event (rank 0): train/events.jsonl, the train log, and W&B."""
        if self.rank != 0:
            return
        event = record_event(self.paths.train, kind, step, message, **details)
        self.events.append(event)
        self._say(f"event: {event_line(event)}")
        if getattr(self, "tracker", None):
            self.tracker.event(event)

    def _record_start_events(self) -> None:
        """A launcher restart and the resume it led to (events before the tracker reach W&B now)."""
        if self.tracker:
            for event in self.events:
                self.tracker.event(event)
        restarts = restart_count()
        if restarts:
            self._event("restart", self.step, f"rank group restarted by the launcher ({restarts} of "
                        f"train.recovery.max_restarts={self.tc.recovery.max_restarts}); continuing at step {self.step}",
                        restarts=restarts)
        if self.step:
            self._event("resume", self.step, f"resumed from {self.paths.checkpoints / tag_for(self.step)} at step "
                        f"{self.step} on {self.world} rank(s) ZeRO-{self.zero_stage}", world_size=self.world)

    # ------------------------------------------------------------------------------------- setup

    def _build_model(self) -> GPT:
        seed = self.tc.seed
        # Same seed on every rank for identical initial weights; per-rank seeds afterwards (dropout).
        torch.manual_seed(seed)
        model = GPT(self.cfg.model, self.vocab_size)
        random.seed(seed + self.rank)
        np.random.seed(seed + self.rank)
        torch.manual_seed(seed + self.rank)
        return model

    def _load_data(self) -> tuple[ShardDataset | MixtureDataset, ShardDataset]:
        cfg, paths, rank, world, manifest = self.cfg, self.paths, self.rank, self.world, self.manifest
        # Only rank 0 re-hashes the shards; the others wait for its verdict instead of reading twice.
        if rank == 0:
            manifest.verify()
            if cfg.train.data_mixture:  # and every mixture source's shards and tokenizer against its manifest
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
        val_data = ShardDataset(manifest, "val", cfg.model.block_size, cfg.train.micro_batch_size, rank, world,
                                cfg.train.seed, verify=False)
        return train_data, val_data

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint this launch cannot continue, before DeepSpeed reads its weights."""
        if refusal := resume_refusal(state, self.cfg.model.fingerprint(), self.paths.checkpoints):
            raise RuntimeError(refusal)

    def _resume(self, rolling_back: bool = False) -> str | None:
        # The newest tag whose files match its completion record (rank 0 verifies, all ranks load);
        # a damaged newer one is refused by name and the previous complete one is used.
        resumed = load_checkpoint(self.engine, self.paths.checkpoints, log_line=self._say, check=self._check_resumable,
                                  convert=self._load_converted)
        if not resumed:
            return None
        tag, state = resumed
        self.spikes.load_state_dict(state.get("spikes"), rolling_back)
        self.step, self.tokens_seen, self.wandb_id = state["step"], state["tokens_seen"], state.get("wandb_run_id")
        if self.conversion and not rolling_back:  # weights and optimizer state are in; before the data position
            self._report_conversion(state)
        self.last_loss = state.get("loss", float("nan"))
        self.skipped = state.get("skipped_batches", 0)
        self.train_data.load_state_dict(state["data"])
        self._restore_rng(state["rng"])
        if not rolling_back:
            self._say(f"resumed from {self.paths.checkpoints / tag} at step {self.step}")
        return tag

    def _load_converted(self, tag: str, state: dict[str, Any]) -> bool:
        """Load a checkpoint written on another world size or ZeRO stage through its topology-free
        conversion (made once, recorded next to the tag); False: DeepSpeed's own load reads it."""
        from pretrain.reshard import load_converted_checkpoint, needs_conversion

        self.conversion = None
        if not needs_conversion(state, self.zero_stage, self.world):
            return False
        self.conversion = load_converted_checkpoint(self.engine, self.paths.checkpoints / tag, self.param_names)
        return True

    def _restore_rng(self, rngs: list[Any]) -> None:
        """Each rank's RNG streams continue when the rank count is unchanged; on another count a
        rank's stream has no predecessor, so every rank starts a fresh one of (seed, step, rank)."""
        if len(rngs) == self.world:
            set_rng_state(rngs[self.rank])
            return
        seed = int(np.random.SeedSequence([self.tc.seed, self.step, self.rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _report_conversion(self, state: dict[str, Any]) -> None:
        """The first log line and the timeline event of a resume on another world size or ZeRO stage."""
        from pretrain.reshard import saved_layout, topology

        record = self.conversion
        saved_world, stages = saved_layout(state)
        source, target = topology(saved_world, "/".join(map(str, stages))), topology(self.world, self.zero_stage)
        how = f"converted in {record['seconds']:.1f} s" + (" (an earlier conversion, reused)" if record["reused"] else "")
        self._event("conversion", self.step, f"resuming step {self.step} written by {source} on {target}: {how}",
                    source=source, target=target, seconds=record["seconds"], reused=record["reused"])

    def _start_tracker(self):
        """Rank 0's metrics.jsonl and W&B run, then the plan and the run's header lines."""
        from pretrain.engine import zero_stage_note
        from pretrain.plan import make_plan
        from pretrain.tracking import Tracker

        cfg, tc, model, world = self.cfg, self.tc, self.model, self.world
        tracker = Tracker(
            cfg.tracking,
            self.paths.root,
            config_dict={**cfg.model_dump(mode="json"), "world_size": world, "params": model.num_params()},
            resume_id=self.wandb_id,
            run_name=cfg.runtime.run_name,
        )
        self.wandb_id = tracker.run_id
        for line in make_plan(cfg, self.manifest.vocab_size, world).lines():
            self._say(f"plan: {line}")
        self._say(
            f"{model.num_params():,} params, world {world}, device {self.device}, "
            f"zero {zero_stage_note(tc, world)}, {tc.precision}, global batch {self.train_data.layout.describe()}, "
            f"steps {self.step}->{tc.max_steps}"
            + (", activation checkpointing" if getattr(model, "activation_checkpointing", False) else "")
            + (", compiled" if self.engine.is_compiled else "")
        )
        return tracker

    # -------------------------------------------------------------------------------------- loop

    def train(self) -> int:
        """Step until max_steps, a stop request every rank agrees on, or the non-finite policy stops."""
        self.engine.train()
        self.window_start, self.window_tokens = time.perf_counter(), 0
        stop_agreed = any_rank(self.stop.requested, self.device)  # later steps agree on it with their loss
        while self.step < self.tc.max_steps:
            if stop_agreed:
                return self.finish(preempted=True)
            self.faults.kill_before(self.step + 1)
            lr = self.engine.set_lr(self.step, scale=self.spikes.budget.lr_scale(self.step))
            try:
                loss = self.train_step(lr)
                if loss is None:  # the update was not applied: redo the step with the next micro-batches
                    continue
                stop_agreed = self._count_step(loss)
                self.spikes.judge(self.step, self.last_loss)  # the all-reduced loss: every rank agrees
            except NonFiniteStop as failure:
                return self.abort(str(failure))
            except RollBack as bad:
                if failure := self._roll_back(bad):
                    return self.abort(failure)
                continue
            self._log_validate_save(lr)
        return self.finish(preempted=False)

    def train_step(self, lr: float) -> float | None:
        """One optimizer step over ``grad_accum_steps`` finite micro-batches: this rank's mean loss,
        or None when the boundary's gradients were non-finite and the update was skipped.

        Raises NonFiniteStop when ``train.recovery`` says stop.
        """
        accum = self.tc.grad_accum_steps
        loss_sum, good, grads_finite = 0.0, 0, True
        while good < accum:
            x, y = self.train_data.next_batch()
            _, loss = self.engine(x.to(self.device), y.to(self.device))
            loss = self.faults.apply(loss)
            # Checked on every rank before backward, and agreed by all-reduce: ZeRO reduces gradients
            # inside backward and DeepSpeed counts micro-steps to find the accumulation boundary, so
            # all ranks must skip (or stop on) the same micro-batch. Rolling back needs no check here:
            # the NaN reaches the step loss (and the boundary's gradients), and the step rolls back.
            if not self.spikes.enabled and any_rank(not bool(torch.isfinite(loss.detach())), self.device):
                self._skip_or_stop(
                    1, f"non-finite loss at step {self.step + 1} (micro-batch {good + 1} of {accum}, lr {lr:.3g})",
                    "non-finite loss, micro-batch skipped")
                continue
            self.engine.backward(loss)
            # DeepSpeed only updates weights at the accumulation boundary, and not when the
            # gradients there are NaN/inf (a finite loss does not promise finite gradients).
            grads_finite = self.engine.step()
            loss_sum += float(loss.detach())
            good += 1
        # Every rank sees the same verdict without a collective: the boundary's gradients were
        # all-reduced before the check (ZeRO-0) or DeepSpeed judged their all-reduced norm (ZeRO, bf16).
        if not grads_finite and self.spikes.enabled:
            raise RollBack(self.step + 1, "non-finite gradients", f"lr {lr:.3g}; the update was not applied")
        if not grads_finite:
            # The weights are still the last good ones: skip the step's micro-batches (or stop).
            self._skip_or_stop(
                accum, f"non-finite gradients at step {self.step + 1} (finite loss, lr {lr:.3g}); the update was not applied",
                f"non-finite gradients, update not applied, its {accum} micro-batch(es) skipped")
            return None
        return self.faults.spike(self.step + 1, loss_sum / accum)

    def _roll_back(self, bad: RollBack) -> str | None:
        """Every rank returns to the last checkpoint (the resume path), skips the global samples drawn
        since it up to the bad step, and goes on; the stop message instead once the budget is spent."""
        budget = self.spikes.budget
        if budget.exhausted():
            return stop_message(str(bad), f"train.recovery.max_rollbacks={budget.max_rollbacks} rollbacks already made",
                                self.paths)
        drawn_to = self.train_data.position
        if self._resume(rolling_back=True) is None:
            return stop_message(str(bad), "no checkpoint to roll back to yet: lower train.checkpoint.every", self.paths)
        skipped = [self.train_data.position, drawn_to]
        self.train_data.skip(*skipped)  # recorded in the loader state, so never served again
        budget.spend(self.step)
        self.last_saved = self.step
        if self.tracker:  # W&B keeps the first pass of the replayed steps (it cannot go back)
            self.tracker.skip_wandb_until(bad.step + 1)
        lr_note = (f"; LR x{budget.lr_factor} until step {budget.lr_scaled_until}"
                   if budget.lr_factor != 1 and budget.lr_steps else "")
        self._event("rollback", bad.step, f"{bad}; rolled back to step {self.step}, global samples "
                    f"[{skipped[0]}, {skipped[1]}) skipped{lr_note} (rollback {budget.rollbacks} of "
                    f"{budget.max_rollbacks})", resumed_step=self.step, skipped=skipped, rollbacks=budget.rollbacks)
        return None

    def _skip_or_stop(self, batches: int, what: str, skip_note: str) -> None:
        """Count ``batches`` more skipped micro-batches; raise NonFiniteStop if the policy stops here."""
        self.skipped += batches
        failure = nonfinite_failure(self.tc, self.skipped, self.paths, what)
        if failure:
            raise NonFiniteStop(failure)
        self._say(f"step {self.step + 1}: {skip_note} ({self.skipped}/{self.tc.recovery.max_skipped_batches})")

    def _count_step(self, local_loss: float) -> bool:
        """Advance the step and agree on its loss; whether any rank was asked to stop."""
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.window_tokens += self.tokens_per_step
        self.last_loss, stop_agreed = step_consensus(local_loss, self.stop.requested, self.device)
        if self.train_data.recording and self.tracker:
            self.tracker.log({"data/sample_hash": sample_digest(self.train_data.take_consumed()),
                              "data/position": self.train_data.position}, self.step)
        return stop_agreed

    # ----------------------------------------------------------------------------------- cadence

    def _log_validate_save(self, lr: float) -> None:
        step, tc = self.step, self.tc
        if step % tc.log_every == 0 or step == tc.max_steps or step == 1:
            self._log_metrics(lr)
        if step % tc.validation.every == 0 or step == tc.max_steps:
            val_loss = validate(self.engine, self.val_data, tc.validation.batches, self.device)
            if self.tracker:
                self.tracker.log({"val/loss": val_loss}, step)
                self._say(f"step {step} val_loss {val_loss:.4f}")
        if step % tc.checkpoint.every == 0 and step < tc.max_steps:
            self.save()  # the last step's save is finish's

    def _log_metrics(self, lr: float) -> None:
        """Loss, LR, gradient norm, throughput and memory since the last log (every rank computes them)."""
        from pretrain.plan import mfu

        elapsed = time.perf_counter() - self.window_start
        metrics = {
            "train/loss": self.last_loss,
            "train/lr": lr,
            "train/grad_norm": self.engine.grad_norm(),
            "train/tokens_per_s": self.window_tokens / elapsed if elapsed > 0 else None,
            "train/tokens_seen": self.tokens_seen,
            "train/skipped_batches": self.skipped,
            **memory_metrics(self.device),
        }
        if isinstance(self.train_data, MixtureDataset):  # realised shares next to the configured weights
            metrics.update({f"data/share/{k}": v for k, v in self.train_data.realised_proportions().items()})
        if self.peak and metrics["train/tokens_per_s"]:
            metrics["train/mfu"] = mfu(metrics["train/tokens_per_s"], self.flops_per_token, self.world, self.peak)
        if self.tracker:
            self.tracker.log(metrics, self.step)
            self._say(f"step {self.step} loss {self.last_loss:.4f} lr {lr:.2e}")
        self.window_start, self.window_tokens = time.perf_counter(), 0

    def save(self) -> str:
        """Checkpoint the current step on every rank (DeepSpeed's files) plus rank 0's client state."""
        # RNG states differ per rank but only rank 0 writes client state, so gather them first.
        rngs: list[Any] = [None] * self.world
        dist.all_gather_object(rngs, rng_state())
        tag = tag_for(self.step)
        # Our state goes to its own client_state.pt (tensors and plain data, read back with
        # weights_only=True), not into DeepSpeed's pickles; rank 0 writes it, then the completion record.
        client = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "data": self.train_data.state_dict(),
            "rng": rngs,
            "wandb_run_id": self.wandb_id,
            "vocab_size": self.vocab_size,
            "model_fingerprint": self.cfg.model.fingerprint(),
            "loss": self.last_loss,
            "skipped_batches": self.skipped,
            "spikes": self.spikes.state_dict(),
            "world_size": self.world,
            "zero_stage": self.zero_stage,
        }
        save_checkpoint(self.engine, self.paths.checkpoints, tag, client, keep=self.tc.checkpoint.keep_last)
        self.last_saved = self.step
        return tag

    # ------------------------------------------------------------------------------------ finish

    def finish(self, preempted: bool) -> int:
        """Save the last step, then rank 0 writes train/summary.json and closes the tracker."""
        if self.step > 0 and self.last_saved != self.step:
            self.save()
        tag = latest_tag(self.paths.checkpoints, verify=False)  # just saved and hashed: sizes suffice
        exit_code = EXIT_PREEMPTED if preempted else 0
        if self.rank == 0:
            summary = self._summary(tag, completed=not preempted)
            if self.tracker:
                self.tracker.summary({"final_loss": self.last_loss, "tokens_seen": self.tokens_seen})
                self.tracker.finish(exit_code=exit_code)
            atomic_write_json(self.paths.train / "summary.json", summary)
        self._leave_process_group()
        return exit_code

    def abort(self, failure: str) -> int:
        """Stop on a non-finite loss or gradients; no save, so the bad state never becomes the latest checkpoint."""
        if self.rank == 0:
            print(f"[pretrain] error: {failure}", file=sys.stderr, flush=True)
            if self.tracker:
                self.tracker.finish(exit_code=EXIT_NONFINITE)
        self._leave_process_group()
        return EXIT_NONFINITE

    def _summary(self, tag: str | None, completed: bool) -> dict[str, Any]:
        tracker = self.tracker
        return {
            "final_loss": self.last_loss,
            "steps": self.step,
            "max_steps": self.tc.max_steps,
            "completed": completed,
            "tokens_seen": self.tokens_seen,
            "params": self.model.num_params(),
            "flops_per_token": self.model.flops_per_token(),
            "world_size": self.world,
            "last_checkpoint_tag": tag,
            "checkpoint_dir": str(self.paths.checkpoints),
            "wandb_run_id": self.wandb_id,
            "wandb_mode": self.cfg.tracking.wandb_mode,
            "wandb_dir": tracker.offline_dir if tracker else None,
        }

    @staticmethod
    def _leave_process_group() -> None:
        dist.barrier()
        dist.destroy_process_group()


# torchrun's failure summary then quotes the failing rank's exception (root cause first) instead of
# "error_file: <N/A>", so the launcher's error names the real problem, not a peer's lost connection.
@record
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pretrain.trainer", description=__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    paths = RunPaths(args.run_dir.resolve())
    return Trainer(load_config(paths.config), paths).train()


if __name__ == "__main__":
    sys.exit(main())
