"""Per-rank parameter + gradient + optimizer memory of the real DeepSpeed engines, ZeRO 0/1/2/3.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \
        bench/train/memory.py --run-dir DIR --out FILE

For each stage, ``pretrain.engine.build_engine`` (what training uses) wraps a fresh
``pretrain.model.GPT`` from the run's ``config.yaml``; one full step creates the optimizer state,
then a second forward + backward leaves the gradients in place, and the rank counts the tensors it
holds at that point, each storage once (ZeRO keeps flat buffers that parameters are views into):

* weights: the model's working parameters (ZeRO-3: this rank's partitions plus the parameters it
  keeps whole, see ``stage3_param_persistence_threshold``);
* grads: ``.grad`` tensors and ZeRO's gradient partitions and buffers;
* master: the fp32 copy of this rank's partition that the optimizer steps (ZeRO 1-3 keep one even
  in fp32 training);
* adam: the optimizer's ``exp_avg``/``exp_avg_sq`` (and step counters);
* other: any other tensor the ZeRO optimizer holds.

CPU has no allocator statistics, so this counts tensors instead of reading an allocator peak; it
leaves out activations and transient communication buffers. Rank 0 writes one JSON line per stage
(every rank's numbers) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pretrain.data import ShardDataset, load_manifest
from pretrain.model import GPT, resolve_vocab_size
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import load_config


def tensors_in(obj: Any, grads: bool = True, depth: int = 0) -> Iterator[torch.Tensor]:
    """Tensors in (nested lists/tuples/dicts of) an attribute, with their ``.grad`` if ``grads``."""
    if isinstance(obj, torch.Tensor):
        yield obj
        if grads and obj.grad is not None:
            yield obj.grad
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v, grads, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, grads, depth + 1)


class StorageLedger:
    """Bytes per category, each tensor storage counted once (by the first category that claims it)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def claim(self, category: str, tensors: Iterator[torch.Tensor]) -> None:
        total = self.bytes.setdefault(category, 0)
        for t in tensors:
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        self.bytes[category] = total


def held_bytes(engine, model: torch.nn.Module) -> dict[str, int]:
    zero_opt = engine.ds.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    attrs = {k: v for k, v in vars(zero_opt).items() if k != "optimizer"} if zero_opt is not inner else {}
    params = list(model.parameters())
    ledger = StorageLedger()
    # Working weights first: partitions (ZeRO-3 ds_tensor), or the full tensors / flat buffers.
    ledger.claim("weights", (p.ds_tensor for p in params if hasattr(p, "ds_tensor")))
    ledger.claim("weights", (p.data for p in params))
    ledger.claim("weights", (t for k, v in attrs.items() if "bit16_groups_flat" in k or "fp16_partitioned" in k
                             or k == "lp_param_buffer" for t in tensors_in(v)))
    ledger.claim("grads", (p.grad for p in params if p.grad is not None))
    ledger.claim("grads", (t for k, v in attrs.items() if "grad" in k.lower() for t in tensors_in(v)))
    ledger.claim("adam", (t for state in inner.state.values() for t in tensors_in(state)))
    ledger.claim("master", (p for g in inner.param_groups for p in g["params"]))
    ledger.claim("grads", (t.grad for k, v in attrs.items() if "fp32" in k for t in tensors_in(v, grads=False)
                           if t.grad is not None))
    # ZeRO-3 swaps its fp32 partitions into the optimizer's groups only around step().
    ledger.claim("master", (t for k, v in attrs.items() if "fp32" in k for t in tensors_in(v, grads=False)))
    ledger.claim("grads", (p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None))
    ledger.claim("other", (t for v in attrs.values() for t in tensors_in(v)))
    out = dict(ledger.bytes)
    out["total"] = sum(ledger.bytes.values())
    out["persistent_params"] = sum(1 for p in params if getattr(p, "ds_persist", False))
    return out


def main() -> None:
    import pretrain.engine as engine_mod
    from pretrain.distributed import init_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--persistence-threshold", type=int, default=None,
                    help="also measure ZeRO-3 with this stage3_param_persistence_threshold")
    args = ap.parse_args()
    paths = RunPaths(args.run_dir.resolve())
    cfg = load_config(paths.config)
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = load_manifest(paths.shards)
    vocab = resolve_vocab_size(cfg.model, manifest.vocab_size)
    data = ShardDataset(manifest, "train", cfg.model.block_size, cfg.train.micro_batch_size, rank, world, cfg.train.seed,
                        verify=False)
    cases: list[tuple[str, int, dict[str, Any]]] = [(f"ZeRO-{s}", int(s), {}) for s in args.stages.split(",")]
    if args.persistence_threshold is not None:
        cases.append((f"ZeRO-3 persist<{args.persistence_threshold}", 3,
                      {"stage3_param_persistence_threshold": args.persistence_threshold}))
    ds_config = engine_mod.deepspeed_config

    def with_extra(extra: dict[str, Any]):
        def make(train_cfg, world_size):
            generated = ds_config(train_cfg, world_size)
            generated["zero_optimization"].update(extra)
            return generated
        return make

    records = []
    for label, stage, extra in cases:
        # Only the "what if" row changes DeepSpeed's config; the rest is exactly what training builds.
        engine_mod.deepspeed_config = with_extra(extra)
        torch.manual_seed(cfg.train.seed)
        model = GPT(cfg.model, vocab)
        tc = cfg.train.model_copy(update={"zero": cfg.train.zero.model_copy(update={"stage": stage})})
        engine = engine_mod.build_engine(model, tc, world)
        for i in range(2):
            x, y = data.next_batch()
            _, loss = engine(x, y)
            engine.backward(loss)
            if i == 0:
                engine.step()
        mine = held_bytes(engine, model)
        engine.step()
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, mine)
        records.append({"case": label, "stage": stage, "world_size": world, "per_rank": per_rank,
                        "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())})
        del engine, model
        gc.collect()
        dist.barrier()
    engine_mod.deepspeed_config = ds_config
    if rank == 0:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in records))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
