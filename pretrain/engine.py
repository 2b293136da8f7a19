"""Everything DeepSpeed: the generated JSON config, the engine, the optimizer, the LR schedule.

The rest of ``pretrain/`` sees an engine that is called like the model and has ``backward``,
``step``, ``save_checkpoint`` and ``load_checkpoint``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from pretrain_pipeline.config import TrainConfig


def zero3_options(world_size: int) -> dict[str, Any]:
    """ZeRO-3 settings that cut per-step host work without changing any number it computes.

    - Each transformer block is one ZeRO-3 leaf module, so DeepSpeed hooks, gathers and releases a
      block's parameters together (as FSDP wraps transformers) instead of every Linear and LayerNorm
      one by one. The list replaces DeepSpeed's default (MoE classes our GPT never has).
    - One rank has nothing to scatter, and reduce-scatter first copies every gradient into a second
      flat buffer; more ranks keep it, as it moves half the bytes of an all-reduce.
    """
    from pretrain.model import Block

    opts: dict[str, Any] = {"leaf_module": {"classes": [f"{Block.__module__}.{Block.__qualname__}"]}}
    if world_size == 1:
        opts["reduce_scatter"] = False
    return opts


def effective_zero_stage(train_cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage a launch runs: on one rank without offload there is nothing to partition,
    so fp32 runs as ZeRO-0 and bf16/fp16 ZeRO-2/3 as ZeRO-1 (which holds the fp32 master weights).

    Partitioning over one rank holds as many bytes or more and still pays for ZeRO's machinery on
    every step; torchtitan likewise applies FSDP only above shard degree 1. Offload (a memory
    feature on one GPU too) and ``train.zero.keep_stage_on_one_rank`` keep the configured stage.
    """
    zero = train_cfg.zero
    if world_size > 1 or zero.stage == 0 or zero.keep_stage_on_one_rank or zero.offload_optimizer or zero.offload_param:
        return zero.stage
    return 0 if train_cfg.precision == "fp32" else 1


def clips_in_engine(train_cfg: TrainConfig, world_size: int) -> bool:
    """True when ``Engine.step`` clips the gradients (ZeRO-0 in fp32), not DeepSpeed.

    There DeepSpeed's clipping keeps no norm; torch's ``clip_grad_norm_`` gives one norm that is
    also ``train/grad_norm`` and the NaN/inf check.
    """
    return effective_zero_stage(train_cfg, world_size) == 0 and train_cfg.precision == "fp32"


def zero_stage_note(train_cfg: TrainConfig, world_size: int) -> str:
    """The stage for log lines and the plan: "3", or "3 (runs as 0: one rank, nothing to partition)"."""
    stage = effective_zero_stage(train_cfg, world_size)
    if stage == train_cfg.zero.stage:
        return str(stage)
    return f"{train_cfg.zero.stage} (runs as {stage}: one rank, nothing to partition)"


def deepspeed_config(train_cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    stage = effective_zero_stage(train_cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage:
        # contiguous_gradients keeps ZeRO-2/3's partitioned gradients unfragmented; ZeRO-1 keeps
        # whole gradients, so there it would only add a hook and two copies per gradient.
        zero.update(overlap_comm=False, contiguous_gradients=stage >= 2)
    if stage == 3:
        zero.update(zero3_options(world_size))
    if train_cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train_cfg.zero.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum_steps,
        "train_batch_size": train_cfg.micro_batch_size * train_cfg.grad_accum_steps * world_size,
        "gradient_clipping": 0.0 if clips_in_engine(train_cfg, world_size) else train_cfg.optimizer.grad_clip,
        "zero_optimization": zero,
        # We pass a torch AdamW; DeepSpeed would otherwise insist on its compiled CPU Adam when offloading.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if world_size == 1 and stage in (1, 2):
        # One rank has nothing to average: "sum" saves a pass dividing every gradient by 1.0
        # (bitwise the same). DeepSpeed refuses "sum" with ZeRO-3.
        cfg["gradient_allreduce_op"] = "sum"
    if train_cfg.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train_cfg.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500}
    return cfg


def wsd_decay_steps(train_cfg: TrainConfig) -> int:
    return max(1, round(train_cfg.schedule.decay_fraction * train_cfg.max_steps))


def lr_at(step: int, train_cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine, constant or WSD.

    WSD (warmup-stable-decay, MiniCPM / Hagele et al. 2024) holds the peak LR and decays only over
    the last ``decay_fraction`` of the steps, so a run can be extended (or branched off to cool down)
    from any stable-phase checkpoint. A pure function of the step, so resume needs no scheduler state.
    """
    schedule, peak_lr = train_cfg.schedule, train_cfg.optimizer.lr
    if schedule.warmup_steps and step < schedule.warmup_steps:
        return peak_lr * (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return peak_lr
    if schedule.kind == "wsd":
        decay = wsd_decay_steps(train_cfg)
        progress = min(1.0, max(0.0, (step - (train_cfg.max_steps - decay)) / decay))
        remaining = 1.0 - (math.sqrt(progress) if schedule.wsd_decay == "1-sqrt" else progress)
        return schedule.min_lr + remaining * (peak_lr - schedule.min_lr)
    decay_steps = max(1, train_cfg.max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    return schedule.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - schedule.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: norms, biases (1-D) and embeddings are not pulled towards zero."""
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # named_parameters yields a tied weight once
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in embedding_params else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Engine:
    """The DeepSpeed engine plus the client optimizer whose LR we set each step."""

    def __init__(self, ds_engine: Any, optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, world_size: int):
        self.ds = ds_engine
        self.optimizer = optimizer
        self.train_cfg = train_cfg
        self.clips = clips_in_engine(train_cfg, world_size)
        self.params = [p for p in ds_engine.module.parameters() if p.requires_grad]
        self.last_grad_norm: float | None = None

    def set_lr(self, step: int, scale: float = 1.0) -> float:
        """Set and return the LR of ``step``, times ``scale`` (lowered for a while after a rollback)."""
        lr = lr_at(step, self.train_cfg) * scale
        # ZeRO wraps the client optimizer but steps its param_groups, so this is the LR it uses.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> bool:
        """DeepSpeed's step (an update only at the accumulation boundary); False when that
        boundary's gradients held NaN/inf and no update was applied.

        DeepSpeed's ZeRO and bf16 optimizers skip such a step themselves; ZeRO-0 in fp32 clips here
        (``clips_in_engine``) and skips the update itself. fp16's skips are its loss scaler at
        work, not failures, so they read True."""
        ds = self.ds
        if not ds.is_gradient_accumulation_boundary() or ds.fp16_enabled():
            ds.step()
            return True
        if not self.clips:
            ds.step()
            return ds.was_step_applied()
        if self.train_cfg.optimizer.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.train_cfg.optimizer.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        self.last_grad_norm = float(norm)
        if math.isfinite(self.last_grad_norm):
            ds.step()
            return True
        # DeepSpeed's step then skips the update and still zeroes the gradients and ends the boundary.
        ds.optimizer.step = lambda *args, **kwargs: None  # this instance, this step only
        try:
            ds.step()
        finally:
            del ds.optimizer.step
        return False

    def grad_norm(self) -> float | None:
        """The last boundary's gradient norm before clipping."""
        if self.clips:
            return self.last_grad_norm
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ds, name)

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)


@contextlib.contextmanager
def single_threaded_collective_threads():
    """Keep gloo's collective threads from starting OpenMP teams of their own (CPU runs only).

    ZeRO-3's all-gathers while DeepSpeed initializes run ATen copies on gloo's threads, and each
    such thread keeps an OpenMP team for the life of the process group. Once teams outnumber the
    CPUs libgomp stops spin-waiting, and every parallel region of the rank's compute pays a futex
    wake-up. A thread takes its OpenMP count from the intra-op setting on first use, so holding that
    at 1 during initialization keeps gloo's threads serial. NCCL has no such threads.
    """
    import torch.distributed as dist

    threads = torch.get_num_threads()
    if threads == 1 or not dist.is_initialized() or dist.get_backend() != "gloo":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_engine(model: torch.nn.Module, train_cfg: TrainConfig, world_size: int) -> Engine:
    import deepspeed

    if train_cfg.activation_checkpointing and hasattr(model, "activation_checkpointing"):
        model.activation_checkpointing = True
    optimizer = torch.optim.AdamW(
        param_groups(model, train_cfg.optimizer.weight_decay),
        lr=lr_at(0, train_cfg),
        betas=(train_cfg.optimizer.beta1, train_cfg.optimizer.beta2),
        eps=1e-8,
        # torch's default implementation; under ZeRO it steps one flat partition per group.
    )
    with single_threaded_collective_threads():
        ds_engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(train_cfg, world_size)
        )
    if world_size == 1 and clips_in_engine(train_cfg, world_size):
        # ZeRO-0's boundary all-reduce (flatten, reduce, copy back) is an identity on one rank;
        # DeepSpeed switches it off the same way when it has no process group.
        ds_engine.enable_backward_allreduce = False
    if train_cfg.compile:
        # Compiles the wrapped module in place, after ZeRO's hooks, so parameter names in
        # checkpoints and exports stay unprefixed.
        ds_engine.compile()
    return Engine(ds_engine, optimizer, train_cfg, world_size)
