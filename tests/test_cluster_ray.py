"""Multi-node data prep, proven on one machine: a Ray head and a separate worker node (two
`ray start` processes with their own resources), the clean and tokenize stages run against that
cluster's address, tasks land on both nodes, and the outputs equal a single-node run's.

The cluster is the ``two_node_cluster`` fixture in conftest.py (tests/test_train_ray.py uses it too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, run_name: str) -> Path:
    corpus = tmp_path / "corpus.jsonl"
    if not corpus.exists():
        from data_prep.sample_corpus import build_sample_corpus

        build_sample_corpus(corpus, max_docs=600)
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    # Both runs read the same file, so recorded sources (paths) are equal too.
    cfg["data"].update(sample_corpus=False, inputs=[str(corpus)])
    cfg["data"]["documents_per_shard"] = 200  # several parts, so several encoder tasks
    cfg["tokenizer"].update(vocab_size=400, input_sentence_size=20000)
    cfg["runtime"] = {"run_name": run_name, "runs_root": str(tmp_path / "runs")}
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _stage(args: list[str], tmp_path: Path, env: dict[str, str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain_pipeline.cli", *args, "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{\n"):])


def test_data_stages_on_two_nodes_equal_single_node(two_node_cluster, tmp_path):
    address, dashboard, cluster_env = two_node_cluster
    env = {**cluster_env, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"), "PRETRAIN_PIPELINE_QUIET": "1"}
    env.pop("RAY_ADDRESS", None)

    cluster_cfg = _config(tmp_path, "cluster")
    for stage in ("clean", "tokenize"):
        _stage([stage, "--config", str(cluster_cfg), "--ray-address", address], tmp_path, env)

    count_nodes = (
        "from ray.util.state import list_tasks\n"
        f"tasks = list_tasks(address={dashboard!r}, filters=[('state', '=', 'FINISHED')], limit=10000,"
        " raise_on_missing_output=False)\n"
        "print(len({t.node_id for t in tasks if t.node_id}))\n"
    )
    out = subprocess.run([sys.executable, "-c", count_nodes], env=env, check=True, capture_output=True, text=True)
    nodes_used = int(out.stdout.strip().splitlines()[-1])
    assert nodes_used == 2, f"tasks ran on {nodes_used} node(s), expected both"

    local_env = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
    single_cfg = _config(tmp_path, "single")
    for stage in ("clean", "tokenize"):
        _stage([stage, "--config", str(single_cfg), "--set", "runtime.num_cpus=2"], tmp_path, local_env)

    cluster, single = tmp_path / "runs" / "cluster", tmp_path / "runs" / "single"
    parts = sorted(p.name for p in (single / "clean").glob("part-*.parquet"))
    assert parts and parts == sorted(p.name for p in (cluster / "clean").glob("part-*.parquet"))
    for name in parts + ["dropped.parquet"]:
        assert (cluster / "clean" / name).read_bytes() == (single / "clean" / name).read_bytes(), name
    assert (cluster / "tokenizer" / "tokenizer.model").read_bytes() == (single / "tokenizer" / "tokenizer.model").read_bytes()
    m_cluster = json.loads((cluster / "shards" / "manifest.json").read_text())
    m_single = json.loads((single / "shards" / "manifest.json").read_text())
    assert m_cluster["splits"] == m_single["splits"], "shards differ between cluster and single node"
