"""Reading DeepSpeed checkpoints without DeepSpeed's launcher (for eval and export)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch

TAG_RE = re.compile(r"^step_(\d{6,})$")


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def list_tags(checkpoint_dir: str | Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def latest_tag(checkpoint_dir: str | Path) -> str | None:
    latest = Path(checkpoint_dir) / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (Path(checkpoint_dir) / tag).is_dir():
            return tag
    tags = list_tags(checkpoint_dir)
    return tags[-1] if tags else None


def prune_checkpoints(checkpoint_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` tags (never the one ``latest`` points at)."""
    tags = list_tags(checkpoint_dir)
    protected = latest_tag(checkpoint_dir)
    removed = []
    for tag in tags[: max(0, len(tags) - keep)]:
        if tag != protected:
            shutil.rmtree(Path(checkpoint_dir) / tag, ignore_errors=True)
            removed.append(tag)
    return removed


def load_consolidated_state_dict(checkpoint_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint written at any ZeRO stage and world size."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} in {checkpoint_dir}")
    tag_dir = checkpoint_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    else:  # ZeRO stage 0: the model file holds the full weights
        files = sorted(tag_dir.glob("*mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states")
        state = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in state.items()}


def load_client_state(checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """Our training state saved next to the weights (step, tokens, data cursor, wandb id)."""
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    files = sorted((checkpoint_dir / str(tag)).glob("*mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no checkpoint {tag} in {checkpoint_dir}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    return state.get("pretrain", {})
