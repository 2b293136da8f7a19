"""Kill -9 the data stages at random points, rerun, and get exactly the uninterrupted output.

No partial output may pass for complete: a stage killed before its completion record is written
is redone on the next run, and what it finally writes equals a run that was never interrupted."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _config(tmp_path: Path, corpus: Path, run_name: str) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["data"].update(sample_corpus=False, inputs=[str(corpus)], documents_per_shard=300)
    cfg["tokenizer"].update(vocab_size=400, input_sentence_size=20000, shard_size_mb=0.05)
    cfg["runtime"] = {"run_name": run_name, "runs_root": str(tmp_path / "runs"), "num_cpus": 2}
    path = tmp_path / f"{run_name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(stage: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "pretrain_pipeline.cli", stage, "--config", str(config)]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"), "PRETRAIN_PIPELINE_QUIET": "1"}


def _run(stage: str, config: Path, tmp_path: Path) -> None:
    proc = subprocess.run(_cmd(stage, config), cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _kill_midway(stage: str, config: Path, tmp_path: Path, delay: float) -> bool:
    """Start the stage and SIGKILL its whole session (driver and Ray) after ``delay`` seconds."""
    proc = subprocess.Popen(_cmd(stage, config), cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(delay)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_session(proc.pid)
    return not finished


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of a killed run: Ray's workers run in process groups of their own but
    stay in the driver's session. (`ray stop` would stop every other Ray on the machine too.)"""
    import psutil

    left = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                p.kill()
                left.append(p)
        except (OSError, psutil.Error):
            continue  # gone meanwhile
    psutil.wait_procs(left, timeout=30)


def _outputs(run: Path) -> dict[str, bytes]:
    files = sorted((run / "clean").glob("*.parquet")) + sorted((run / "shards").glob("*.arrow"))
    files.append(run / "tokenizer" / "tokenizer.model")
    out = {str(p.relative_to(run)): p.read_bytes() for p in files}
    manifest = json.loads((run / "shards" / "manifest.json").read_text())
    out["splits"] = json.dumps(manifest["splits"], sort_keys=True).encode()
    return out


def test_killed_data_stages_rerun_to_identical_output(tmp_path):
    from data_prep.sample_corpus import build_sample_corpus

    corpus = tmp_path / "corpus.jsonl"
    build_sample_corpus(corpus, max_docs=1500)
    reference = _config(tmp_path, corpus, "reference")
    took = {}
    for stage in ("clean", "tokenize"):
        t0 = time.monotonic()
        _run(stage, reference, tmp_path)
        took[stage] = time.monotonic() - t0

    rng = random.Random(int(os.environ.get("PRETRAIN_PIPELINE_FAULT_SEED", "0")))
    crashed = _config(tmp_path, corpus, "crashed")
    run = tmp_path / "runs" / "crashed"
    interrupted: dict[str, bool] = {}
    stages = {"clean": ("clean",), "tokenize": ("tokenizer", "shards")}
    for stage, outputs in stages.items():
        record = run / outputs[-1] / "_SUCCESS.json"
        # Kill points spread over the uninterrupted run's duration (Ray start-up included). A loaded
        # machine skews that duration, so a stage that finished first is cleared and killed earlier.
        interrupted[stage] = False
        for attempt in range(4):
            delay = rng.uniform(0.3, 0.85) * took[stage] / 2**attempt
            if _kill_midway(stage, crashed, tmp_path, delay=delay) and not record.exists():
                interrupted[stage] = True
                break
            # Finished before the kill (or killed after its record): its output is complete, which the
            # comparison below would prove; clear it to interrupt the stage for real.
            for name in outputs:
                shutil.rmtree(run / name, ignore_errors=True)
        _run(stage, crashed, tmp_path)
        assert record.exists()
    # Every stage must have been killed mid-run at least once, or its comparison proves nothing.
    assert all(interrupted.values()), f"stages never interrupted: {[s for s, k in interrupted.items() if not k]}"

    expected, got = _outputs(tmp_path / "runs" / "reference"), _outputs(run)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"{name} differs after kill + rerun"
    leftovers = [p for p in run.rglob("*") if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
