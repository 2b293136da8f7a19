"""A real 2-rank ZeRO-3 run (Llama-family model, CPU + gloo) -> consolidation, eval, HF + ONNX export, lm-eval.

The ranks are this file run under torchrun (see ``worker`` below): they train a few steps with our
DeepSpeed engine, save a checkpoint, and rank 0 also saves the live weights gathered from the
partitioned engine, so consolidation is compared with what the engine really held.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain_pipeline.config import build_config, dump_config, load_config

pytestmark = pytest.mark.integration

STEPS = 6
TAG = f"step_{STEPS:06d}"
OTHER_STAGES = (0, 2)  # checkpoints the worker also writes, for the other consolidation paths


def make_cfg(root: Path):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            # Llama family, untied, non-default theta: each mapping mistake shows in the logits.
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "position": "rope",
                      "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "tie_embeddings": False,
                      "rope_theta": 50000.0},
            "train": {"micro_batch_size": 4, "max_steps": STEPS, "device": "cpu", "zero": {"stage": 3},
                      "launch": {"nproc_per_node": 2}, "optimizer": {"lr": 3e-3},
                      "schedule": {"warmup_steps": 0, "kind": "constant"}},
            "eval": {"max_tokens": 1024, "prompts": ["The cat"], "max_new_tokens": 8, "top_k": 20},
            "export": {"onnx": True},
            "tracking": {"wandb_mode": "offline"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


def worker(run_dir: str) -> None:
    import deepspeed
    import torch.distributed as dist

    from pretrain.checkpoint import save_checkpoint
    from pretrain.data import ShardDataset, load_manifest
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine
    from pretrain.model import GPT, resolve_vocab_size
    from pretrain_pipeline.artifacts import RunPaths

    paths = RunPaths(Path(run_dir))
    cfg = load_config(paths.config)
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    manifest = load_manifest(paths.shards)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, resolve_vocab_size(cfg.model, manifest.vocab_size))
    engine = build_engine(model, cfg.train, world)
    data = ShardDataset(manifest, "train", cfg.model.block_size, cfg.train.micro_batch_size, rank, world, 0, verify=False)
    for step in range(STEPS):
        engine.set_lr(step)
        x, y = data.next_batch()
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
    # The pipeline's save: DeepSpeed files on every rank, then rank 0's completion record and latest.
    save_checkpoint(engine, paths.checkpoints, TAG, {"step": STEPS}, keep=1)
    params = list(engine.module.parameters())
    assert all(hasattr(p, "ds_id") for p in params), "expected ZeRO-3 partitioned parameters"
    with deepspeed.zero.GatheredParameters(params):
        live = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        torch.save(live, paths.root / "live_weights.pt")
    dist.barrier()
    # The other consolidation paths, same world: ZeRO-0 (full weights in one file) and ZeRO-2
    # (flat fp32 groups split across the ranks). One step each from a fresh model.
    for stage in OTHER_STAGES:
        torch.manual_seed(cfg.train.seed + stage)
        other = build_engine(GPT(cfg.model, resolve_vocab_size(cfg.model, manifest.vocab_size)),
                             cfg.train.model_copy(update={"zero": cfg.train.zero.model_copy(update={"stage": stage})}), world)
        other.set_lr(0)
        x, y = data.next_batch()
        _, loss = other(x, y)
        other.backward(loss)
        other.step()
        save_checkpoint(other, paths.root / f"checkpoints_zero{stage}", TAG, {"step": 1}, keep=1)
        if rank == 0:
            live = {k: v.detach().clone() for k, v in other.module.state_dict().items()}
            torch.save(live, paths.root / f"live_weights_zero{stage}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from pretrain.launch import build_env
    from synthetic import make_synthetic_run
    from pretrain_pipeline.artifacts import RunPaths

    paths = RunPaths(tmp_path_factory.mktemp("runs") / "llama_zero3")
    make_synthetic_run(paths.root)
    cfg = make_cfg(paths.root)
    paths.config.write_text(dump_config(cfg))
    env = {**build_env(cfg), "WANDB_MODE": "offline"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, "--run-dir", str(paths.root)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\n2-rank ZeRO-3 worker: {time.perf_counter() - t0:.1f}s")
    return cfg, paths


def test_zero3_consolidation_equals_the_live_weights(run):
    from pretrain.checkpoint import load_consolidated_state_dict

    cfg, paths = run
    # Two ranks' shards, read in this single process: no world size needed.
    assert len(list((paths.checkpoints / TAG).glob("*optim_states.pt"))) == 2
    live = torch.load(paths.root / "live_weights.pt", weights_only=True)
    merged = load_consolidated_state_dict(paths.checkpoints, TAG)
    assert set(merged) == set(live)
    for key in live:
        torch.testing.assert_close(merged[key], live[key].float(), rtol=0, atol=0, msg=key)
    # Training moved the weights away from init, so this compares something.
    init = __import__("pretrain.model", fromlist=["GPT"]).GPT(cfg.model, 320)
    assert not torch.equal(init.state_dict()["transformer.h.0.attn.c_attn.weight"], merged["transformer.h.0.attn.c_attn.weight"])


def test_lazy_zero3_consolidation_gives_the_eager_tensors(run):
    from deepspeed.utils.zero_to_fp32 import GatheredTensor, get_fp32_state_dict_from_zero_checkpoint

    from pretrain.checkpoint import load_consolidated_state_dict

    _, paths = run
    lazy = load_consolidated_state_dict(paths.checkpoints, TAG, lazy=True)
    # Nothing gathered yet: every parameter is a recipe over the two ranks' memory-mapped partitions.
    assert lazy and all(isinstance(v, GatheredTensor) for v in lazy.values())
    eager = load_consolidated_state_dict(paths.checkpoints, TAG)
    deepspeed_eager = get_fp32_state_dict_from_zero_checkpoint(str(paths.checkpoints), tag=TAG)
    assert set(lazy) == set(eager) == set(deepspeed_eager)
    for key, value in lazy.items():
        built = value.contiguous().float()
        assert built.shape == value.shape
        torch.testing.assert_close(built, eager[key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(built, deepspeed_eager[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("stage", OTHER_STAGES)
def test_zero0_and_zero2_consolidation_equal_the_live_weights(run, stage):
    from pretrain.checkpoint import load_consolidated_state_dict

    _, paths = run
    ckpt = paths.root / f"checkpoints_zero{stage}"
    assert bool(list((ckpt / TAG).glob("*optim_states.pt"))) == (stage > 0)
    live = torch.load(paths.root / f"live_weights_zero{stage}.pt", weights_only=True)
    eager = load_consolidated_state_dict(ckpt, TAG)
    lazy = load_consolidated_state_dict(ckpt, TAG, lazy=True)
    assert set(eager) == set(lazy) == set(live)
    for key in live:
        torch.testing.assert_close(eager[key], live[key].float(), rtol=0, atol=0, msg=key)
        torch.testing.assert_close(lazy[key].contiguous().float(), eager[key], rtol=0, atol=0, msg=key)


def test_zero0_weights_are_read_without_running_pickled_code(run, tmp_path):
    """ZeRO-0 weights are loaded with weights_only=True: a model file that pickles an arbitrary
    object is refused by name (the stock loader would have rebuilt it)."""
    import argparse
    import shutil

    from pretrain.checkpoint import CheckpointError, load_consolidated_state_dict

    _, paths = run
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(paths.root / "checkpoints_zero0" / TAG, ckpt / TAG)
    (model_file,) = (ckpt / TAG).glob("*model_states.pt")
    state = torch.load(model_file, weights_only=False)
    torch.save({**state, "smuggled": argparse.Namespace(x=1)}, model_file)
    with pytest.raises(CheckpointError, match=model_file.name):
        load_consolidated_state_dict(ckpt, TAG)


def test_zero2_checkpoint_streams_into_small_safetensors_shards(run, tmp_path):
    """ZeRO-2's lazy values are views into one flat fp32 vector; the streamed shards must hold
    each tensor's own bytes and reload (sharded, with an index) to the live model's logits."""
    from pretrain.export import load_export, verify_export, write_hf_weights
    from pretrain.checkpoint import load_consolidated_state_dict
    from pretrain.hf_convert import hf_config
    from pretrain.model import GPT

    cfg, paths = run
    ckpt = paths.root / "checkpoints_zero2"
    files = write_hf_weights(load_consolidated_state_dict(ckpt, TAG, lazy=True), cfg.model, tmp_path, "60KB")
    assert len(files) > 2 and json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    hf_config(cfg.model, 1, 2, 3, 320).save_pretrained(tmp_path)
    ours = GPT(cfg.model, 320).eval()
    ours.load_state_dict(torch.load(paths.root / "live_weights_zero2.pt", weights_only=True))
    x = torch.randint(0, 320, (2, cfg.model.block_size), generator=torch.Generator().manual_seed(5))
    assert verify_export(tmp_path, ours, x, hf=load_export(tmp_path)) <= 1e-4


def test_evaluate_writes_hashes_and_logs_to_wandb(run):
    from pretrain.evaluate import evaluate, load_model, weights_sha256
    from pretrain_pipeline.artifacts import read_json

    cfg, paths = run
    ev = evaluate(cfg, paths)
    saved = read_json(paths.eval / "eval.json")
    model, _, _ = load_model(cfg, paths)
    assert saved["checkpoint_sha256"] == weights_sha256(model) == ev.checkpoint_sha256
    assert saved["config_sha256"] == cfg.fingerprint() and saved["checkpoint_tag"] == TAG
    assert saved["tokenizer_sha256"] and saved["manifest_sha256"]
    assert ev.tokens == 1024 and ev.bits_per_byte > 0
    (wandb_dir,) = list((paths.eval / "wandb").glob("offline-run-*"))
    (stream,) = wandb_dir.glob("run-*.wandb")
    assert b"eval/bits_per_byte" in stream.read_bytes()
    # Seeded sampling: the same completion again.
    assert evaluate(cfg, paths, force=True).samples == ev.samples


def test_llama_export_matches_our_model_and_onnx(run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pretrain.evaluate import load_model
    from pretrain.export import export

    cfg, paths = run
    ex = export(cfg, paths)
    hf_dir = Path(ex.hf_dir)
    assert ex.family == "llama" and ex.max_abs_logit_diff <= 1e-4 and ex.onnx_max_abs_logit_diff <= 1e-3
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 192
    assert json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"] == 2
    card = (hf_dir / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "ONNX" in card and "sha256" in card
    # safetensors, JSON and ONNX only: nothing a loader would unpickle.
    assert not [p for p in paths.export.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle"}]

    ours, _, _ = load_model(cfg, paths)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok("The cat sees", return_tensors="pt").input_ids
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max() <= 1e-4
    n_new = cfg.model.block_size - ids.shape[1]  # stay within our context: no window sliding
    theirs = hf.generate(ids, max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=3)
    mine = ours.generate(ids, n_new, temperature=0)
    assert theirs[0].tolist() == mine[0].tolist()

    import onnxruntime as ort

    sess = ort.InferenceSession(ex.onnx_path, providers=["CPUExecutionProvider"])
    x = torch.randint(0, 320, (1, cfg.model.block_size), generator=torch.Generator().manual_seed(3))
    (onnx_logits,) = sess.run(["logits"], {"input_ids": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(onnx_logits) - ours(x)[0]).abs().max() <= 1e-3


LOCAL_TASKS = """
task: tiny_choice
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""
ROLLING_TASK = """
task: tiny_rolling
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GEN_TASK = """
task: tiny_gen
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs: {{until: ["."], max_gen_toks: 6, do_sample: false}}
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three local lm-eval tasks (one per request type) over jsonl files: nothing is downloaded."""
    from synthetic import synthetic_documents

    d = tmp_path_factory.mktemp("lm_eval_tasks")
    choice = [{"context": "The cat sees the", "choices": [" ball today.", " zebra quantum."], "label": 0},
              {"context": "A dog likes", "choices": [" the old house.", " purple seventeen."], "label": 0}]
    rolling = [{"text": t} for t in synthetic_documents(3, seed=99)]
    gen = [{"context": "The cat sees", "answer": " the ball today"}]
    for name, rows, template in (("choice", choice, LOCAL_TASKS), ("rolling", rolling, ROLLING_TASK), ("gen", gen, GEN_TASK)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / f"{name}.yaml").write_text(template.format(data=json.dumps(str(d / f"{name}.jsonl"))))
    return d


def test_lm_eval_runs_local_tasks_on_checkpoint_and_export(run, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    from pretrain.export import export
    from pretrain.lm_eval_adapter import PretrainPipelineLM

    cfg, paths = run
    hf_dir = export(cfg, paths).hf_dir
    tasks = TaskManager(include_path=str(task_dir), include_defaults=False)  # not lm-eval's thousands
    scores = {}
    for args in (f"run_dir={paths.root}", f"pretrained={hf_dir}"):
        out = lm_eval.simple_evaluate(
            model="pretrain-pipeline", model_args=args, tasks=["tiny_choice", "tiny_rolling", "tiny_gen"],
            task_manager=tasks, batch_size=2, log_samples=True,
        )
        r = out["results"]
        assert 0 <= r["tiny_choice"]["acc,none"] <= 1 and r["tiny_rolling"]["bits_per_byte,none"] > 0
        assert "exact_match,none" in r["tiny_gen"]
        assert len(out["samples"]["tiny_choice"]) == 2
        scores[args.split("=")[0]] = (out["samples"]["tiny_choice"], r["tiny_rolling"]["bits_per_byte,none"],
                                       out["samples"]["tiny_gen"][0]["resps"])
    # Checkpoint and export are the same model: the same log-likelihoods and the same generation.
    (ck_samples, ck_bpb, ck_gen), (ex_samples, ex_bpb, ex_gen) = scores["run_dir"], scores["pretrained"]
    for a, b in zip(ck_samples, ex_samples):
        for (ll_a, _), (ll_b, _) in zip(a["filtered_resps"], b["filtered_resps"]):
            assert ll_a == pytest.approx(ll_b, abs=1e-3)
    assert ck_bpb == pytest.approx(ex_bpb, rel=1e-4) and ck_gen == ex_gen

    # The adapter's rolling loglikelihood equals a direct sum over the document.
    lm = PretrainPipelineLM(run_dir=str(paths.root))
    text = "The cat sees the ball today."  # shorter than the context: one window
    req = type("Req", (), {"args": (text,)})()
    ids = [2] + lm.tok_encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(torch.tensor([ids[:-1]]))[0][0], -1)
    direct = float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(direct, abs=1e-3)


def test_evaluate_stage_runs_configured_lm_eval_tasks(run, task_dir, tmp_path, monkeypatch):
    """eval.lm_eval_tasks: the stage scores them through the adapter, stores them in eval.json with
    the hashes, logs them to W&B and the report shows them; a changed task list or task file reruns."""
    import shutil

    import lm_eval
    from lm_eval.tasks import TaskManager

    from pretrain.evaluate import evaluate
    from pretrain_pipeline.artifacts import read_json
    from pretrain_pipeline.report import write_report

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, paths = run
    tasks = tmp_path / "tasks"  # a copy: this test edits a task file
    shutil.copytree(task_dir, tasks)
    for yaml_file in tasks.glob("*.yaml"):  # the data files of the copy, not the shared ones
        yaml_file.write_text(yaml_file.read_text().replace(str(task_dir), str(tasks)))
    names = ["tiny_choice", "tiny_rolling", "tiny_gen"]
    cfg = base.model_copy(update={"eval": base.eval.model_copy(
        update={"lm_eval_tasks": names, "lm_eval_include_path": str(tasks)})})
    ev = evaluate(cfg, paths)
    assert not ev.skipped and sorted(ev.lm_eval) == sorted(names)
    # The same numbers as lm-eval's own run of the adapter over the checkpoint.
    direct = lm_eval.simple_evaluate(model="pretrain-pipeline", model_args=f"run_dir={paths.root}", tasks=names,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False), log_samples=False)["results"]
    assert ev.lm_eval["tiny_choice"]["acc"] == direct["tiny_choice"]["acc,none"]
    bpb = direct["tiny_rolling"]["bits_per_byte,none"]
    assert ev.lm_eval["tiny_rolling"]["bits_per_byte"] == pytest.approx(bpb, rel=1e-6)
    assert ev.lm_eval["tiny_gen"]["exact_match"] == direct["tiny_gen"]["exact_match,none"]
    saved = read_json(paths.eval / "eval.json")
    assert saved["result"]["lm_eval"] == ev.lm_eval and saved["config_sha256"] == cfg.fingerprint()
    assert saved["checkpoint_sha256"] == ev.checkpoint_sha256
    assert saved["lm_eval_task_files_sha256"]
    (stream,) = max((paths.eval / "wandb").glob("offline-run-*"), key=lambda d: d.stat().st_mtime).glob("run-*.wandb")
    assert b"lm_eval/tiny_choice/acc" in stream.read_bytes()
    report = write_report(paths).read_text()
    assert f"| tiny_rolling | bits_per_byte | {ev.lm_eval['tiny_rolling']['bits_per_byte']:.4g} |" in report

    assert evaluate(cfg, paths).skipped
    fewer = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"lm_eval_tasks": names[:2]})})
    rerun = evaluate(fewer, paths)
    assert not rerun.skipped and sorted(rerun.lm_eval) == sorted(names[:2])
    assert evaluate(fewer, paths).skipped
    (tasks / "choice.jsonl").write_text((tasks / "choice.jsonl").read_text().splitlines()[0] + "\n")
    assert not evaluate(fewer, paths).skipped  # a task's data changed


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_export_writes_a_checked_gguf_and_sharded_safetensors(run, dtype):
    """export.gguf on the trained ZeRO-3 checkpoint: the file transformers reads back gives our
    logits (f16: our weights rounded to f16); tiny shards exercise the streamed safetensors."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from pretrain.evaluate import load_model
    from pretrain.export import export
    from pretrain.gguf_export import f16_rounded_

    cfg, paths = run
    cfg = cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"gguf": True, "gguf_dtype": dtype, "onnx": False, "max_shard_size": "100KB"})})
    ex = export(cfg, paths)
    assert ex.gguf_path == str(paths.export / "gguf" / "model.gguf") and ex.gguf_max_abs_logit_diff <= 1e-4
    hf_dir = Path(ex.hf_dir)
    assert len(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]) == 2 + 2 * 9 + 1
    assert "## GGUF" in (hf_dir / "README.md").read_text()
    meta = {k: f.contents() for k, f in GGUFReader(ex.gguf_path).fields.items()}
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == {"f32": 0, "f16": 1}[dtype]
    assert meta["llama.rope.freq_base"] == 50000.0 and meta["llama.context_length"] == cfg.model.block_size

    ours, _, _ = load_model(cfg, paths)
    if dtype == "f16":
        f16_rounded_(ours)
    gguf = AutoModelForCausalLM.from_pretrained(paths.export / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    x = torch.randint(0, 320, (2, cfg.model.block_size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(x)[0] - gguf(x).logits).abs().max() <= 1e-4
    # Switched off again: the stale file goes, so an export never shows an unchecked GGUF.
    plain = cfg.model_copy(update={"export": cfg.export.model_copy(update={"gguf": False})})
    assert export(plain, paths).gguf_path is None and not (paths.export / "gguf").exists()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    worker(parser.parse_args().run_dir)
    os._exit(0)
