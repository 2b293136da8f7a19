"""Which device training runs on: one rule for the launcher and for each rank."""

from __future__ import annotations

from pretrain_pipeline.errors import UserError


def resolve_device(device: str) -> str:
    """``train.device`` for this process: ``auto`` is cuda when a GPU is visible here, else cpu.

    An explicit ``cuda`` is kept even without a visible GPU: a launcher or Ray driver may run on a
    host without the ranks' GPUs. ``rank_device`` is where a rank refuses it.
    """
    import torch  # here, not at the top: the CLI imports the launcher without needing torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def rank_device(device: str, local_rank: int) -> str:
    """This rank's torch device, ``cpu`` or ``cuda:<local_rank>`` (then made current)."""
    import torch

    resolved = resolve_device(device)
    if resolved == "cpu":
        return resolved
    if not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is visible (--set train.device=cpu runs on the CPU)")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"
