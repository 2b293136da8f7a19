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
    """ZeRO-3 settings that cut its per-step host work without changing a single number it computes.

    - One transformer block is one ZeRO-3 "leaf module" (DeepSpeed 0.19 ``zero_optimization.leaf_module``;
      ``parameter_offload._register_deepspeed_module`` stops installing hooks below a leaf and
      ``pre_sub_module_forward_function`` fetches ``iter_params(leaf, recurse=True)`` in one go).
      Without it every nn.Linear/LayerNorm/Embedding gets its own pre/post forward hooks, backward
      pre/post autograd Functions, coordinator fetch/release and trace step: 50 hooked modules per
      step for the 4-layer benchmark model, 10 with it (this list replaces DeepSpeed's default
      one, three Hugging Face MoE block classes that never occur in our GPT). ZeRO-3 then gathers
      (and releases) a block's parameters together, which is how FSDP wraps transformers too; it
      is not a memory trade: DeepSpeed's default ``stage3_prefetch_bucket_size`` (5e7 elements)
      already prefetches more than one block ahead for any block under 5e7 parameters (d_model up
      to ~2000), and blocks are the unit activation checkpointing recomputes anyway. A leaf's gradients are
      reduced when the block's backward ends (``stage3.create_reduce_and_remove_grad_hooks``, a
      full backward hook) instead of parameter by parameter: the same gradients, the same sums.
    - At world size 1 there is nothing to scatter: ``reduce_scatter: false`` takes
      ``__avg_scatter_contiguous_grads`` (divide the contiguous IPG bucket by 1.0 in place, a
      one-rank all-reduce, slice it) instead of ``reduce_scatter_coalesced``, which first
      ``torch.cat``s every gradient into a second flat copy. Bitwise the same (x / 1.0 == x). On
      more ranks reduce-scatter moves half the bytes of an all-reduce, so it stays on there; the
      config is generated per launch, so a resume on more ranks gets it back.
    """
    from pretrain.model import Block

    opts: dict[str, Any] = {"leaf_module": {"classes": [f"{Block.__module__}.{Block.__qualname__}"]}}
    if world_size == 1:
        opts["reduce_scatter"] = False
    return opts


def effective_zero_stage(train_cfg: TrainConfig, world_size: int) -> int:
    """The ZeRO stage a launch runs. On one rank without offload there is nothing to partition:
    fp32 runs as ZeRO-0 and bf16/fp16 ZeRO-2/3 as ZeRO-1.

    Partitioning over one rank keeps every gradient and parameter whole, so ZeRO would hold the
    same bytes or more and still pay for its machinery on every step. In fp32 its optimizer's only
    other work is a second fp32 copy of the weights (its "master" partition), the gradients copied
    into a flat buffer after backward and the master copied back into the weights after each
    update: ZeRO-0, DeepSpeed's engine stepping the torch optimizer on the weights themselves,
    holds 16 bytes per parameter instead of 20 and runs the 1-rank CPU benchmark about 8% faster.
    In bf16/fp16 ZeRO-1's optimizer keeps the fp32 master weights that mixed precision needs, so
    there ZeRO-2/3 run as ZeRO-1, whose partition is the whole model (ZeRO-3's per-block
    fetch/release hooks, fp64 per-parameter norm and partition bookkeeping cost a 1-rank CPU run
    about a quarter of its speed). torchtitan makes the same call for FSDP, which it applies only
    when the shard degree is above 1. Offload is a memory feature that matters on one GPU too, so
    an offloading run keeps its stage, and ``keep_zero_stage_on_one_rank`` keeps it for anyone
    exercising ZeRO on one process. The config is generated per launch, so a run on more ranks
    gets its configured stage; evaluation and export read the checkpoints of every stage, and a
    resume on another stage or world size is refused by name (``pretrain.train``).
    """
    if (
        world_size > 1
        or train_cfg.zero_stage == 0
        or train_cfg.keep_zero_stage_on_one_rank
        or train_cfg.offload_optimizer
        or train_cfg.offload_param
    ):
        return train_cfg.zero_stage
    return 0 if train_cfg.precision == "fp32" else 1


def clips_in_engine(train_cfg: TrainConfig, world_size: int) -> bool:
    """True when our ``Engine`` clips the gradients (ZeRO-0 in fp32), not DeepSpeed.

    Without a ZeRO or mixed-precision optimizer DeepSpeed clips with its own per-parameter loop
    and keeps no norm (``get_global_grad_norm`` reads None). ``Engine.step`` instead uses torch's
    ``clip_grad_norm_``, as a plain PyTorch loop does, on the gradients DeepSpeed has already
    all-reduced in backward (the same on every rank), and that one norm is also the step's
    ``train/grad_norm`` and its NaN/inf check.
    """
    return effective_zero_stage(train_cfg, world_size) == 0 and train_cfg.precision == "fp32"


def zero_stage_note(train_cfg: TrainConfig, world_size: int) -> str:
    """The stage for log lines and the plan: "3", or "3 (runs as 0: one rank, nothing to partition)"."""
    stage = effective_zero_stage(train_cfg, world_size)
    if stage == train_cfg.zero_stage:
        return str(stage)
    return f"{train_cfg.zero_stage} (runs as {stage}: one rank, nothing to partition)"


def deepspeed_config(train_cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    stage = effective_zero_stage(train_cfg, world_size)
    zero: dict[str, Any] = {"stage": stage}
    if stage:
        # contiguous_gradients copies each gradient into a reduce bucket from a per-parameter
        # autograd hook, then into a partition buffer: it exists to keep ZeRO-2/3's partitioned
        # gradients unfragmented. ZeRO-1 keeps whole gradients until the boundary, so there it is
        # only a Python hook per parameter per backward plus two extra copies of every gradient
        # (about 5% of a step on the 1-rank CPU benchmark); without it ZeRO-1 reduces the same
        # gradients once, after backward (same gradients, bitwise). Optimizer offload turns it back
        # on by itself (DeepSpeed: contiguous_gradients or cpu_offload).
        zero.update(overlap_comm=False, contiguous_gradients=stage >= 2)
    if stage == 3:
        zero.update(zero3_options(world_size))
    if train_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if train_cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.grad_accum_steps,
        "train_batch_size": train_cfg.micro_batch_size * train_cfg.grad_accum_steps * world_size,
        "gradient_clipping": 0.0 if clips_in_engine(train_cfg, world_size) else train_cfg.grad_clip,
        "zero_optimization": zero,
        # We pass a torch AdamW; DeepSpeed would otherwise insist on its compiled CPU Adam when offloading.
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if world_size == 1 and stage in (1, 2):
        # One rank has nothing to average: "mean" divides every gradient by 1.0 (a full pass over
        # them each step, exact, so "sum" gives bitwise the same gradients). DeepSpeed refuses
        # "sum" with ZeRO-3. The config is generated per launch, so a resume on more ranks averages.
        cfg["gradient_allreduce_op"] = "sum"
    if train_cfg.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif train_cfg.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 16, "loss_scale_window": 500}
    return cfg


def wsd_decay_steps(train_cfg: TrainConfig) -> int:
    return max(1, round(train_cfg.decay_fraction * train_cfg.max_steps))


def lr_at(step: int, train_cfg: TrainConfig) -> float:
    """LR for optimizer step ``step`` (0-based): linear warmup, then cosine, constant or WSD.

    WSD (warmup-stable-decay, MiniCPM / Hagele et al. 2024) holds the peak LR and decays only over
    the last ``decay_fraction`` of the steps, so a run can be extended (or branched off to cool down)
    from any stable-phase checkpoint. A pure function of the step, so resume needs no scheduler state.
    """
    if train_cfg.warmup_steps and step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    if train_cfg.lr_schedule == "constant":
        return train_cfg.lr
    if train_cfg.lr_schedule == "wsd":
        decay = wsd_decay_steps(train_cfg)
        progress = min(1.0, max(0.0, (step - (train_cfg.max_steps - decay)) / decay))
        remaining = 1.0 - (math.sqrt(progress) if train_cfg.wsd_decay == "1-sqrt" else progress)
        return train_cfg.min_lr + remaining * (train_cfg.lr - train_cfg.min_lr)
    decay_steps = max(1, train_cfg.max_steps - train_cfg.warmup_steps)
    progress = min(1.0, (step - train_cfg.warmup_steps) / decay_steps)
    return train_cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (train_cfg.lr - train_cfg.min_lr)


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

    def set_lr(self, step: int) -> float:
        lr = lr_at(step, self.train_cfg)
        # ZeRO wraps the client optimizer but steps its param_groups, so this is the LR it uses.
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self) -> bool:
        """DeepSpeed's step (an optimizer update only at the accumulation boundary). False when
        that boundary's gradients held NaN/inf and so no update was applied.

        DeepSpeed's ZeRO optimizers and its bf16 optimizer already skip a step whose gradient norm
        is not finite (``was_step_applied`` then reads False). ZeRO-0 in fp32 steps the torch
        optimizer directly, so there the gradients are clipped here (``clips_in_engine``) and a
        non-finite norm skips that one optimizer step (DeepSpeed still ends the boundary:
        counters, zeroed gradients). fp16's skipped steps are its loss scaler at work, not a
        failure, so they read True."""
        ds = self.ds
        if not ds.is_gradient_accumulation_boundary() or ds.fp16_enabled():
            ds.step()
            return True
        if not self.clips:
            ds.step()
            return ds.was_step_applied()
        if self.train_cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.train_cfg.grad_clip)
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

    gloo runs every collective on its own run-loop threads, and its all-gather copies tensors with
    ATen ops there. ZeRO-3 all-gathers the parameters while DeepSpeed initializes (and the persistent
    ones after every step), and the copies of the larger ones are big enough for an OpenMP parallel region:
    the first one a thread runs starts a team of OMP_NUM_THREADS for that thread, which lives as long
    as the process group. libgomp counts every team's threads, and once they outnumber the CPUs it
    stops spin-waiting in all of them (GOMP's "throttled" spin count): every parallel region of the
    rank's own compute then pays a futex sleep and wake-up, and at 2 threads per rank on 2 cores
    ZeRO-3 ran no faster than at 1 (a 1024x128 @ 128x512 matmul went from 0.31 to 0.40 ms).
    ATen sets a thread's OpenMP thread count once, from the process-wide intra-op setting, on the
    first ATen op that asks for it; with that setting at 1 while DeepSpeed initializes (where its
    collectives first run), gloo's threads keep 1 and copy serially, and the ranks' compute threads
    get their count back afterwards. Copies are exact at any thread count, so nothing changes
    numerically. NCCL has no such CPU threads, and single-threaded start-up copies would slow a
    big model's (offload) initialization, so this applies to gloo only.
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
        param_groups(model, train_cfg.weight_decay),
        lr=lr_at(0, train_cfg),
        betas=(train_cfg.beta1, train_cfg.beta2),
        eps=1e-8,
        # torch's default implementation (for-loop on CPU, foreach on CUDA); under ZeRO it steps one flat partition per group.
    )
    with single_threaded_collective_threads():
        ds_engine, ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(train_cfg, world_size)
        )
    if world_size == 1 and clips_in_engine(train_cfg, world_size):
        # ZeRO-0 all-reduces every gradient at the boundary (flatten, all-reduce, copy back): on one
        # rank that is an identity that costs about 4% of a CPU step. DeepSpeed switches it off
        # the same way when it has no process group; a launch on more ranks keeps it.
        ds_engine.enable_backward_allreduce = False
    if train_cfg.compile:
        # DeepSpeed's documented path: compiles the wrapped module in place (nn.Module.compile), after
        # ZeRO has installed its hooks, so parameter names (checkpoints, export) stay unprefixed.
        # Backend: the accelerator's default (inductor on CPU and CUDA).
        ds_engine.compile()
    return Engine(ds_engine, optimizer, train_cfg, world_size)
