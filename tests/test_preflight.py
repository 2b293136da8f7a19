"""The preflight through the installed command: user errors end in seconds with one ``error:``
line each naming the field or file, exit status 2, no traceback, and nothing started."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain_pipeline.config import build_config
from pretrain_pipeline.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pretrain_pipeline.cli"]


def _cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run the command in ``tmp_path`` with its own state folder (where Prefect and Ray would start)."""
    env = {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state")}
    start = time.perf_counter()
    done = subprocess.run([*CLI, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return done, time.perf_counter() - start


def _config(tmp_path: Path, **sections) -> str:
    raw = {"runtime": {"runs_root": str(tmp_path / "runs")}, "train": {"device": "cpu"}, **sections}
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return str(path)


def _assert_refused(done: subprocess.CompletedProcess, tmp_path: Path) -> list[str]:
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out
    assert not (tmp_path / "state").exists(), "Prefect or Ray was started"
    return [line for line in done.stderr.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("command", ["run", "clean", "check"])
def test_missing_inputs_are_refused_in_seconds_naming_the_pattern(tmp_path, command):
    pattern = str(tmp_path / "raw" / "**" / "*.jsonl.zst")
    done, elapsed = _cli(tmp_path, command, "-c", _config(tmp_path, data={"inputs": [pattern]}))
    errors = _assert_refused(done, tmp_path)
    assert errors == [f"error: data.inputs: input {pattern!r} matches no .jsonl/.jsonl.gz/.jsonl.zst/.ndjson/.parquet/.txt file"]
    assert elapsed < 20, f"took {elapsed:.1f} s"
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "run"])
def test_cuda_requested_without_a_gpu_names_the_cpu_alternative(tmp_path, command):
    config = _config(tmp_path, data={"sample_corpus": True})
    done, _ = _cli(tmp_path, command, "-c", config, "--set", "train.device=cuda")
    errors = _assert_refused(done, tmp_path)
    assert len(errors) == 1 and errors[0].startswith("error: train.device: cuda requested but no CUDA device")
    assert "--set train.device=cpu" in errors[0]


def test_plan_that_does_not_fit_is_refused_before_launch(tmp_path):
    config = _config(tmp_path, data={"sample_corpus": True})
    done, _ = _cli(tmp_path, "train", "-c", config, "--set", "train.plan.device_memory_gb=0.0001")
    errors = _assert_refused(done, tmp_path)
    assert len(errors) == 1 and errors[0].startswith("error: train.plan.device_memory_gb: the plan needs")


def test_unwritable_run_dir_is_named(tmp_path):
    (tmp_path / "runs").write_text("a file where the runs folder should be")
    done, _ = _cli(tmp_path, "check", "-c", _config(tmp_path, data={"sample_corpus": True}))
    errors = _assert_refused(done, tmp_path)
    assert len(errors) == 1 and errors[0].startswith("error: runtime.runs_root: ")


@pytest.mark.parametrize(
    "args, expected",
    [(["--set", "train.max_steps=0"], "train.max_steps"), (["--force", "bogus"], "unknown stage(s) to force: ['bogus']")],
)
def test_invalid_config_or_arguments_end_with_error_lines(tmp_path, args, expected):
    done, _ = _cli(tmp_path, "run", "-c", _config(tmp_path, data={"sample_corpus": True}), *args)
    _assert_refused(done, tmp_path)
    assert done.stderr.startswith("error: ") and expected in done.stderr


def test_check_of_a_clean_config_prints_the_table_and_exits_0(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        (raw / f"part-{i}.jsonl").write_text(json.dumps({"text": "hello world " * 10}) + "\n")
    pattern = str(raw / "*.jsonl")
    done, _ = _cli(tmp_path, "check", "-c", _config(tmp_path, data={"inputs": [pattern]}))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""
    table = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in done.stdout.splitlines()[:-1])
    size = sum(p.stat().st_size for p in raw.iterdir())
    assert table[f"input {pattern}"] == f"3 files, {size} B"
    assert table["run dir"].startswith(f"{tmp_path / 'runs' / 'default'} (will be created;")
    assert table["device"].startswith("train.device=cpu -> cpu")
    assert not (tmp_path / "state").exists() and not (tmp_path / "runs").exists()


def test_only_the_stages_about_to_run_are_checked(tmp_path):
    cfg = build_config({"data": {"inputs": [str(tmp_path / "missing.jsonl")]}, "runtime": {"runs_root": str(tmp_path)}})
    assert [p.where for p in preflight(cfg, ["clean"])] == ["data.inputs"]
    on_cpu = build_config({**cfg.model_dump(), "train": {"device": "cpu"}})
    assert preflight(on_cpu, ["train", "evaluate"]) == []


def test_flows_started_without_the_cli_refuse_before_any_task(tmp_path):
    from flows.pipeline import PreflightFailed, clean_flow, pretrain_pipeline

    cfg = build_config({"data": {"inputs": [str(tmp_path / "missing.jsonl")]}, "runtime": {"runs_root": str(tmp_path)}})
    # .fn is the flow's body: the check runs before the first task without a Prefect server.
    for body in (lambda: clean_flow.fn(config=cfg), lambda: pretrain_pipeline.fn(config=cfg)):
        with pytest.raises(PreflightFailed, match=r"^data\.inputs: input .*missing\.jsonl"):
            body()
