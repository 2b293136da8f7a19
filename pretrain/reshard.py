"""Resume on another world size or ZeRO stage: a checkpoint's optimizer state, free of its topology.

``convert_checkpoint`` reads a DeepSpeed tag written at any ZeRO stage (0-3) and world size and
writes, per parameter name, the fp32 master weight, both Adam moments and the Adam step into
``<tag>/universal/`` (atomically, with ``_CONVERTED.json`` last, so the conversion is done once).
``load_into_engine`` puts that state into a freshly built engine of any stage and world size.

Why our own format and not DeepSpeed's universal checkpoint (``ds_to_universal`` +
``load_universal_checkpoint``): DeepSpeed 0.19's converter needs ``universal_checkpoint_info`` in the
client state (or ``--inject_missing_state``), it only reads ZeRO checkpoints, so our one-rank
ZeRO-0 run (optimizer state inside the model file, no partitions) has no universal form at all, and
its loaders read the converted files with ``torch.load(weights_only=False)``. Reading is the easy
half: DeepSpeed's own ``zero_to_fp32`` merges the fp32 partitions of ZeRO-1/2 and ZeRO-3, and the
same merge applied to the ``exp_avg``/``exp_avg_sq`` partitions (laid out exactly like the fp32
ones) gives the moments; every file is read with ``torch.load(weights_only=True)``. Writing uses
DeepSpeed's public ``safe_set_full_fp32_param``/``safe_set_full_optimizer_state``, which place a
full tensor into whatever partition this rank owns at stage 1, 2 or 3 (with or without offload),
and the torch optimizer's state directly at stage 0. One path works for every pair of stages.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from pretrain.checkpoint import (
    CLIENT_STATE_FILE,
    CheckpointError,
    deepspeed_safe_globals,
    safe_load,
    zero_stages_of,
)
from pretrain_pipeline.artifacts import atomic_write_json, read_json, sha256_file

UNIVERSAL_DIR = "universal"
STATE_FILE = "params.pt"
RECORD_FILE = "_CONVERTED.json"
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def optimizer_param_names(model: torch.nn.Module) -> list[list[str]]:
    """Each optimizer group's parameter names, in the order ``pretrain.engine.build_engine`` gives
    them to AdamW: what maps a ZeRO-0 checkpoint's positional optimizer state to names. Call it
    before ``build_engine``: ZeRO-3 partitioning hides the shapes the grouping is decided by."""
    from pretrain.engine import param_groups

    if any(hasattr(p, "ds_shape") for p in model.parameters()):
        raise ValueError("optimizer_param_names needs the model before DeepSpeed partitions it (ZeRO-3)")
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(model, 0.0)]


# ------------------------------------------------------------------------------------ reading


def _load(path: Path) -> dict[str, Any]:
    return safe_load(path, "cpu", deepspeed_safe_globals())


def _zero0_state(tag_dir: Path, param_names: list[list[str]] | None) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-0: full weights and the torch optimizer's state dict, both in the one model file."""
    path = tag_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{tag_dir} holds no {path.name} (not a ZeRO-0 DeepSpeed checkpoint)")
    saved = _load(path)
    optim = saved.get("optimizer")
    if not isinstance(optim, dict) or "state" not in optim:
        raise CheckpointError(
            f"{path} holds no torch optimizer state (a bf16/fp16 ZeRO-0 checkpoint cannot be converted)")
    if param_names is None:
        raise CheckpointError(
            f"{path} keeps its optimizer state by position: converting it needs the model's parameter names")
    groups = [g["params"] for g in optim["param_groups"]]
    if [len(g) for g in groups] != [len(n) for n in param_names]:
        raise CheckpointError(
            f"{path} has optimizer groups of {[len(g) for g in groups]} parameters, "
            f"the model {[len(n) for n in param_names]} (a different model)"
        )
    out = {}
    for indices, names in zip(groups, param_names):
        for index, name in zip(indices, names):
            weight = saved["module"][name].float()
            adam = optim["state"].get(index) or {}
            out[name] = {"fp32": weight,
                         **{k: adam.get(k, torch.zeros_like(weight)).float() for k in ADAM_KEYS},
                         "step": torch.as_tensor(adam.get("step", 0.0), dtype=torch.float32)}
    return out


def _merge_partitions(stage: int, world: int, flat_groups: list[list[torch.Tensor]], param_shapes: list,
                      paddings: list | None) -> dict[str, torch.Tensor]:
    """Full tensors by name from every rank's flat partitions, with DeepSpeed's own zero_to_fp32 merge."""
    from deepspeed.utils import zero_to_fp32

    merged: dict[str, Any] = {}
    model_state = [SimpleNamespace(param_shapes=param_shapes)]  # all the merge reads of the model files
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress line per call
        if stage <= 2:
            zero_to_fp32._zero2_merge_trainable_params(merged, world, flat_groups, model_state, paddings)
        else:
            zero_to_fp32._zero3_merge_trainable_params(merged, world, flat_groups, model_state)
    return {name: value.contiguous().float().clone() for name, value in merged.items()}


def _zero_state(tag_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """ZeRO-1/2/3: one optimizer file per rank, each with its flat fp32 partitions and Adam state."""
    from deepspeed.utils.zero_to_fp32 import get_model_state_files, get_optim_files

    param_shapes = _load(Path(get_model_state_files(str(tag_dir))[0]))["param_shapes"]
    ranks = [_load(Path(f))["optimizer_state_dict"] for f in get_optim_files(str(tag_dir))]
    stage = int(ranks[0]["zero_stage"])
    counts = ranks[0]["partition_count"]  # per param group at ZeRO-1/2
    world = max(counts) if isinstance(counts, list) else counts
    if len(ranks) != world:
        raise CheckpointError(f"{tag_dir} holds {len(ranks)} optimizer files for {world} ranks (a partial save)")
    flat_key, adam_key = ("single_partition_of_fp32_groups", "base_optimizer_state") if stage <= 2 else (
        "fp32_flat_groups", "optimizer_state_dict")
    adam = [r[adam_key]["state"] for r in ranks]
    if not isinstance(adam[0], dict):
        raise CheckpointError(f"{tag_dir}: elastic ZeRO checkpoints are not supported for conversion")
    groups = len(ranks[0][flat_key])
    if groups != len(param_shapes):
        raise CheckpointError(
            f"{tag_dir}: {groups} flat optimizer groups but {len(param_shapes)} groups of parameter shapes")
    paddings = ranks[0].get("param_alignment_paddings")
    fp32 = [r[flat_key] for r in ranks]
    merged = {"fp32": _merge_partitions(stage, world, fp32, param_shapes, paddings)}
    for key in ADAM_KEYS:
        flats = [[a.get(g, {}).get(key, torch.zeros_like(f[g])) for g in range(groups)] for a, f in zip(adam, fp32)]
        merged[key] = _merge_partitions(stage, world, flats, param_shapes, paddings)
    steps = [torch.as_tensor(adam[0].get(g, {}).get("step", 0.0), dtype=torch.float32) for g in range(groups)]
    # One Adam step per flat group; param_shapes lists the names of each flat group (ZeRO-3: of each
    # sub-group), in the order of the optimizer's state.
    group_of = {name: g for g, shapes in enumerate(param_shapes) for name in shapes}
    return {name: {**{k: merged[k][name] for k in ("fp32", *ADAM_KEYS)}, "step": steps[group_of[name]]}
            for name in merged["fp32"]}


def saved_topology(tag_dir: str | Path) -> tuple[int | None, int | str]:
    """(world size, ZeRO stage) that wrote a tag, from its client state, else from its files
    ("1/2" when only the files tell, as ZeRO-1 and 2 share one layout)."""
    tag_dir = Path(tag_dir)
    client = tag_dir / CLIENT_STATE_FILE
    world, stages = saved_layout(safe_load(client) if client.is_file() else {})
    stages = stages or zero_stages_of(tag_dir)
    world = world or len(list(tag_dir.glob("*_optim_states.pt"))) or None
    return world, stages[0] if len(stages) == 1 else "/".join(map(str, stages))


def read_checkpoint_state(tag_dir: str | Path,
                          param_names: list[list[str]] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per parameter name: ``fp32`` weight, ``exp_avg``, ``exp_avg_sq`` and Adam ``step`` of a tag
    written at any ZeRO stage and world size (``param_names``: needed for ZeRO-0, see
    :func:`optimizer_param_names`)."""
    tag_dir = Path(tag_dir)
    if zero_stages_of(tag_dir) == [0]:
        return _zero0_state(tag_dir, param_names)
    return _zero_state(tag_dir)


# ------------------------------------------------------------------------------------ the folder


def converted_dir(tag_dir: str | Path) -> Path:
    return Path(tag_dir) / UNIVERSAL_DIR


def conversion_record(tag_dir: str | Path) -> dict[str, Any] | None:
    """The record of a finished conversion of this tag whose file still matches it, else None."""
    out = converted_dir(tag_dir)
    record_path = out / RECORD_FILE
    if not record_path.is_file():
        return None
    try:
        record = read_json(record_path)
        ok = (out / STATE_FILE).stat().st_size == record["bytes"]
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    return record if ok else None


def convert_checkpoint(tag_dir: str | Path, out_dir: str | Path | None = None,
                       param_names: list[list[str]] | None = None) -> dict[str, Any]:
    """Write ``tag_dir``'s weights and Adam state, by parameter name, into ``out_dir`` (default
    ``<tag>/universal``) and return the record. Done once: a recorded conversion is returned as it
    is. The folder appears whole or not at all (written aside, renamed, record inside)."""
    tag_dir = Path(tag_dir)
    out = Path(out_dir) if out_dir else converted_dir(tag_dir)
    if out_dir is None and (record := conversion_record(tag_dir)):
        return {**record, "reused": True}
    started = time.perf_counter()
    state = read_checkpoint_state(tag_dir, param_names)
    world, stage = saved_topology(tag_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        torch.save({"params": state}, tmp / STATE_FILE)
        with open(tmp / STATE_FILE, "rb+") as f:
            os.fsync(f.fileno())
        record = {"source": str(tag_dir), "source_world_size": world, "source_zero_stage": stage,
                  "params": len(state), "bytes": (tmp / STATE_FILE).stat().st_size,
                  "sha256": sha256_file(tmp / STATE_FILE), "seconds": round(time.perf_counter() - started, 3),
                  "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        atomic_write_json(tmp / RECORD_FILE, record)
        shutil.rmtree(out, ignore_errors=True)  # an unrecorded (damaged) earlier conversion
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "reused": False}


def read_converted(state_dir: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    path = Path(state_dir) / STATE_FILE
    state = safe_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("params"), dict):
        raise CheckpointError(f"{path} does not hold converted optimizer state")
    return state["params"]


# ------------------------------------------------------------------------------------ loading


def _adam_params(ds: Any) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    """The torch optimizer that steps and the tensors it keeps Adam state for: the parameters at
    stage 0; ZeRO-1/2's flat fp32 partition per group; ZeRO-3's per sub-group (ZeRO-3 empties the
    optimizer's param groups between steps, so they are taken from ZeRO, not from the groups)."""
    stage = ds.zero_optimization_stage()
    if stage == 0:
        return ds.optimizer, [p for g in ds.optimizer.param_groups for p in g["params"]]
    flats = ds.optimizer.single_partition_of_fp32_groups if stage < 3 else ds.optimizer.fp32_partitioned_groups_flat
    return ds.optimizer.optimizer, list(flats)


def _ensure_adam_state(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> None:
    """Create AdamW's (lazily made) state as its first step would, so it can be written into."""
    for p in tensors:
        state = optimizer.state[p]
        state.setdefault("step", torch.tensor(0.0, dtype=torch.float32))
        for key in ADAM_KEYS:
            state.setdefault(key, torch.zeros_like(p, memory_format=torch.preserve_format))


def _set_step(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor], steps: set[float]) -> None:
    if len(steps) != 1:  # ZeRO keeps one step per flat group: a mixed history cannot be laid out
        raise CheckpointError(
            f"parameters were stepped different numbers of times ({sorted(steps)}); cannot re-partition")
    (step,) = steps
    for p in tensors:
        optimizer.state[p]["step"] = torch.tensor(step, dtype=torch.float32)


def load_into_engine(engine: Any, state_dir: str | Path) -> int:
    """Set every parameter's fp32 master weight, model weight, Adam moments and step from a
    converted folder, whatever this engine's stage and world size; returns the Adam step.

    Every rank calls it (ZeRO-3 gathers each parameter to write it)."""
    ds = getattr(engine, "ds", engine)
    params = read_converted(state_dir)
    named = [(n, p) for n, p in ds.module.named_parameters() if p.requires_grad]
    missing = sorted({n for n, _ in named} - set(params))
    if missing or len(named) != len(params):
        extra = sorted(set(params) - {n for n, _ in named})
        raise CheckpointError(f"{state_dir} does not match this model: missing {missing[:5]}, unexpected {extra[:5]}")
    optimizer, adam_tensors = _adam_params(ds)
    _ensure_adam_state(optimizer, adam_tensors)
    stage = ds.zero_optimization_stage()
    if stage == 0:
        for name, p in named:
            saved = params[name]
            p.data.copy_(saved["fp32"])
            state = optimizer.state[p]
            for key in ADAM_KEYS:
                state[key].copy_(saved[key])
            state["step"] = saved["step"].clone().float()
    else:
        _load_partitions(ds, named, params, stage)
        _set_step(optimizer, adam_tensors, {float(params[n]["step"]) for n, _ in named})
    step = int(max(float(params[n]["step"]) for n, _ in named))
    ds.global_steps, ds.global_samples = step, step * ds.train_batch_size()
    return step


def _load_partitions(ds: Any, named: list, params: dict, stage: int) -> None:
    """ZeRO-1/2/3: each rank writes the slice of every tensor it owns; then the model weights."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    if stage in (1, 2):
        # Point each parameter's fragment at the Adam state created above. DeepSpeed links them
        # once, after its first group's first step, so later groups would stay unlinked.
        ds.optimizer._hp_optimizer_states_linked = False
        ds.optimizer._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        safe_set_full_fp32_param(p, params[name]["fp32"])
        for key in ADAM_KEYS:
            safe_set_full_optimizer_state(p, params[name][key], key)
    if stage == 3:  # partitioned weights: gather, write the full values, re-partition
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
            for name, p in named:
                p.data.copy_(params[name]["fp32"])
    else:  # whole weights on every rank (the flat bit16 groups), apart from the fp32 masters
        for name, p in named:
            p.data.copy_(params[name]["fp32"])


# ------------------------------------------------------------------------------------ resuming


def topology(world: int | None, stage: int | str) -> str:
    """"2 ranks ZeRO-2", "1 rank ZeRO-0" for log lines and events."""
    ranks = "? ranks" if world is None else f"{world} rank{'' if world == 1 else 's'}"
    return f"{ranks} ZeRO-{stage}"


def saved_layout(state: dict[str, Any]) -> tuple[int | None, list[int]]:
    """(world size, possible ZeRO stages) that wrote a checkpoint, from its client state; older
    checkpoints that did not record them are judged by their files and per-rank RNG states."""
    stages = [state["zero_stage"]] if "zero_stage" in state else state.get("zero_stages_from_files", [])
    return state.get("world_size") or len(state.get("rng", [])) or None, list(stages)


def needs_conversion(state: dict[str, Any], zero_stage: int, world: int) -> bool:
    """Whether DeepSpeed's own load cannot continue this checkpoint on ``zero_stage`` x ``world``.

    DeepSpeed lays optimizer state out per stage, and under ZeRO per rank: it reads neither another
    stage's files nor ZeRO partitions of another world size. ZeRO-0 state is whole (any world size);
    ZeRO-1 and 2 share one layout. Nothing recorded at all: DeepSpeed's load decides.
    """
    saved_world, stages = saved_layout(state)
    if not stages:
        return False
    return not (zero_stage in stages and (zero_stage == 0 or saved_world == world))


def load_converted_checkpoint(engine: Any, tag_dir: str | Path, param_names: list[list[str]]) -> dict[str, Any]:
    """Every rank: rank 0 converts ``tag_dir`` (or reuses its recorded conversion), then all load
    it. Returns the conversion record (``seconds``: the conversion's time, ``reused``)."""
    import torch.distributed as dist

    outcome: list[Any] = [None, None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = convert_checkpoint(tag_dir, param_names=param_names)
        except (CheckpointError, OSError, RuntimeError, KeyError, ValueError) as err:
            outcome[1] = f"cannot convert checkpoint {tag_dir} for this world size / ZeRO stage: {err}"
    dist.broadcast_object_list(outcome, src=0)
    record, error = outcome
    if error:
        raise CheckpointError(error)
    load_into_engine(engine, converted_dir(tag_dir))
    return record


def planned_conversion(checkpoint_dir: str | Path, train_cfg: Any) -> str | None:
    """The plan's line when ``train.resume: auto`` will convert the latest checkpoint, else None."""
    from pretrain.checkpoint import latest_tag, load_client_state
    from pretrain.engine import effective_zero_stage

    world = train_cfg.launch.nproc_per_node * train_cfg.launch.nnodes
    zero_stage = effective_zero_stage(train_cfg, world)
    tag = latest_tag(checkpoint_dir, verify=False, warn=lambda _: None) if Path(checkpoint_dir).is_dir() else None
    if train_cfg.resume != "auto" or tag is None:
        return None
    state = load_client_state(checkpoint_dir, tag)
    if "zero_stage" not in state:
        state["zero_stages_from_files"] = zero_stages_of(Path(checkpoint_dir) / tag)
    if not needs_conversion(state, zero_stage, world):
        return None
    saved_world, stages = saved_layout(state)
    done = " (converted before: reused)" if conversion_record(Path(checkpoint_dir) / tag) else ""
    return (f"resume: {tag} was written by {topology(saved_world, '/'.join(map(str, stages)))}; this launch runs "
            f"{topology(world, zero_stage)}: its weights and optimizer state are converted once at start{done}")
