"""Checkpoints move between world sizes and ZeRO stages (real DeepSpeed engines, CPU + gloo).

Each case trains a tiny GPT a few steps on topology A, saves with the pipeline's save, converts
(``pretrain.reshard.convert_checkpoint``) and loads into a fresh engine of topology B
(``load_into_engine``). The fp32 weights, both Adam moments and the Adam step that B's engine holds
afterwards must equal, exactly and parameter by parameter, what A's engine held when it saved, read
from the live engines with DeepSpeed's ``safe_get_full_*`` (not from the files the converter reads).
Both then take one more step on the same global batch: their weights agree up to reduction order.

The ranks are this file run under torchrun (``worker`` below); one launch per world size trains
every source topology, and one per world size loads every case, each job on a fresh engine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration

STEPS = 3
GLOBAL_BATCH, BLOCK, VOCAB = 4, 16, 320
TAG = f"step_{STEPS:06d}"


def batch(step: int) -> torch.Tensor:
    """The global batch of ``step``, the same whatever the world size (ranks take equal slices)."""
    return torch.randint(0, VOCAB, (GLOBAL_BATCH, BLOCK + 1), generator=torch.Generator().manual_seed(1000 + step))


def engine_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """fp32 weight, Adam moments and step per parameter, read from the live engine (all ranks call)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ds = engine.ds
    zero = ds.zero_optimization()
    inner = ds.optimizer.optimizer if zero else ds.optimizer
    steps = {float(s["step"]) for s in inner.state.values()}
    if zero and ds.zero_optimization_stage() < 3:
        # DeepSpeed links parameters to their Adam state after its first group's first step, before
        # the later groups have state: link again so every group's moments can be read.
        ds.optimizer._hp_optimizer_states_linked = False
        ds.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in ds.module.named_parameters():
        if zero:
            fp32 = safe_get_full_fp32_param(p)
            moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
            step = torch.tensor(steps.copy().pop())
            assert len(steps) == 1, steps
        else:
            state = inner.state[p]
            fp32, moments, step = p.data, {k: state[k] for k in ("exp_avg", "exp_avg_sq")}, state["step"]
        out[name] = {"fp32": fp32.detach().clone().float(), **{k: v.detach().clone().float() for k, v in moments.items()},
                     "step": step.detach().clone().float()}
    return out


def train_step(engine, step: int, rank: int, world: int) -> None:
    rows = batch(step).chunk(world)[rank]
    engine.set_lr(step)
    _, loss = engine(rows[:, :-1], rows[:, 1:])
    engine.backward(loss)
    engine.step()


def worker(args) -> None:
    import torch.distributed as dist

    from pretrain.distributed import init_distributed

    init_distributed("gloo")
    for job in args.job:  # "<stage>[o]:<dir>", o = optimizer offload
        stage, _, workdir = job.partition(":")
        run_job(args.phase, int(stage.rstrip("o")), stage.endswith("o"), Path(workdir))
    dist.destroy_process_group()


def run_job(phase: str, stage: int, offload: bool, out: Path) -> None:
    """Train and save, or convert and load, in ``out`` on a fresh engine of ``stage``; rank 0 saves
    what the engine held to ``out/<phase>.pt``."""
    import torch.distributed as dist

    from pretrain.checkpoint import save_checkpoint
    from pretrain.engine import build_engine, effective_zero_stage
    from pretrain.model import GPT
    from pretrain.reshard import convert_checkpoint, converted_dir, load_into_engine, optimizer_param_names
    from pretrain_pipeline.config import ModelConfig, TrainConfig

    rank, world = dist.get_rank(), dist.get_world_size()
    tc = TrainConfig.model_validate({
        "micro_batch_size": GLOBAL_BATCH // world, "device": "cpu", "optimizer": {"lr": 3e-3},
        "schedule": {"warmup_steps": 1, "kind": "constant"},
        "zero": {"stage": stage, "offload_optimizer": offload}})
    torch.manual_seed(0 if phase == "train" else 1234)  # the loaded run starts from other weights
    model = GPT(ModelConfig.model_validate({"preset": "tiny", "block_size": BLOCK}), VOCAB)
    names = optimizer_param_names(model)  # before ZeRO-3 partitions the model
    engine = build_engine(model, tc, world)
    checkpoints = out / "checkpoints"
    if phase == "train":
        for step in range(STEPS):
            train_step(engine, step, rank, world)
        client = {"step": STEPS, "world_size": world, "zero_stage": effective_zero_stage(tc, world)}
        save_checkpoint(engine, checkpoints, TAG, client, keep=1)
    else:
        if rank == 0:
            record = convert_checkpoint(checkpoints / TAG, param_names=names)
            (out / "record.json").write_text(json.dumps(record))
        dist.barrier()
        assert load_into_engine(engine, converted_dir(checkpoints / TAG)) == STEPS
    state = engine_state(engine)
    train_step(engine, STEPS, rank, world)  # one more step on the same global batch
    after = {name: value["fp32"] for name, value in engine_state(engine).items()}
    if rank == 0:
        torch.save({"state": state, "after": after}, out / f"{phase}.pt")
    dist.barrier()
    del engine, model  # the next job builds its own


def run_phase(phase: str, world: int, jobs: dict[Path, str]) -> dict[Path, dict]:
    """One torchrun of ``world`` ranks doing ``jobs`` (directory -> "<stage>[o]"), in order."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), __file__,
           "--phase", phase] + [a for workdir, stage in jobs.items() for a in ("--job", f"{stage}:{workdir}")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {workdir: torch.load(workdir / f"{phase}.pt", weights_only=True) for workdir in jobs}


SOURCES = [(1, 0), (2, 1), (2, 2), (2, 3)]
# (source, target); a target (world, stage, True) offloads the optimizer. ZeRO-3 jobs last in a launch.
CASES = {
    "2r-zero2_to_1r-zero0": ((2, 2), (1, 0)),
    "2r-zero3_to_1r-zero0": ((2, 3), (1, 0)),
    "2r-zero3_to_2r-zero2-offload-optimizer": ((2, 3), (2, 2, True)),
    "1r-zero0_to_2r-zero3": ((1, 0), (2, 3)),
    "2r-zero1_to_2r-zero3": ((2, 1), (2, 3)),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(world, stage, into)``: a copy in ``into`` of the run trained on that topology and
    what its engine held when it saved. Every topology trains once, one launch per world size."""
    runs: dict[tuple[int, int], tuple[Path, dict]] = {}
    for world in (1, 2):
        jobs = {tmp_path_factory.mktemp(f"train_{w}r_zero{s}"): str(s) for w, s in SOURCES if w == world}
        held = run_phase("train", world, jobs)
        for (workdir, stage), saved in zip(jobs.items(), held.values()):
            runs[world, int(stage)] = workdir, saved

    def copy_of(world: int, stage: int, into: Path) -> dict:
        workdir, saved = runs[world, stage]
        shutil.copytree(workdir / "checkpoints", into / "checkpoints")
        return saved

    return copy_of


@pytest.fixture(scope="module")
def loaded(trained, tmp_path_factory):
    """Case id -> (its directory, what the source engine held, what the target engine held)."""
    out = {}
    for world in (1, 2):
        jobs, saved = {}, {}
        for case, (source, target) in CASES.items():
            if target[0] == world:
                workdir = tmp_path_factory.mktemp(case)
                saved[workdir] = case, trained(*source, workdir)
                jobs[workdir] = f"{target[1]}{'o' if target[2:] else ''}"
        for workdir, held in run_phase("load", world, jobs).items():
            case, source_held = saved[workdir]
            out[case] = workdir, source_held, held
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_optimizer_state_moves_exactly_between_topologies(case, loaded):
    source, _ = CASES[case]
    workdir, saved, loaded = loaded[case]
    assert sorted(saved["state"]) == sorted(loaded["state"]) and len(saved["state"]) > 10
    for name, want in saved["state"].items():
        got = loaded["state"][name]
        for key in ("fp32", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[key], want[key]), (name, key)
    assert float(saved["state"][name]["step"]) == STEPS
    assert saved["state"][name]["exp_avg_sq"].abs().sum() > 0  # real moments, not zeros on both sides
    # The step after: only the reduction order differs. Attention's key bias has a gradient of ~0
    # (softmax ignores it) that Adam scales up to a full step, so that noise shows at ~2e-6 of a
    # 3e-3 update: the bound is 1/300 of the update, not a relative one.
    for name, want in saved["after"].items():
        torch.testing.assert_close(loaded["after"][name], want, rtol=1e-5, atol=1e-5, msg=name)
    record = json.loads((workdir / "record.json").read_text())
    assert (record["source_world_size"], record["source_zero_stage"], record["reused"]) == (*source, False)


def test_conversion_is_recorded_and_done_once(trained, tmp_path):
    from pretrain.reshard import RECORD_FILE, convert_checkpoint, converted_dir, planned_conversion
    from pretrain_pipeline.config import TrainConfig

    trained(2, 2, tmp_path)
    tag_dir = tmp_path / "checkpoints" / TAG
    def plan_for(world: int, stage: int, resume: str = "auto") -> str | None:
        cfg = TrainConfig.model_validate({"zero": {"stage": stage}, "launch": {"nproc_per_node": world}, "resume": resume})
        return planned_conversion(tmp_path / "checkpoints", cfg)

    assert plan_for(2, 2) is None and plan_for(1, 2, resume="never") is None  # DeepSpeed's own load; no resume
    plan = plan_for(1, 2)  # fp32 on one rank runs ZeRO-0
    assert plan.startswith(f"resume: {TAG} was written by 2 ranks ZeRO-2; this launch runs 1 rank ZeRO-0") and "reused" not in plan
    first = convert_checkpoint(tag_dir)
    assert plan_for(2, 3).endswith("(converted before: reused)")
    state_file = converted_dir(tag_dir) / "params.pt"
    mtime = state_file.stat().st_mtime_ns
    again = convert_checkpoint(tag_dir)
    assert again["reused"] and again["sha256"] == first["sha256"] and state_file.stat().st_mtime_ns == mtime
    assert not [p for p in tag_dir.iterdir() if ".tmp-" in p.name]  # nothing left aside
    # A conversion whose file no longer matches its record is done again, not trusted.
    state_file.write_bytes(b"truncated")
    redone = convert_checkpoint(tag_dir)
    assert not redone["reused"] and redone["sha256"] == first["sha256"]
    assert (converted_dir(tag_dir) / RECORD_FILE).is_file()


def test_zero0_conversion_needs_the_parameter_names(trained, tmp_path):
    from pretrain.checkpoint import CheckpointError
    from pretrain.reshard import convert_checkpoint

    trained(1, 0, tmp_path)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt keeps its optimizer state by position"):
        convert_checkpoint(tmp_path / "checkpoints" / TAG)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--phase", choices=["train", "load"], required=True)
    parser.add_argument("--job", action="append", required=True, help="<stage>[o]:<dir>, o = optimizer offload")
    parser.add_argument("--local_rank", type=int, default=None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    worker(parser.parse_args())
