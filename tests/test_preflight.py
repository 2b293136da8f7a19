"""The preflight through the installed command: user errors end in seconds with one ``error:``
line each naming the field or file, exit status 2, no traceback, and nothing started."""

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain_pipeline.config import build_config
from pretrain_pipeline.preflight import check_stages, preflight

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pretrain_pipeline.cli"]


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run the command in ``tmp_path`` with its own state folder (where Prefect and Ray would start);
    ``env`` is merged over this environment."""
    env = {**os.environ, "PRETRAIN_PIPELINE_STATE": str(tmp_path / "state"), **(env or {})}
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


def test_a_flow_started_by_the_cli_does_not_check_the_same_config_twice(tmp_path, monkeypatch):
    from flows.pipeline import PreflightFailed, _preflight
    from pretrain_pipeline.preflight import CHECKED_ENV, already_checked, mark_checked

    monkeypatch.delenv(CHECKED_ENV, raising=False)
    cfg = build_config({"data": {"inputs": [str(tmp_path / "missing.jsonl")]}, "runtime": {"runs_root": str(tmp_path)}})
    other = build_config({**cfg.model_dump(), "train": {"max_steps": 7}})
    mark_checked(cfg, ["tokenize", "clean"])
    assert already_checked(cfg, ["clean", "tokenize"])
    assert not already_checked(other, ["clean", "tokenize"]) and not already_checked(cfg, ["clean"])
    _preflight(cfg, ["clean", "tokenize"])  # marked: not checked again (the input is missing)
    with pytest.raises(PreflightFailed, match="missing.jsonl"):
        _preflight(other, ["clean", "tokenize"])


def test_a_disk_without_room_for_the_outputs_names_free_and_needed_bytes(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    with open(raw / "huge.jsonl.zst", "wb") as f:  # sparse: 8 TiB of size, no blocks
        f.truncate(8 * 2**40)
    done, _ = _cli(tmp_path, "clean", "-c", _config(tmp_path, data={"inputs": [str(raw / "*.jsonl.zst")]}))
    errors = _assert_refused(done, tmp_path)
    # A compressed input counts 4x its size in text, which the clean parts hold.
    needed = 4 * 8 * 2**40
    assert len(errors) == 1 and re.fullmatch(
        rf"error: runtime\.runs_root: the stages need about 32\.0 TiB \({needed:,} bytes: clean 32\.0 TiB\) "
        rf"but {re.escape(str(tmp_path))} has [\d.]+ \w+ \([\d,]+ bytes\) free", errors[0]), errors


def _checkpoint(cfg, step: int, micro_batch_size: int, grad_accum_steps: int, world_size: int) -> Path:
    """A complete checkpoint tag as the preflight reads it: the client state (model fingerprint,
    the batch layout the data state records) and the completion record, through the checkpoint
    module's own writers; no weights (nothing here loads them)."""
    from pretrain.checkpoint import save_client_state, tag_for, write_completion_record
    from pretrain.global_batch import BatchLayout
    from pretrain_pipeline.artifacts import RunPaths

    tag_dir = RunPaths(cfg.run_dir()).checkpoints / tag_for(step)
    tag_dir.mkdir(parents=True)
    layout = BatchLayout(micro_batch_size, grad_accum_steps, world_size)
    save_client_state(tag_dir, {"step": step, "model_fingerprint": cfg.model.fingerprint(), "data": layout.state()})
    write_completion_record(tag_dir)
    return tag_dir


def _resume_config(tmp_path: Path) -> tuple[str, Path]:
    """A config on 2 ranks and its run's checkpoint, saved with a global batch of 8 = 4 x 1 x 2 ranks."""
    config = _config(tmp_path, data={"sample_corpus": True},
                     train={"device": "cpu", "micro_batch_size": 4, "grad_accum_steps": 1, "launch": {"nproc_per_node": 2}})
    return config, _checkpoint(build_config(json.loads(Path(config).read_text())), 4, 4, 1, 2)


@pytest.mark.parametrize(
    "args, expected",
    [
        # Saved with a global batch of 8 = 4 x 1 x 2 ranks: no grad_accum_steps keeps it on 3.
        (["--set", "train.launch.nproc_per_node=3"],
         "refusing to resume {tag}: global batch 8 samples = 4 x 1 x 2 ranks (micro_batch_size x grad_accum_steps "
         "x ranks); on 3 ranks with micro_batch_size 4 no grad_accum_steps fits (8 is not a multiple of 4 x 3 = 12): "
         "use 2 ranks (grad_accum_steps 1)"),
        (["--set", "model.n_layer=3"],
         "{tag.parent} holds checkpoints of a different model config; set train.resume: never (they are moved "
         "aside) or use another run name"),
    ],
    ids=["global-batch", "model"],
)
def test_a_resume_this_topology_cannot_continue_is_refused_naming_the_numbers(tmp_path, args, expected):
    config, tag = _resume_config(tmp_path)
    done, _ = _cli(tmp_path, "train", "-c", config, *args)
    errors = _assert_refused(done, tmp_path)
    assert errors == [f"error: train.resume: {expected.format(tag=tag)}"]


def test_a_resume_on_another_rank_count_that_keeps_the_global_batch_passes(tmp_path):
    config, _ = _resume_config(tmp_path)
    raw = json.loads(Path(config).read_text())
    same = check_stages(build_config(raw), ["train"], prefect=False)
    assert same.problems == [] and ("resume", "step_000004 on 2 rank(s), grad_accum_steps 1") in same.rows
    raw["train"]["launch"]["nproc_per_node"] = 1
    one_rank = check_stages(build_config(raw), ["train"], prefect=False)
    assert one_rank.problems == [] and ("resume", "step_000004 on 1 rank(s), grad_accum_steps 2") in one_rank.rows


def test_the_train_stage_itself_refuses_the_resume_as_a_user_error(tmp_path, monkeypatch):
    """Started without the preflight (a deployment, a library call), the stage raises the same
    refusal as a UserError (one ``error:`` line in the CLI, no Prefect retry) before any rank starts."""
    from pretrain.global_batch import GlobalBatchRefused
    from pretrain.launch import launch_training
    from pretrain_pipeline.artifacts import RunPaths
    from pretrain_pipeline.errors import UserError
    from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    raw = {"runtime": {"runs_root": str(tmp_path / "runs")}, "data": {"sample_corpus": True},
           "tokenizer": {"vocab_size": 320}, "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
           "train": {"device": "cpu", "micro_batch_size": 4, "launch": {"nproc_per_node": 3}}}
    cfg = build_config(raw)
    paths = RunPaths(cfg.run_dir())
    make_synthetic_run(paths.root, n_train_docs=60, n_val_docs=10)
    _checkpoint(cfg, 4, 4, 1, 2)
    with pytest.raises(GlobalBatchRefused, match=r"^refusing to resume .*step_000004: global batch 8 samples") as refused:
        launch_training(cfg, paths, log=lambda _: None)
    assert isinstance(refused.value, UserError)
    assert not paths.train.exists() and not (tmp_path / "state").exists()


def test_lm_eval_task_names_that_do_not_resolve_are_named_per_field(tmp_path):
    tasks = ROOT / "tests" / "data" / "lm_eval_tasks"
    config = _config(tmp_path, data={"sample_corpus": True, "decontaminate": {"tasks": ["tiny_qa", "no_such_benchmark"]}},
                     eval={"lm_eval_tasks": ["tiny_choice", "no_such_eval"], "lm_eval_include_path": str(tasks)})
    # check: the same preflight as run's, and the table (indexing lm-eval's own tasks takes seconds).
    done, _ = _cli(tmp_path, "check", "-c", config, "--stages", "clean", "evaluate", env={"PREFECT_API_URL": ""})
    errors = _assert_refused(done, tmp_path)
    where = f"neither eval.lm_eval_include_path ({tasks}) nor lm-eval's own tasks"
    assert errors == [f"error: data.decontaminate.tasks: ['no_such_benchmark'] are in {where}",
                      f"error: eval.lm_eval_tasks: ['no_such_eval'] are in {where}"]
    assert re.search(r"^lm-eval tasks +no_such_benchmark \(UNKNOWN\), no_such_eval \(UNKNOWN\), tiny_choice, tiny_qa$",
                     done.stdout, re.M), done.stdout


def test_online_wandb_without_credentials_is_refused_and_a_key_is_never_printed(tmp_path):
    config = _config(tmp_path, data={"sample_corpus": True}, tracking={"wandb_mode": "online"})
    no_key = {"HOME": str(tmp_path), "WANDB_API_KEY": "", "WANDB_IDENTITY_TOKEN_FILE": "", "NETRC": "",
              "PREFECT_API_URL": ""}
    done, _ = _cli(tmp_path, "train", "-c", config, env=no_key)
    errors = _assert_refused(done, tmp_path)
    assert errors == ["error: tracking.wandb_mode: online but W&B has no credentials here: set WANDB_API_KEY in the "
                      "environment or run `wandb login`, or --set tracking.wandb_mode=offline"]
    secret = "0123456789abcdef-not-a-real-key"
    done, _ = _cli(tmp_path, "check", "-c", config, "--stages", "train", env={**no_key, "WANDB_API_KEY": secret})
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^W&B +online, credentials from WANDB_API_KEY$", done.stdout, re.M), done.stdout
    assert secret not in done.stdout + done.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # bound, never listening: connections to it are refused


def test_a_ray_address_that_does_not_answer_is_named(tmp_path):
    port = _closed_port()
    config = _config(tmp_path, data={"sample_corpus": True})
    done, elapsed = _cli(tmp_path, "clean", "-c", config, "--ray-address", f"127.0.0.1:{port}")
    errors = _assert_refused(done, tmp_path)
    assert errors == [f"error: runtime.ray_address: 127.0.0.1:{port} does not answer (127.0.0.1:{port}: Connection "
                      "refused within 2 s); start the cluster or leave runtime.ray_address empty for a local Ray"]
    with socket.socket() as listening:  # anything that accepts a connection answers
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"ray://127.0.0.1:{listening.getsockname()[1]}"
        raw = json.loads(Path(config).read_text())
        cfg = build_config({**raw, "runtime": {**raw["runtime"], "ray_address": address}})
        found = check_stages(cfg, ["clean"], prefect=False)
    assert found.problems == [] and ("Ray", f"{address} answers") in found.rows


def test_a_prefect_api_that_does_not_answer_is_named_only_where_prefect_runs(tmp_path, monkeypatch):
    api = f"http://127.0.0.1:{_closed_port()}/api"
    config = _config(tmp_path, data={"sample_corpus": True})
    done, _ = _cli(tmp_path, "run", "-c", config, env={"PREFECT_API_URL": api})
    errors = _assert_refused(done, tmp_path)
    assert errors == [f"error: PREFECT_API_URL: {api} does not answer (Connection refused within 2 s); start it "
                      "(`make server`) or unset PREFECT_API_URL for a temporary local server"]
    # A stage command and run --no-prefect do not use Prefect: its API is not their problem.
    monkeypatch.setenv("PREFECT_API_URL", api)
    cfg = build_config(json.loads(Path(config).read_text()))
    assert preflight(cfg, ["clean"], prefect=False) == []
