"""Before launch: parameters, per-rank memory by ZeRO stage, FLOPs/token, steps and ETA.

The memory model is the ZeRO paper's (Rajbhandari et al. 2020, section 3) with mixed precision:
16-bit weights and grads (2 + 2 bytes/param) and fp32 master + Adam m, v (12 bytes/param); fp32
training keeps 4 + 4 + 8. Stage 1 shards the optimizer states, 2 also the grads, 3 also the weights.
Activations follow Korthikanti et al. 2022 (34·s·b·h bytes per layer in 16-bit without the
attention-score term, which SDPA's fused kernels do not materialise), plus the logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from pretrain.engine import effective_zero_stage, zero_stage_note
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.errors import UserError

GiB = 1024**3
# Dense bf16 tensor-core peaks (no sparsity), per device, from the vendor datasheets (SXM parts).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}


def peak_flops(configured_tflops: float = 0.0, device_name: str | None = None) -> float | None:
    """Per-device peak FLOP/s: the configured value, else by GPU name; None when unknown (CPU)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device_name is None and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS.items():
        if device_name and key in device_name.upper():
            return tflops * 1e12
    return None


def planned_peak(tc) -> tuple[float | None, str]:
    """The per-device peak FLOP/s the ETA assumes, and whose it is: train.plan.peak_tflops, else
    train.accelerator's datasheet figure (planned anywhere), else this machine's GPU by name."""
    if tc.plan.peak_tflops:
        return tc.plan.peak_tflops * 1e12, "device"
    if tc.accelerator != "none":
        name = tc.accelerator.upper()
    else:
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return (peak_flops(0, name) if name else None), name


def mfu(tokens_per_s: float, flops_per_token: float, world_size: int, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the cluster's peak."""
    return tokens_per_s * flops_per_token / (world_size * peak)


@dataclass
class Plan:
    params: int
    params_total: int
    flops_per_token: int
    world_size: int
    weights_gb: float
    grads_gb: float
    optimizer_gb: float
    activations_gb: float
    total_gb: float
    tokens_per_step: int
    steps: int
    tokens: int
    eta_hours: float | None
    device_memory_gb: float
    fits: bool
    zero_stage: str = ""  # as launched, e.g. "3 (runs as 0: one rank, nothing to partition)"
    eta_basis: str = ""  # the devices, peak and MFU the ETA assumes
    resume_notes: list[str] = field(default_factory=list)  # what resuming on this cluster shape changes

    def lines(self) -> list[str]:
        eta = (f"{self.eta_hours:.2f} h {self.eta_basis}" if self.eta_hours is not None
               else "n/a (no peak FLOP/s known for this device: set train.accelerator or train.plan.peak_tflops)")
        return [
            f"params {self.params:,} (non-embedding), {self.params_total:,} total; "
            f"FLOPs/token {self.flops_per_token:,}; world size {self.world_size}; ZeRO {self.zero_stage}",
            f"per-rank memory GiB: weights {self.weights_gb:.3f}, grads {self.grads_gb:.3f}, "
            f"optimizer {self.optimizer_gb:.3f}, activations {self.activations_gb:.3f}, total {self.total_gb:.3f}"
            + (f" of {self.device_memory_gb:g}" if self.device_memory_gb else ""),
            f"{self.steps} steps x {self.tokens_per_step:,} tokens = {self.tokens:,} tokens; ETA {eta}",
            *self.resume_notes,
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(cfg: PipelineConfig, vocab_size: int) -> tuple[int, int, int]:
    """(non-embedding params, total params, FLOPs/token) from a meta-device model: exact, allocation-free."""
    from pretrain.model import GPT, resolve_vocab_size

    with torch.device("meta"):
        model = GPT(cfg.model, resolve_vocab_size(cfg.model, vocab_size))
    return model.num_params(), model.num_params(non_embedding=False), model.flops_per_token()


def make_plan(cfg: PipelineConfig, vocab_size: int, world_size: int | None = None) -> Plan:
    tc, mc = cfg.train, cfg.model
    world = world_size or tc.launch.nproc_per_node * tc.launch.nnodes
    n, n_total, fpt = count_params(cfg, vocab_size)
    half = tc.precision in ("bf16", "fp16")
    # Adam moments (8 bytes) plus, under ZeRO (any precision), DeepSpeed's separate fp32 master
    # copy of the partition (4 bytes); ZeRO-0 in fp32 steps the weights themselves.
    # The stage as launched: on one rank ZeRO runs as ZeRO-0 (fp32) or ZeRO-1 (effective_zero_stage).
    stage = effective_zero_stage(tc, world)
    w_bytes, g_bytes, o_bytes = (2, 2, 12) if half else (4, 4, 12 if stage >= 1 else 8)
    weights = n_total * w_bytes / (world if stage >= 3 else 1)
    grads = n_total * g_bytes / (world if stage >= 2 else 1)
    optim = n_total * o_bytes / (world if stage >= 1 else 1)
    if tc.zero.offload_optimizer:
        optim = 0.0
    if tc.zero.offload_param and stage == 3:
        weights = 0.0
    s, b, h, L = mc.block_size, tc.micro_batch_size, mc.n_embd, mc.n_layer
    act_unit = 1 if half else 2  # the 34sbh formula counts 16-bit activations
    per_layer = 34 * s * b * h * act_unit
    # Activation checkpointing keeps each layer's input and recomputes one layer at a time.
    layers = (L * 2 * s * b * h * act_unit + per_layer) if tc.activation_checkpointing else L * per_layer
    from pretrain.model import resolve_vocab_size

    logits = 2 * s * b * resolve_vocab_size(mc, vocab_size) * 4  # logits + their grad, fp32
    activations = layers + logits
    total = weights + grads + optim + activations
    tokens_per_step = tc.tokens_per_step(mc.block_size, world)
    tokens = tokens_per_step * tc.max_steps
    peak, device = planned_peak(tc)
    eta = tokens * fpt / (world * peak * tc.plan.planned_mfu) / 3600 if peak else None
    basis = f"on {world} x {device} ({peak / 1e12:g} TFLOP/s peak, assumed MFU {tc.plan.planned_mfu:.0%})" if peak else ""
    return Plan(
        params=n, params_total=n_total, flops_per_token=fpt, world_size=world,
        weights_gb=weights / GiB, grads_gb=grads / GiB, optimizer_gb=optim / GiB, activations_gb=activations / GiB,
        total_gb=total / GiB, tokens_per_step=tokens_per_step, steps=tc.max_steps, tokens=tokens, eta_hours=eta,
        device_memory_gb=tc.plan.device_memory_gb, fits=not tc.plan.device_memory_gb or total / GiB <= tc.plan.device_memory_gb,
        zero_stage=zero_stage_note(tc, world), eta_basis=basis,
    )


def plan_launch(cfg: PipelineConfig, paths, leader: bool = True) -> tuple[PipelineConfig, Plan]:
    """What a launch runs and its plan: resuming a checkpoint of another cluster shape, with the
    grad_accum_steps that keeps its global batch (GlobalBatchRefused when none does) and, on node
    0, the conversion the resume makes, both in the plan's lines."""
    from pretrain.launch import keep_resumed_global_batch
    from pretrain.reshard import planned_conversion

    notes: list[str] = []
    cfg = keep_resumed_global_batch(cfg, paths, notes.append)
    plan = make_plan(cfg, plan_vocab_size(cfg, paths))
    if leader and (conversion := planned_conversion(paths.checkpoints, cfg.train)):
        notes.append(conversion)
    plan.resume_notes = [note.removeprefix("train: ") for note in notes]
    return cfg, plan


def plan_vocab_size(cfg: PipelineConfig, paths=None) -> int:
    """The vocabulary the model will have: the shards' manifest when they exist, else the tokenizer config."""
    if paths is not None and (paths.shards / "manifest.json").exists():
        from pretrain_pipeline.artifacts import read_json

        return int(read_json(paths.shards / "manifest.json")["vocab_size"])
    return cfg.tokenizer.vocab_size


class PlanDoesNotFit(UserError):
    """The per-rank memory estimate exceeds train.plan.device_memory_gb."""


def check_fits(plan: Plan) -> None:
    if not plan.fits:
        raise PlanDoesNotFit(
            "refusing to launch: per-rank memory estimate exceeds train.plan.device_memory_gb\n  " + "\n  ".join(plan.lines())
        )
