"""The pre-launch plan and the MFU formula, checked against hand counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.plan import GiB, PlanDoesNotFit, check_fits, make_plan, mfu, peak_flops
from pretrain_pipeline.config import build_config, merge_tree


def cfg(**train):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "vocab_size": 320},
            "tokenizer": {"vocab_size": 320},
            "train": merge_tree(
                {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 100, "launch": {"nproc_per_node": 2}}, train
            ),
        }
    )


def test_param_and_flop_count_by_hand():
    p = make_plan(cfg(), 320)
    d, L, V, T = 64, 2, 320, 32
    # per block: ln1, ln2 (2d each), qkv (3d^2+3d), proj (d^2+d), fc (4d^2+4d), fc-proj (4d^2+d)
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    total = V * d + T * d + L * block + 2 * d  # tied lm_head, final ln
    assert p.params_total == total and p.params == total - T * d
    assert p.flops_per_token == 6 * p.params + 12 * L * d * T


def test_mfu_hand_count():
    # 1000 tokens/s * 6e9 FLOPs/token = 6e12 FLOP/s over 2 devices of 10 TFLOP/s -> 30 %.
    assert mfu(1000.0, 6e9, 2, 10e12) == pytest.approx(0.30)
    assert peak_flops(0, "NVIDIA H100 80GB HBM3") == 989e12 and peak_flops(0, "NVIDIA A100-SXM4") == 312e12
    assert peak_flops(0, "NVIDIA H200") == 989e12 and peak_flops(0, "cpu") is None and peak_flops(5, "cpu") == 5e12


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_stages_shard_memory(precision):
    plans = {s: make_plan(cfg(zero={"stage": s}, precision=precision), 320) for s in (0, 1, 2, 3)}
    n = plans[0].params_total
    w, g, o = (4, 4, 8) if precision == "fp32" else (2, 2, 12)
    assert plans[0].weights_gb * GiB == n * w and plans[0].optimizer_gb * GiB == n * o
    # ZeRO adds an fp32 master partition (4 bytes) beside the moments, also in fp32 training.
    assert plans[1].optimizer_gb * GiB == n * 12 / 2 and plans[1].grads_gb == plans[0].grads_gb
    assert plans[2].grads_gb == plans[0].grads_gb / 2
    assert plans[3].weights_gb == plans[0].weights_gb / 2
    assert plans[3].total_gb < plans[2].total_gb < plans[1].total_gb < plans[0].total_gb
    assert make_plan(cfg(zero={"stage": 2, "offload_optimizer": True}), 320).optimizer_gb == 0
    # One rank has nothing to partition: the plan counts the stage that runs (fp32: 0, else 1).
    one_rank = {s: make_plan(cfg(zero={"stage": s}, precision=precision), 320, world_size=1) for s in (0, 1, 3)}
    runs_as = 0 if precision == "fp32" else 1
    assert one_rank[3].total_gb == one_rank[1].total_gb == make_plan(cfg(zero={"stage": runs_as}, precision=precision), 320, world_size=1).total_gb
    assert one_rank[3].zero_stage.startswith(f"3 (runs as {runs_as}")


def test_tokens_and_refusal():
    p = make_plan(cfg(plan={"peak_tflops": 100, "planned_mfu": 0.5}), 320)
    assert p.tokens_per_step == 4 * 2 * 32 * 2 and p.tokens == 100 * p.tokens_per_step
    assert p.eta_hours == pytest.approx(p.tokens * p.flops_per_token / (2 * 100e12 * 0.5) / 3600)
    check_fits(make_plan(cfg(plan={"device_memory_gb": 80}), 320))
    with pytest.raises(PlanDoesNotFit, match="device_memory_gb"):
        check_fits(make_plan(cfg(plan={"device_memory_gb": 1e-6}), 320))


def test_cli_plan_refuses(capsys):
    from pretrain_pipeline.cli import main

    assert main(["plan", "-c", str(Path(__file__).resolve().parent.parent / "configs/smoke.yaml"), "--set", "train.plan.device_memory_gb=0.000001", "--set", "model.n_layer=2"]) == 2
    out, err = capsys.readouterr()
    assert "per-rank memory" in out and err.startswith("error: train.plan.device_memory_gb")


def test_named_accelerator_gives_an_eta_on_any_machine(capsys):
    from pretrain_pipeline.cli import main

    p = make_plan(cfg(accelerator="h100"), 320)
    # 2 ranks at 989 TFLOP/s (H100 SXM, bf16 dense) and the default assumed MFU of 40 %.
    assert p.eta_hours == pytest.approx(p.tokens * p.flops_per_token / (2 * 989e12 * 0.4) / 3600)
    assert p.lines()[2].endswith(f"ETA {p.eta_hours:.2f} h on 2 x H100 (989 TFLOP/s peak, assumed MFU 40%)")
    a100 = make_plan(cfg(accelerator="a100", plan={"planned_mfu": 0.5}), 320)
    assert a100.eta_hours == pytest.approx(p.eta_hours * 989 / 312 * 0.4 / 0.5)
    assert "on 2 x A100 (312 TFLOP/s peak, assumed MFU 50%)" in a100.lines()[2]
    if not torch.cuda.is_available():
        assert "ETA n/a (no peak FLOP/s known for this device: set train.accelerator" in make_plan(cfg(), 320).lines()[2]
    smoke = str(Path(__file__).resolve().parent.parent / "configs/smoke.yaml")
    assert main(["plan", "-c", smoke, "--set", "train.accelerator=h200", "--set", "model.n_layer=2"]) == 0
    assert "on 2 x H200 (989 TFLOP/s peak, assumed MFU 40%)" in capsys.readouterr().out


def test_plan_of_a_resume_on_another_world_size_shows_the_accumulation_that_keeps_the_global_batch(tmp_path, capsys):
    """A checkpoint of 2 ranks x accumulation 2 planned on 1 rank: the plan counts accumulation 4,
    says so and names the conversion; on 3 ranks it is refused with the numbers (CLI: status 2)."""
    from pretrain.checkpoint import save_client_state, write_completion_record
    from pretrain.global_batch import BatchLayout, GlobalBatchRefused
    from pretrain.plan import plan_launch
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.cli import main

    paths = RunPaths(tmp_path / "resumed")
    tag_dir = paths.checkpoints / "step_000006"
    tag_dir.mkdir(parents=True)
    save_client_state(tag_dir, {"step": 6, "world_size": 2, "zero_stage": 2, "data": BatchLayout(4, 2, 2).state()})
    write_completion_record(tag_dir)
    def on_ranks(world: int):
        base = cfg(launch={"nproc_per_node": world})
        return base.model_copy(update={"runtime": base.runtime.model_copy(update={"runs_root": str(tmp_path),
                                                                                  "run_name": "resumed"})})

    resumed, plan = plan_launch(on_ranks(1), paths)
    assert resumed.train.grad_accum_steps == 4 and plan.world_size == 1
    assert plan.tokens_per_step == 16 * 32 and plan.tokens == 100 * 16 * 32  # 16 samples of 32 tokens, as saved
    assert any("grad_accum_steps 4 keeps it on 1 rank(s) (16 samples = 4 x 4 x 1 rank; configured 2)" in line
               for line in plan.lines())
    assert any(line.startswith("resume: step_000006 was written by 2 ranks ZeRO-2; this launch runs 1 rank ZeRO-0")
               for line in plan.lines())
    sets = [f"runtime.runs_root={tmp_path}", "runtime.run_name=resumed", "train.micro_batch_size=4", "model.n_layer=2"]
    args = ["plan", "-c", str(Path(__file__).resolve().parent.parent / "configs/smoke.yaml")]
    assert main([*args, *[a for s in sets for a in ("--set", s)], "--set", "train.launch.nproc_per_node=1"]) == 0
    assert "grad_accum_steps 4 keeps it on 1 rank(s)" in capsys.readouterr().out
    assert main([*args, *[a for s in sets for a in ("--set", s)], "--set", "train.launch.nproc_per_node=3"]) == 2
    assert "on 3 ranks with micro_batch_size 4 no grad_accum_steps fits" in capsys.readouterr().err
    with pytest.raises(GlobalBatchRefused):
        plan_launch(on_ranks(3), paths)
