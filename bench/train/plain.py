"""The baseline for bench/train: a plain PyTorch training loop, nanoGPT style.

    python bench/train/plain.py --run-dir DIR --out FILE                      # 1 process
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/train/plain.py ...   # DDP, gloo

Same model class (``pretrain.model.GPT``), same init seed, same AdamW with the same parameter
groups, same LR schedule, same gradient clipping and the same data loader (``ShardDataset``) as
``pretrain.trainer``, read from the run's ``config.yaml``; none of DeepSpeed, ZeRO, checkpoints,
per-step collectives or metric logging. The driver starts it with the environment
``pretrain.launch.build_env`` gives the ranks, so thread counts match. Tokens/s are measured the way
``pretrain.trainer`` measures them: per window of ``train.log_every`` steps, written to ``--out`` as
``{"step": s, "train/tokens_per_s": r}`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.data import ShardDataset, load_manifest
from pretrain.engine import lr_at, param_groups
from pretrain.model import GPT, resolve_vocab_size
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    paths = RunPaths(args.run_dir.resolve())
    cfg = load_config(paths.config)
    tc = cfg.train
    ddp = "WORLD_SIZE" in os.environ
    rank, world = 0, 1
    if ddp:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()

    manifest = load_manifest(paths.shards)
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model, resolve_vocab_size(cfg.model, manifest.vocab_size))
    torch.manual_seed(tc.seed + rank)
    optimizer = torch.optim.AdamW(param_groups(model, tc.optimizer.weight_decay), lr=lr_at(0, tc),
                                  betas=(tc.optimizer.beta1, tc.optimizer.beta2), eps=1e-8)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model)
    data = ShardDataset(manifest, "train", cfg.model.block_size, tc.micro_batch_size, rank, world, tc.seed, verify=False)
    tokens_per_step = tc.micro_batch_size * tc.grad_accum_steps * cfg.model.block_size * world

    records = []
    model.train()
    t0, window_tokens = time.perf_counter(), 0
    for step in range(1, tc.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, tc)
        for micro in range(tc.grad_accum_steps):
            x, y = data.next_batch()
            # DDP: all-reduce only on the last micro-batch, as DeepSpeed does at the boundary.
            sync = not ddp or micro == tc.grad_accum_steps - 1
            with model.no_sync() if not sync else torch.enable_grad():
                _, loss = model(x, y)
                (loss / tc.grad_accum_steps).backward()
        if tc.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.optimizer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += tokens_per_step
        if step % tc.log_every == 0 or step == tc.max_steps or step == 1:
            elapsed = time.perf_counter() - t0
            records.append({"step": step, "train/loss": float(loss), "train/tokens_per_s": window_tokens / elapsed})
            t0, window_tokens = time.perf_counter(), 0
    if rank == 0:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
