"""Kill -9 beyond the data stages' drivers: a Ray worker mid-task, one training rank, the driver of
evaluate and export. Each run must end exactly where an uninterrupted one does.

Kill points are drawn from ``PRETRAIN_PIPELINE_FAULT_SEED``; ``PRETRAIN_SOAK_ROUNDS`` (default 1,
``make soak`` raises it) sets how many kills each test makes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import build_config, dump_config
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = max(1, int(os.environ.get("PRETRAIN_SOAK_ROUNDS", "1")))
SEED = int(os.environ.get("PRETRAIN_PIPELINE_FAULT_SEED", "0"))
STEPS = 10


# --------------------------------------------------------------------------------------------
# A Ray worker killed mid-task


def _clean_cfg(tmp_path: Path, inputs: list[Path], name: str):
    return build_config(
        {
            "data": {"inputs": [str(p) for p in inputs], "documents_per_shard": 100},
            "runtime": {"run_name": name, "runs_root": str(tmp_path / "runs"), "num_cpus": 2},
        }
    )


def _clean_outputs(clean_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(clean_dir.iterdir()) if p.is_file() and p.name != "_SUCCESS.json"}


class WorkerKiller(threading.Thread):
    """SIGKILL the first Ray worker seen running a ``task`` (its process title names it)."""

    def __init__(self, rng: random.Random, task: str = "clean_unit"):
        super().__init__(daemon=True)
        self.rng, self.task, self.stop, self.killed = rng, task, threading.Event(), []

    def _busy_workers(self) -> list[psutil.Process]:
        out = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if cmd.startswith("ray::") and self.task in cmd:
                out.append(proc)
        return out

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            busy = self._busy_workers()
            if busy:
                time.sleep(self.rng.uniform(0.0, 0.1))  # somewhere inside the task
                for proc in busy:
                    try:
                        if self.task in " ".join(proc.cmdline()):  # still on the task
                            proc.kill()
                            self.killed.append(proc.pid)
                            break
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.02)


def test_ray_worker_killed_mid_task_is_retried(ray_cluster, tmp_path):
    from data_prep.clean import clean_corpus
    from data_prep.sample_corpus import build_sample_corpus

    corpus = tmp_path / "corpus.jsonl"
    build_sample_corpus(corpus, max_docs=1600)  # tasks long enough to be caught on a fast machine
    lines = corpus.read_text().splitlines(keepends=True)
    inputs = []
    for i in range(4):  # one Ray task per input file
        part = tmp_path / "corpus" / f"part-{i}.jsonl"
        part.parent.mkdir(exist_ok=True)
        part.write_text("".join(lines[i::4]))
        inputs.append(part)
    ref_cfg = _clean_cfg(tmp_path, inputs, "reference")
    reference = clean_corpus(ref_cfg, RunPaths(ref_cfg.run_dir()))
    expected = _clean_outputs(ref_cfg.run_dir() / "clean")

    rng = random.Random(SEED)
    for round_ in range(ROUNDS):
        cfg = _clean_cfg(tmp_path, inputs, f"killed-{round_}")
        killer = WorkerKiller(rng)
        killer.start()
        try:
            result = clean_corpus(cfg, RunPaths(cfg.run_dir()))  # Ray retries the lost task
        finally:
            killer.stop.set()
            killer.join()
        assert killer.killed, "no worker was caught mid-task; the test proved nothing"
        assert (result.kept, result.dropped, result.quarantined) == (reference.kept, reference.dropped, reference.quarantined)
        got = _clean_outputs(cfg.run_dir() / "clean")
        assert sorted(got) == sorted(expected)
        for name in expected:
            assert got[name] == expected[name], f"clean/{name} differs after a worker was killed"


def test_ray_worker_killed_while_encoding_shards_is_retried(ray_cluster, tmp_path):
    """The tokenize stage's shard writing (Ray encode tasks): a worker killed mid-task is retried
    by Ray and the shards are byte-identical to an uninterrupted run."""
    from data_prep.sample_corpus import build_sample_corpus
    from data_prep.shards import write_shards
    from data_prep.tokenizer import train_tokenizer
    from pretrain_pipeline.artifacts import mark_stage_done
    from pretrain_pipeline.config import PipelineConfig

    corpus = tmp_path / "corpus.jsonl"
    build_sample_corpus(corpus, max_docs=3000)
    docs = [json.loads(line) for line in corpus.read_text().splitlines()]
    cfg = PipelineConfig.model_validate(
        {"tokenizer": {"vocab_size": 500, "val_fraction": 0.1, "shard_size_mb": 0.05},
         "runtime": {"num_cpus": 2}, "data": {"sample_corpus": True}}
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A clean stage output as clean.py leaves it, and the real tokenizer, shared by both runs.
    ref = RunPaths(tmp_path / "reference")
    ref.clean.mkdir(parents=True)
    for p in range(2):
        chunk = docs[p::2]
        pq.write_table(pa.table({"id": [d["id"] for d in chunk], "text": [d["text"] for d in chunk]}),
                       ref.clean / f"part-{p:05d}.parquet", row_group_size=100)
    mark_stage_done(ref.clean, "kill-test", {"documents": len(docs)})
    train_tokenizer(cfg, ref)
    killed_run = RunPaths(tmp_path / "killed")
    shutil.copytree(ref.root, killed_run.root)
    write_shards(cfg, ref)
    expected = {p.name: p.read_bytes() for p in sorted(ref.shards.iterdir()) if p.name != "_SUCCESS.json"}

    killer = WorkerKiller(random.Random(SEED), task="encode_row_groups")
    killer.start()
    try:
        write_shards(cfg, killed_run)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed, "no encode worker was caught mid-task; the test proved nothing"
    got = {p.name: p.read_bytes() for p in sorted(killed_run.shards.iterdir()) if p.name != "_SUCCESS.json"}
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name] == expected[name], f"shards/{name} differs after an encode worker was killed"


# --------------------------------------------------------------------------------------------
# One training rank killed


def make_train_cfg(root: Path):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": {
                "micro_batch_size": 8, "max_steps": STEPS, "log_every": 1, "device": "cpu",
                "zero": {"stage": 1}, "launch": {"nproc_per_node": 2}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 2, "min_lr": 3e-4}, "validation": {"every": 100, "batches": 1},
                "checkpoint": {"every": 2, "keep_last": 2},
            },
            "eval": {"max_tokens": 512, "prompts": ["The cat", "A dog"], "max_new_tokens": 8, "wandb": False},
            "tracking": {"wandb_mode": "disabled"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from pretrain.launch import launch_training

    os.environ.setdefault("PRETRAIN_PIPELINE_STATE", str(tmp_path_factory.mktemp("state")))
    paths = RunPaths(tmp_path_factory.mktemp("runs") / "reference")
    make_synthetic_run(paths.root)
    cfg = make_train_cfg(paths.root)
    launch_training(cfg, paths, log=lambda _: None)
    return cfg, paths, losses_by_step(paths.metrics)


def _rank_process(run_dir: Path, local_rank: int) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "pretrain.trainer" in cmd and str(run_dir.resolve()) in cmd:
            try:
                if proc.environ().get("LOCAL_RANK") == str(local_rank):
                    return proc
            except psutil.NoSuchProcess:
                continue
    raise AssertionError(f"no rank {local_rank} of {run_dir} is running")


def test_one_rank_killed_fails_clearly_and_rerun_resumes_exactly(reference, tmp_path):
    from pretrain.checkpoint import list_tags, verify_tag
    from pretrain.launch import TrainingFailed, launch_training

    _, _, expected = reference
    paths = RunPaths(tmp_path / "killed")
    make_synthetic_run(paths.root)
    cfg = make_train_cfg(paths.root)
    rng = random.Random(SEED)
    # Kill rank 1 (not the one writing the records) after a drawn step, once per round, each later.
    kill_steps = sorted(rng.sample(range(3, STEPS), min(ROUNDS, STEPS - 3)))
    for kill_at in kill_steps:
        killed: list[int] = []

        def watch(line: str, kill_at=kill_at, killed=killed) -> None:
            if not killed and f"[pretrain] step {kill_at} loss" in line:
                proc = _rank_process(paths.root, local_rank=1)
                proc.kill()
                killed.append(proc.pid)

        with pytest.raises(TrainingFailed) as err:
            launch_training(cfg, paths, log=watch)
        assert killed, f"step {kill_at} was never logged"
        message = str(err.value)
        # The launcher names the failure: torchrun's report of the signalled rank, our exit code and log.
        assert "SIGKILL" in message and "training exited with code" in message and "launcher.log" in message, message
        assert not (paths.train / "summary.json").exists()
        for tag in list_tags(paths.checkpoints):
            verify_tag(paths.checkpoints, tag)  # whatever counts as complete really is
    lines: list[str] = []
    result = launch_training(cfg, paths, log=lines.append)
    assert result.steps == STEPS and any("resumed from" in x for x in lines), lines
    got = losses_by_step(paths.metrics)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert got[step] == expected[step], (step, got[step], expected[step])  # bitwise, CPU fp32


# --------------------------------------------------------------------------------------------
# The driver of evaluate and export killed


def _cli(stage: str, paths: RunPaths) -> list[str]:
    return [sys.executable, "-m", "pretrain_pipeline.cli", stage, "--config", str(paths.config)]


def _env() -> dict[str, str]:
    return {**os.environ, "PRETRAIN_PIPELINE_QUIET": "1"}


def _run_cli(stage: str, paths: RunPaths) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(_cli(stage, paths), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return time.monotonic() - t0


def _kill_cli(stage: str, paths: RunPaths, when) -> bool:
    """Start the stage's CLI and SIGKILL its process group once ``when(proc)`` says so; True when it
    was killed before finishing."""
    proc = subprocess.Popen(_cli(stage, paths), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        when(proc)
        alive = proc.poll() is None
        if alive:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return alive


def _eval_record(paths: RunPaths) -> dict:
    return json.loads((paths.eval / "eval.json").read_text())


def _export_files(paths: RunPaths) -> dict[str, bytes]:
    hf = paths.export / "hf"
    return {p.relative_to(hf).as_posix(): p.read_bytes() for p in sorted(hf.rglob("*")) if p.is_file()}


def test_evaluate_and_export_killed_then_rerun_give_identical_outputs(reference, tmp_path):
    cfg, ref_paths, _ = reference
    paths = RunPaths(tmp_path / "reference")  # same name, so the config (and its hash) is the same
    shutil.copytree(ref_paths.root, paths.root, ignore=shutil.ignore_patterns("eval", "export"))
    paths.config.write_text(dump_config(cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"runs_root": str(tmp_path)})})))
    rng = random.Random(SEED)
    # Kills that landed before the stage's record, per stage: each stage must have at least one.
    interrupted = {"evaluate": 0, "export": 0}

    # evaluate: an uninterrupted run first (its duration bounds the kill points), then kill + rerun;
    # a kill that comes too late (a loaded machine runs faster or slower) is retried earlier.
    took = _run_cli("evaluate", paths)
    expected_eval = _eval_record(paths)
    for _ in range(ROUNDS):
        for attempt in range(3):
            shutil.rmtree(paths.eval, ignore_errors=True)
            delay = rng.uniform(0.3, 0.9) * took / 2**attempt
            killed = _kill_cli("evaluate", paths, lambda proc: time.sleep(delay))
            # The kill may land after the record is written, while the process shuts down: a record
            # must then stand beside complete results, never beside partial ones.
            if (paths.eval / "_SUCCESS.json").exists():
                assert _eval_record(paths) == expected_eval, "evaluate left its record beside partial results"
            elif killed:
                interrupted["evaluate"] += 1
                break
        _run_cli("evaluate", paths)
        assert _eval_record(paths) == expected_eval

    # export: reference bytes, then kill while it writes its temporary folder (or a bit later).
    _run_cli("export", paths)
    expected_export = _export_files(paths)
    assert "model.safetensors" in expected_export
    for _ in range(ROUNDS):
        for attempt in range(3):
            shutil.rmtree(paths.export, ignore_errors=True)
            extra = rng.uniform(0.0, 0.5) if attempt == 0 else 0.0

            def while_writing(proc: subprocess.Popen) -> None:
                deadline = time.monotonic() + 300
                while proc.poll() is None and time.monotonic() < deadline:
                    if paths.export.is_dir() and any(p.name.startswith(".hf.tmp-") for p in paths.export.iterdir()):
                        time.sleep(extra)
                        return
                    time.sleep(0.01)

            killed = _kill_cli("export", paths, while_writing)
            # hf/ appears only by one rename of the finished folder: absent, or complete (the kill
            # may land between that rename and the stage record, or after the record).
            assert not (paths.export / "hf").exists() or _export_files(paths) == expected_export
            if (paths.export / "_SUCCESS.json").exists():
                assert _export_files(paths) == expected_export, "export left its record beside a partial hf/"
            elif killed:
                interrupted["export"] += 1
                break
        _run_cli("export", paths)
        assert _export_files(paths) == expected_export  # byte-identical safetensors, config, tokenizer, card
        assert not [p for p in paths.export.iterdir() if ".tmp" in p.name], "a killed export's temporaries were left"
    assert all(interrupted.values()), f"a stage was never interrupted, its rerun proved nothing: {interrupted}"
