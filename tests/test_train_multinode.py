"""Multi-node launch: the commands each launcher gets, and a real two-"node" run on 127.0.0.1.

The two nodes are two torchrun launchers (static rendezvous, 1 CPU rank each, gloo) started as
separate commands, exactly as Slurm's ``srun`` or a Kubernetes pod per node would start them; their
per-step losses must equal a one-node 2-process run with the same seed.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from pretrain.launch import build_command, build_env, launch_training, write_deepspeed_env
from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths, atomic_write_text, read_stage_record
from pretrain_pipeline.config import build_config, dump_config, merge_tree
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)


def make_cfg(root: Path, **train_overrides):
    return build_config(
        {
            "data": {"sample_corpus": True},
            "tokenizer": {"vocab_size": 320},
            "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
            "train": merge_tree({
                "micro_batch_size": 4, "grad_accum_steps": 1, "max_steps": 6, "log_every": 1, "device": "cpu",
                "zero": {"stage": 1}, "launch": {"nproc_per_node": 2}, "optimizer": {"lr": 3e-3},
                "schedule": {"warmup_steps": 2, "min_lr": 3e-4}, "validation": {"every": 100, "batches": 1},
                "checkpoint": {"every": 100},
            }, train_overrides),
            "tracking": {"wandb_mode": "disabled"},
            "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
        }
    )


# --- commands (no processes) -------------------------------------------------------------------

def test_single_node_torchrun_rendezvous_on_loopback(tmp_path):
    # pretrain.launch runs torchrun with its store on 127.0.0.1 (tests/test_launch_listeners.py).
    cmd = build_command(make_cfg(tmp_path / "r"), RunPaths(tmp_path / "r"))
    assert cmd[1:3] == ["-m", "pretrain.launch"] and "--node_rank" not in cmd
    assert cmd[cmd.index("-m", 3) + 1] == "pretrain.trainer"


def test_multi_node_torchrun_uses_static_rendezvous(tmp_path):
    cfg = make_cfg(tmp_path / "r", launch={"nnodes": 4, "node_rank": 2, "master_addr": "10.0.0.1", "master_port": 29555})
    cmd = build_command(cfg, RunPaths(tmp_path / "r"))
    assert "--standalone" not in cmd
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert flags["--nnodes"] == "4" and flags["--node_rank"] == "2"
    assert flags["--master_addr"] == "10.0.0.1" and flags["--master_port"] == "29555"


def test_deepspeed_hostfile_pdsh_and_no_ssh(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=8\nnode-b slots=8\n")
    deepspeed = {"launcher": "deepspeed", "nnodes": 2, "hostfile": str(hostfile), "master_addr": "node-a"}
    pdsh = build_command(make_cfg(tmp_path / "r", launch=deepspeed), RunPaths(tmp_path / "r"))
    assert pdsh[pdsh.index("--hostfile") + 1] == str(hostfile) and "--no_ssh" not in pdsh
    assert pdsh[pdsh.index("--master_addr") + 1] == "node-a"
    per_node = build_command(make_cfg(tmp_path / "r", launch={**deepspeed, "no_ssh": True, "node_rank": 1}),
                             RunPaths(tmp_path / "r"))
    assert "--no_ssh" in per_node and per_node[per_node.index("--node_rank") + 1] == "1"
    # Options go to the launcher, before the module it runs.
    assert per_node.index("--no_ssh") < per_node.index("--module")


def test_pdsh_launch_forwards_rank_settings_but_no_secrets(tmp_path, monkeypatch):
    # Only the pdsh path needs the env file: DeepSpeed starts the other nodes' ranks over ssh with
    # NCCL*/PYTHON*/... and the file's lines, nothing else of this environment.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("MY_FABRIC_SETTING=ib0\nMY_HF_TOKEN=hf_planted\n")
    for name, value in {"WANDB_API_KEY": "planted-wandb-key", "HF_TOKEN": "planted-hf", "AWS_SECRET_ACCESS_KEY": "x",
                        "DB_PASSWORD": "x", "PRETRAIN_PIPELINE_FAULT_SEED": "7", "WANDB_PROJECT": "proj",
                        "PRETRAIN_PIPELINE_ODD": 'a"; rm -rf /; "', "OMP_NUM_THREADS": "3"}.items():
        monkeypatch.setenv(name, value)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    cfg = make_cfg(tmp_path / "r", launch={"launcher": "deepspeed", "nnodes": 2, "nproc_per_node": 1,
                                           "hostfile": str(hostfile), "master_addr": "node-a"})
    cfg.tracking.wandb_mode = "offline"
    paths = RunPaths(tmp_path / "r")
    build_command(cfg, paths)
    env, logged = build_env(cfg), []
    path = write_deepspeed_env(cfg, paths, env, logged.append)
    assert path == (paths.train / "deepspeed_env").resolve() and env["DS_ENV_FILE"] == str(path)
    lines = path.read_text().splitlines()
    forwarded = dict(line.split("=", 1) for line in lines)  # DeepSpeed's own parse: every line NAME=value
    assert forwarded["WANDB_MODE"] == "offline" and forwarded["OMP_NUM_THREADS"] == "3"
    assert forwarded["DS_ACCELERATOR"] == "cpu" and forwarded["WANDB_PROJECT"] == "proj"
    assert forwarded["TORCH_EXTENSIONS_DIR"] == env["TORCH_EXTENSIONS_DIR"]
    assert forwarded["PRETRAIN_PIPELINE_FAULT_SEED"] == "7" and forwarded["MY_FABRIC_SETTING"] == "ib0"
    text = path.read_text()
    for secret in ("planted", "WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET", "DB_PASSWORD", "rm -rf"):
        assert secret not in text, secret
    assert "WANDB_API_KEY" in logged[0] and "planted" not in logged[0]
    # One command per node (--no_ssh) and one node need no file: their ranks inherit this environment.
    per_node = make_cfg(tmp_path / "r", launch={"launcher": "deepspeed", "nnodes": 2, "hostfile": str(hostfile),
                                                "no_ssh": True})
    assert write_deepspeed_env(per_node, paths, build_env(per_node)) is None


def test_online_wandb_accepts_a_netrc_key(tmp_path, monkeypatch):
    # Ranks started over pdsh or on another node get no WANDB_API_KEY; `wandb login` on each node
    # leaves the key in ~/.netrc, where wandb itself finds it. Nothing here contacts W&B.
    from pretrain.tracking import Tracker, wandb_credentials
    from pretrain_pipeline.config import TrackingConfig

    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert wandb_credentials() is None
    with pytest.raises(RuntimeError, match="wandb login"):
        Tracker(TrackingConfig(wandb_mode="online"), tmp_path / "run")
    netrc = home / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_credentials() == "netrc"
    # A key for another server does not count.
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_credentials() is None
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials() == "WANDB_API_KEY"


def test_bad_multi_node_configs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="node_rank"):
        make_cfg(tmp_path / "r", launch={"nnodes": 2, "node_rank": 2})
    with pytest.raises(ValueError, match="hostfile"):
        build_command(make_cfg(tmp_path / "r", launch={"launcher": "deepspeed", "nnodes": 2}), RunPaths(tmp_path / "r"))
    with pytest.raises(FileNotFoundError, match="hostfile"):
        build_command(make_cfg(tmp_path / "r", launch={"launcher": "deepspeed", "hostfile": str(tmp_path / "nope")}),
                      RunPaths(tmp_path / "r"))


# --- a real two-node run ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
def test_two_nodes_match_one_node_two_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    one = RunPaths(tmp_path / "runs" / "one")
    make_synthetic_run(one.root)
    launch_training(make_cfg(one.root), one, log=lambda _: None)

    two = RunPaths(tmp_path / "runs" / "two")
    make_synthetic_run(two.root)
    port = free_port()
    nodes = [make_cfg(two.root, launch={"nproc_per_node": 1, "nnodes": 2, "node_rank": r, "master_port": port}) for r in (0, 1)]
    # Node 0 writes config.yaml; write it first so node 1's rank never races it (on a cluster the
    # run directory is prepared before the job starts).
    atomic_write_text(two.config, dump_config(nodes[0]))
    results, errors = {}, []

    def node(rank: int) -> None:
        try:
            results[rank] = launch_training(nodes[rank], two, log=lambda _: None)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    assert results[0].steps == 6 and results[0].final_loss is not None

    expected, got = losses_by_step(one.metrics), losses_by_step(two.metrics)
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # Only node 0 owns the stage record; node 1 logged to its own file.
    assert read_stage_record(two.train) is not None
    assert (two.train / "launcher-node1.log").exists() and os.path.getsize(two.train / "launcher.log") > 0
