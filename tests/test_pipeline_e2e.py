"""The whole pipeline, end to end, as `make smoke` runs it: one Prefect flow, real Ray, real
SentencePiece, real Arrow, a real 2-rank DeepSpeed ZeRO-2 run on CPU, evaluation, and an export
that transformers loads and generates with. A rerun skips every stage."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pretrain_pipeline.config import merge_tree

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _tiny_config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["data"]["sample_corpus_max_docs"] = 800
    cfg["tokenizer"].update(vocab_size=512, input_sentence_size=20000)
    cfg["model"].update(n_layer=2, n_head=2, n_embd=64, block_size=64)
    cfg["train"] = merge_tree(cfg["train"], {"max_steps": 30, "log_every": 5, "schedule": {"warmup_steps": 3},
                                             "checkpoint": {"every": 15}, "validation": {"every": 15, "batches": 2}})
    cfg["eval"].update(max_tokens=4000, max_new_tokens=8)
    cfg["runtime"].update(run_name="e2e", runs_root=str(tmp_path / "runs"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


FAKE_WANDB_KEY = "local-0123456789abcdef0123456789abcdef01234567"
# Planted secrets: W&B's key, a Hugging Face token and generic *_API_KEY / *_TOKEN variables.
SECRETS = {
    "WANDB_API_KEY": FAKE_WANDB_KEY,
    "HF_TOKEN": "hf_FakeTokenForLeakTestsOnly0123456789abc",
    "EXAMPLE_SERVICE_API_KEY": "sk-fake-api-key-9f8e7d6c5b4a39281706",
    "EXAMPLE_SERVICE_TOKEN": "fake-bearer-token-a1b2c3d4e5f60718293a",
}


def _ray_sessions(tmp_path: Path) -> set[Path]:
    """Ray's session folders this run may use: the state's ray/ or, when that path is too long for
    unix sockets, Ray's default under the system temp dir (data_prep/ray_runtime.py)."""
    roots = [tmp_path / "state" / "ray", Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray"]
    return {p for root in roots if root.is_dir() for p in root.glob("session_2*")}


_SESSIONS_BEFORE: set[Path] = set()


def _run_cli(args, tmp_path):
    env = {
        **os.environ,
        # Planted secrets: they must never reach any file the run writes (checked below).
        **SECRETS,
        "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"),
        "PREFECT_HOME": str(tmp_path / "state" / "prefect"),
        "PRETRAIN_PIPELINE_QUIET": "1",
        "WANDB_MODE": "offline",
    }
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain_pipeline.cli", *args, "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, f"pipeline failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{\n"):]), proc


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("e2e")
    config = _tiny_config(tmp_path)
    _SESSIONS_BEFORE.update(_ray_sessions(tmp_path))
    first, _ = _run_cli(["run", "--config", str(config)], tmp_path)
    return tmp_path, config, first


def test_every_stage_produced_its_outputs(pipeline_run):
    tmp_path, _, _ = pipeline_run
    run = tmp_path / "runs" / "e2e"
    stats = json.loads((run / "clean" / "stats.json").read_text())
    assert stats["docs_in"] == stats["kept"] + sum(stats["dropped"].values()) + stats["quarantined"]
    assert stats["kept"] > 100
    assert list((run / "clean").glob("part-*.parquet"))
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"] and manifest["splits"]["val"]
    assert (run / "tokenizer" / "tokenizer.model").exists()
    assert (run / "checkpoints" / "latest").exists()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses and losses[-1] < losses[0], "training did not reduce the loss"
    ev = json.loads((run / "eval" / "eval.json").read_text())["result"]
    assert 1.0 < ev["perplexity"] < 512
    assert ev["bits_per_byte"] > 0
    report = (run / "report.md").read_text()
    for heading in ("Clean", "Tokenizer", "Train", "Evaluate", "Export"):
        assert heading in report
    assert (run / "plots" / "loss.png").exists() and (run / "plots" / "filter_funnel.png").exists()


def test_export_loads_in_transformers_and_generates(pipeline_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_path, _, _ = pipeline_run
    hf_dir = tmp_path / "runs" / "e2e" / "export" / "hf"
    assert list(hf_dir.glob("*.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok("Return the value of", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert isinstance(tok.decode(out[0]), str)


def test_rerun_skips_every_stage(pipeline_run):
    tmp_path, config, _ = pipeline_run
    second, proc = _run_cli(["run", "--config", str(config), "--no-prefect"], tmp_path)
    assert second["clean"]["skipped"]
    assert second["tokenize"]["tokenizer"]["skipped"] and second["tokenize"]["shards"]["skipped"]
    assert second["train"]["skipped"]
    assert second["evaluate"]["skipped"]
    assert second["export"]["skipped"]


def test_no_secret_in_any_run_file_or_prefect_database(pipeline_run):
    tmp_path, _, _ = pipeline_run
    sessions = sorted(_ray_sessions(tmp_path) - _SESSIONS_BEFORE)
    assert sessions, "found no Ray session folder of this run to scan"
    files = [p for root in (tmp_path, *sessions) for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    leaked = [f"{name} in {p}" for p in files for name, value in SECRETS.items() if value.encode() in p.read_bytes()]
    assert not leaked, f"secrets written to: {leaked}"
    assert any(p.suffix in (".out", ".err", ".log") for s in sessions for p in s.rglob("*")), "no Ray logs scanned"
    # The scan must have covered the run's outputs and Prefect's database (artifacts, logs).
    assert (tmp_path / "runs" / "e2e" / "config.yaml").exists()
    assert list((tmp_path / "state" / "prefect").rglob("*.db"))
