"""What a user sees on the terminal: plain --help, and a run whose stage meets a user error ends
in one `error:` line (exit status 2) after the stages' progress and summary lines, with no
traceback and none of Ray's or Prefect's start-up notices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pretrain_pipeline.cli"]


def test_help_is_plain_text_with_exit_statuses():
    done = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "``" not in done.stdout and ":func:" not in done.stdout
    assert "exit status:" in done.stdout and "  2  a user error" in done.stdout


@pytest.mark.integration
def test_user_error_inside_a_prefect_stage_is_one_line_on_a_quiet_console(tmp_path):
    # Every document is too short for the quality filter: clean runs, tokenize has nothing to
    # train on, which no preflight can know before cleaning.
    corpus = tmp_path / "raw" / "short.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"hello {i}"}) + "\n" for i in range(20)))
    cfg = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    cfg["data"].update(sample_corpus=False, inputs=[str(corpus)])
    cfg["runtime"] = {"run_name": "console", "runs_root": str(tmp_path / "runs"), "num_cpus": 1}
    config = tmp_path / "console.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"), "WANDB_MODE": "offline"}
    for name in ("PRETRAIN_PIPELINE_QUIET", "PREFECT_API_URL"):  # the console a user gets, progress bars included
        env.pop(name, None)

    done = subprocess.run([*CLI, "run", "-c", str(config)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    console = done.stdout + done.stderr
    assert done.returncode == 2, console[-6000:]
    lines = [line for line in console.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "no document survived cleaning" in lines[-1], console[-3000:]
    assert console.count("no document survived cleaning") == 1, console  # no retry, no repeated report
    assert any(line.startswith("clean: 20 documents in, 0 kept") for line in lines), console
    for noise in ("Traceback", "Token authentication", "Starting temporary server", "Beginning flow run", "Finished in state"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    assert len(lines) <= 8, console
