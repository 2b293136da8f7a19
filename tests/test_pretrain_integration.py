"""Real 2-rank DeepSpeed runs on CPU (gloo) over tiny synthetic shards, then eval and HF export.

The first run in a fresh cache compiles DeepSpeed's shared-memory comm op (~30-45 s); conftest.py
points TORCH_EXTENSIONS_DIR at the project's .state/ so later test sessions start in seconds.
Everything else lives in pytest's tmp dirs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pretrain.distributed import SHM_DIR
from pretrain_pipeline.artifacts import RunPaths, read_json, sha256_file
from pretrain_pipeline.config import build_config, dump_config, merge_tree
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration


def make_cfg(root: Path, **train):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": merge_tree({
                "micro_batch_size": 8, "grad_accum_steps": 2, "max_steps": 40, "log_every": 5, "device": "cpu",
                "zero": {"stage": 2}, "launch": {"nproc_per_node": 2}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 4, "min_lr": 3e-4}, "validation": {"every": 20, "batches": 4},
                "checkpoint": {"every": 15, "keep_last": 2},
            }, train),
            "eval": {"max_tokens": 4096, "micro_batch_size": 8, "prompts": ["The cat", "A dog"], "max_new_tokens": 12},
            "tracking": {"wandb_mode": "offline"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    saved = {k: os.environ.get(k) for k in ("PRETRAIN_PIPELINE_STATE", "WANDB_MODE")}
    os.environ.update(PRETRAIN_PIPELINE_STATE=str(state), WANDB_MODE="offline")
    yield state
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def new_run(tmp_path_factory, name: str) -> RunPaths:
    root = tmp_path_factory.mktemp("runs") / name
    make_synthetic_run(root)
    return RunPaths(root)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
    from pretrain.launch import launch_training

    paths = new_run(tmp_path_factory, "zero2")
    cfg = make_cfg(paths.root)
    lines: list[str] = []
    shm_before = set(SHM_DIR.glob("deepspeed_allreduce_buffer_*"))
    t0 = time.perf_counter()
    result = launch_training(cfg, paths, log=lines.append)
    print(f"\n2-rank ZeRO-2 training: {time.perf_counter() - t0:.1f}s")
    lines.extend(f"leaked shm segment: {p}" for p in sorted(set(SHM_DIR.glob("deepspeed_allreduce_buffer_*")) - shm_before))
    return cfg, paths, result, lines


def test_training_leaves_no_shared_memory_behind(trained):
    """DeepSpeed's CPU all-reduce never unlinks its ~66 MB /dev/shm segment per rank; a suite or
    sweep of runs would fill RAM with them (pretrain/distributed.py unlinks them)."""
    *_, lines = trained
    assert not [line for line in lines if line.startswith("leaked shm segment")], lines


def test_a_single_rank_zero3_run_runs_as_zero0_and_leaves_no_shared_memory_behind(env, tmp_path_factory):
    from pretrain.launch import launch_training

    paths = new_run(tmp_path_factory, "one_rank")
    before = set(SHM_DIR.glob("deepspeed_allreduce_buffer_*"))
    lines: list[str] = []
    launch_training(make_cfg(paths.root, launch={"nproc_per_node": 1}, zero={"stage": 3}, max_steps=2,
                             validation={"every": 2}), paths, log=lines.append)
    assert not set(SHM_DIR.glob("deepspeed_allreduce_buffer_*")) - before
    # Nothing to partition on one fp32 rank: the plan and the start line say so, and DeepSpeed wrote
    # a ZeRO-0 checkpoint (one model-states file holding the optimizer too; ZeRO writes
    # *_optim_states.pt, ZeRO-3 also zero_pp_rank_*_model_states.pt).
    assert any("ZeRO 3 (runs as 0: one rank" in line for line in lines), lines
    assert any("zero 3 (runs as 0: one rank" in line for line in lines), lines
    tag = paths.checkpoints / "step_000002"
    assert sorted(f.name for f in tag.glob("*_states.pt")) == ["mp_rank_00_model_states.pt"]


def test_training_reduces_loss_and_writes_artifacts(trained):
    cfg, paths, result, lines = trained
    assert not result.skipped and result.steps == 40 and result.last_tag == "step_000040"
    records = [json.loads(line) for line in paths.metrics.read_text().splitlines()]
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[0] > 5.0 and losses[-1] < losses[0] - 2.0, losses
    assert result.final_loss == pytest.approx(losses[-1])
    assert any("val/loss" in r for r in records)
    # Checkpoints: the last K tags, each a full ZeRO-2 checkpoint from 2 ranks.
    tags = sorted(p.name for p in paths.checkpoints.glob("step_*"))
    assert tags == ["step_000030", "step_000040"]
    assert len(list((paths.checkpoints / "step_000040").glob("*optim_states.pt"))) == 2
    assert (paths.checkpoints / "latest").read_text().strip() == "step_000040"
    # W&B offline run with our metrics in it.
    summary = read_json(paths.train / "summary.json")
    wandb_dir = Path(summary["wandb_dir"])
    assert summary["wandb_run_id"] and wandb_dir.name.startswith("offline-run-")
    (log_file,) = wandb_dir.glob("run-*.wandb")  # the offline record stream `wandb sync` uploads
    assert log_file.read_bytes().count(b"train/loss") >= len(losses)
    assert any("step 40" in line for line in lines)
    assert (paths.train / "launcher.log").read_text().count("[pretrain] step") >= 8


def test_train_is_skipped_when_current_and_rerun_when_config_changes(trained):
    from pretrain.launch import launch_training

    cfg, paths, result, _ = trained
    again = launch_training(cfg, paths, log=lambda _: None)
    assert again.skipped and again.last_tag == result.last_tag and again.final_loss == result.final_loss


def test_evaluate(trained):
    from pretrain.evaluate import evaluate

    cfg, paths, result, _ = trained
    ev = evaluate(cfg, paths)
    assert ev.checkpoint_tag == "step_000040" and ev.tokens == 4096
    assert 0 < ev.loss < 3.5 and ev.perplexity == pytest.approx(torch.tensor(ev.loss).exp().item(), rel=1e-6)
    assert 0 < ev.bits_per_byte < ev.loss / 0.693 and ev.bytes > ev.tokens
    assert [s["prompt"] for s in ev.samples] == ["The cat", "A dog"] and all(s["completion"] for s in ev.samples)
    saved = read_json(paths.eval / "eval.json")
    assert saved["checkpoint_tag"] == "step_000040" and saved["result"]["loss"] == pytest.approx(ev.loss)
    assert (paths.eval / "_SUCCESS.json").exists()
    assert evaluate(cfg, paths).skipped
    assert evaluate(cfg, paths, force=True).loss == pytest.approx(ev.loss)  # deterministic


def test_export_loads_and_generates_like_our_model(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.evaluate import evaluate, load_model
    from pretrain.export import export

    cfg, paths, _, _ = trained
    evaluate(cfg, paths)
    ex = export(cfg, paths)
    hf_dir = Path(ex.hf_dir)
    assert ex.max_abs_logit_diff <= 1e-4 and (paths.export / "_SUCCESS.json").exists()
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"):
        assert (hf_dir / name).exists(), name
    card = (hf_dir / "README.md").read_text()
    manifest = read_json(paths.shards / "manifest.json")
    assert manifest["tokenizer_sha256"] in card and "bits per byte" in card
    # Lineage and recipe: the shard manifest's hash, the corpus counts per split, the training config.
    assert f"shard manifest sha256: `{sha256_file(paths.shards / 'manifest.json')}`" in card
    for split in ("train", "val"):
        shards = manifest["splits"][split]
        tokens, docs = sum(s["tokens"] for s in shards), sum(s["documents"] for s in shards)
        assert f"- {split}: {tokens:,} tokens, {docs:,} documents in {len(shards)} shards" in card
    assert json.dumps(cfg.train.model_dump(mode="json"), indent=2, sort_keys=True) in card
    # safetensors and JSON only: nothing a loader would unpickle.
    assert not [p for p in paths.export.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]

    tok = AutoTokenizer.from_pretrained(hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ours, _, _ = load_model(cfg, paths)
    ids = tok("The cat sees", return_tensors="pt").input_ids
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(paths.tokenizer / "tokenizer.model"))
    assert ids[0].tolist() == sp.encode("The cat sees")
    theirs = hf.generate(ids, max_new_tokens=15, do_sample=False, eos_token_id=None)
    mine = ours.generate(ids, 15, temperature=0)
    assert theirs[0].tolist() == mine[0].tolist()
    assert tok.decode(theirs[0]) == sp.decode(mine[0].tolist())
    assert export(cfg, paths).skipped


def test_report_shows_both_loss_curves_and_the_eval_results(trained):
    from pretrain.evaluate import evaluate
    from pretrain_pipeline.report import _loss_series, write_report

    cfg, paths, _, _ = trained
    ev = evaluate(cfg, paths)
    report = write_report(paths).read_text()
    # The plot's inputs: both curves, the validation one at every train.validation.every steps (20 and 40).
    series = _loss_series([json.loads(line) for line in paths.metrics.read_text().splitlines()])
    assert [step for step, _ in series["validation loss"]] == [20, 40] and len(series["train loss"]) >= 8
    assert (paths.plots / "loss.png").stat().st_size > 0
    assert f"- validation loss: 2 points, last {series['validation loss'][-1][1]:.4g} at step 40" in report
    evaluate_section = report.split("## 4. Evaluate")[1].split("## 5.")[0]
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert f"| {key} | {getattr(ev, key):.4g} |" in evaluate_section
    assert f"| config_sha256 | {cfg.fingerprint()} |" in evaluate_section
    assert f"| checkpoint_sha256 | {ev.checkpoint_sha256} |" in evaluate_section


def consolidated(paths: RunPaths) -> dict[str, torch.Tensor]:
    from pretrain.checkpoint import load_consolidated_state_dict

    return load_consolidated_state_dict(paths.checkpoints)


def test_zero3_resume_matches_an_uninterrupted_run(env, tmp_path_factory):
    """Stop at step 6 and resume to 12 == 12 straight: weights, optimizer, data cursor and RNG restored."""
    from pretrain.launch import launch_training

    # Constant LR so the shorter first leg sees the same schedule as the straight run.
    common = dict(zero={"stage": 3}, schedule={"kind": "constant", "warmup_steps": 0}, log_every=3,
                  validation={"every": 100}, checkpoint={"every": 100}, grad_accum_steps=1)
    straight = new_run(tmp_path_factory, "straight")
    launch_training(make_cfg(straight.root, max_steps=12, **common), straight, log=lambda _: None)

    resumed = new_run(tmp_path_factory, "resumed")
    first = launch_training(make_cfg(resumed.root, max_steps=6, **common), resumed, log=lambda _: None)
    assert first.last_tag == "step_000006"
    lines: list[str] = []
    second = launch_training(make_cfg(resumed.root, max_steps=12, **common), resumed, log=lines.append)
    assert any("resumed from" in line and "step_000006" in line for line in lines)
    assert second.steps == 12 and second.last_tag == "step_000012"

    a, b = consolidated(straight), consolidated(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert second.final_loss == pytest.approx(read_json(straight.train / "summary.json")["final_loss"], abs=1e-6)
    # Same W&B run continued rather than a new one.
    assert second.wandb_run_id == first.wandb_run_id


def test_sigterm_saves_a_checkpoint_and_the_next_call_resumes(env, tmp_path_factory):
    from pretrain.launch import build_command, build_env, launch_training, terminate

    paths = new_run(tmp_path_factory, "preempted")
    cfg = make_cfg(paths.root, max_steps=100_000, log_every=1, checkpoint={"every": 100_000})
    paths.config.write_text(dump_config(cfg))
    proc = subprocess.Popen(
        build_command(cfg, paths), env=build_env(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    for line in proc.stdout:
        if "[pretrain] step 3 " in line:
            break
    terminate(proc, grace=60)
    assert proc.returncode != 0
    summary = read_json(paths.train / "summary.json")
    assert summary["completed"] is False and 3 <= summary["steps"] < 100_000
    assert summary["last_checkpoint_tag"] == f"step_{summary['steps']:06d}"

    lines: list[str] = []
    result = launch_training(make_cfg(paths.root, max_steps=summary["steps"] + 2, log_every=1), paths, log=lines.append)
    assert any("resumed from" in line for line in lines) and result.steps == summary["steps"] + 2
