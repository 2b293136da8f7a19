"""The CUDA path on the machine's first GPU (``make test-gpu``; every test skips without CUDA).

- NCCL: the trainer's process-group set-up (``pretrain.distributed.init_distributed``) over NCCL on one GPU.
- SDPA: our attention in bf16 runs with only the flash kernel allowed, and matches the math kernel.
- ZeRO-1 and ZeRO-3 (kept on one rank, so DeepSpeed really partitions) in bf16 through the real
  launcher: a rank SIGKILLed mid-run is restarted, resumes from its checkpoint, and every later step
  reads the uninterrupted run's samples with its loss (bf16, so within 1%).
- Export: the HF export of the ZeRO-3 GPU checkpoint matches our model's logits (the export stage's own check).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.tracking import losses_by_step, metrics_by_step
from pretrain_pipeline.artifacts import RunPaths
from conftest import free_port  # tests/ is on sys.path (rootdir conftest)
from test_train_features import make_cfg as features_cfg, new_run

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

STEPS, CHECKPOINT_EVERY, KILL_AT = 8, 4, 7


def gpu_cfg(paths: RunPaths, stage: int, **train):
    return features_cfg(paths, **{
        "precision": "bf16", "device": "cuda", "max_steps": STEPS, "schedule": {"warmup_steps": 2, "min_lr": 3e-4},
        "zero": {"stage": stage, "keep_stage_on_one_rank": True}, "checkpoint": {"every": CHECKPOINT_EVERY},
        "launch": {"master_port": free_port()}, **train})


NCCL_ON_ONE_GPU = """
import torch, torch.distributed as dist
from pretrain.distributed import init_distributed
torch.cuda.set_device(0)
init_distributed("nccl")
x = torch.ones(4, device="cuda")
dist.all_reduce(x)
print(dist.get_backend(), float(x.sum()))
dist.destroy_process_group()
"""


def test_nccl_process_group_on_one_gpu():
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env.pop("DS_ACCELERATOR", None)  # DeepSpeed's CUDA accelerator
    proc = subprocess.run([sys.executable, "-c", NCCL_ON_ONE_GPU], env=env, capture_output=True, text=True, timeout=180,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["nccl", "4.0"]


def test_attention_runs_on_the_flash_kernel_in_bf16():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.model import GPT
    from pretrain_pipeline.config import ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig.model_validate({"preset": "tiny", "block_size": 128, "dropout": 0.0}), 320)
    model = model.to("cuda", torch.bfloat16).eval()
    idx = torch.randint(0, 320, (2, 128), device="cuda")
    with torch.no_grad():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot run these inputs
            flash, _ = model(idx)
        with sdpa_kernel(SDPBackend.MATH):
            math_, _ = model(idx)
    assert torch.isfinite(flash).all()
    torch.testing.assert_close(flash.float(), math_.float(), atol=5e-2, rtol=5e-2)


@pytest.fixture(scope="module", autouse=True)
def gpu_env(tmp_path_factory):
    """The ranks on DeepSpeed's CUDA accelerator, with the run state of this module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DS_ACCELERATOR", raising=False)
        mp.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path_factory.mktemp("state")))
        yield


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_on_gpu_resumes_after_a_kill_with_the_uninterrupted_losses(stage, tmp_path, monkeypatch):
    from pretrain.export import LOGITS_ATOL, export
    from pretrain.faults import FAULT_KILL_ENV
    from pretrain.launch import launch_training
    from pretrain.trainer import SAMPLE_HASH_ENV

    monkeypatch.setenv(SAMPLE_HASH_ENV, "1")
    straight, killed = new_run(tmp_path, "straight"), new_run(tmp_path, "killed")
    launch_training(gpu_cfg(straight, stage), straight, log=lambda _: None)
    monkeypatch.setenv(FAULT_KILL_ENV, f"0:{KILL_AT}")  # rank 0 SIGKILLs itself before step 7, first start only
    cfg = gpu_cfg(killed, stage, recovery={"max_restarts": 1})
    result = launch_training(cfg, killed, log=lambda _: None)
    assert result.steps == STEPS
    hashes = [{s: r["data/sample_hash"] for s, r in metrics_by_step(p.metrics, "data/sample_hash").items()}
              for p in (straight, killed)]
    assert hashes[0] == hashes[1] and sorted(hashes[0]) == list(range(1, STEPS + 1))
    assert losses_by_step(killed.metrics) == pytest.approx(losses_by_step(straight.metrics), rel=1e-2)
    if stage == 3:  # the export stage checks the HF model's logits against ours from the GPU checkpoint
        exported = export(cfg, killed)
        assert exported.max_abs_logit_diff is not None and exported.max_abs_logit_diff <= LOGITS_ATOL
