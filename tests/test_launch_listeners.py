"""A one-node training run listens on loopback only.

torchrun's ``--standalone`` rendezvous store binds every interface (``::``), which on a shared or
cloud machine opens an unauthenticated key-value store to the network for the length of the run.
``build_command`` starts one-node runs through ``pretrain.launch.loopback_torchrun`` instead; this
runs a real 2-rank CPU training and, while the ranks train, looks at every listening socket of the
launcher and its ranks.
"""

from __future__ import annotations

import ipaddress
import subprocess

import psutil
import pytest

from pretrain.launch import build_command, build_env, terminate
from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import dump_config
from test_train_multinode import make_cfg  # tests/ is on sys.path (rootdir conftest)
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)


def listeners(root: psutil.Process) -> dict[int, list[tuple[str, int]]]:
    """Listening TCP sockets by pid, for ``root`` and every process below it."""
    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[proc.pid] = [(c.laddr.ip, c.laddr.port) for c in proc.net_connections("tcp")
                             if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


def test_one_node_commands_bind_loopback(tmp_path, monkeypatch):
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        monkeypatch.delenv(name, raising=False)
    cfg = make_cfg(tmp_path / "r")
    cmd = build_command(cfg, RunPaths(tmp_path / "r"))
    assert cmd[1:3] == ["-m", "pretrain.launch"] and "--standalone" not in cmd
    env = build_env(cfg)
    assert env["GLOO_SOCKET_IFNAME"] in psutil.net_if_addrs()
    assert any(a.address == "127.0.0.1" for a in psutil.net_if_addrs()[env["GLOO_SOCKET_IFNAME"]])
    # Across nodes the user's master address and interfaces stand.
    multi = make_cfg(tmp_path / "r", launch={"nnodes": 2, "master_addr": "10.0.0.1"})
    assert "GLOO_SOCKET_IFNAME" not in build_env(multi) and "NCCL_SOCKET_IFNAME" not in build_env(multi)
    assert "torch.distributed.run" in build_command(multi, RunPaths(tmp_path / "r"))


@pytest.mark.integration
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_rank_run_listens_on_loopback_only(launcher, tmp_path, monkeypatch):
    """torchrun: the store is the launcher's (loopback_torchrun). The DeepSpeed launcher leaves it to
    rank 0, which binds it to the loopback MASTER_ADDR (pretrain.distributed.loopback_store)."""
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(tmp_path / "state"))
    paths = RunPaths(tmp_path / "runs" / "lo")
    make_synthetic_run(paths.root)
    cfg = make_cfg(paths.root, max_steps=100_000, checkpoint={"every": 100_000}, launch={"launcher": launcher})
    paths.config.write_text(dump_config(cfg))
    proc = subprocess.Popen(
        build_command(cfg, paths), env=build_env(cfg), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    seen: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            # Step 2 is logged after the process group, gloo and DeepSpeed are all up.
            if "[pretrain] step 2 " in line:
                break
        assert proc.poll() is None, "training exited early:\n" + "".join(seen[-30:])
        found = listeners(psutil.Process(proc.pid))
    finally:
        terminate(proc, grace=30)
    ranks = [pid for pid in found if pid != proc.pid]
    assert len(ranks) >= 2, found
    # The rendezvous store (torchrun: in the launcher; deepspeed: in rank 0) and each rank's gloo listener.
    if launcher == "torchrun":
        assert found[proc.pid], f"no rendezvous listener found in the launcher: {found}"
    assert sum(bool(found[pid]) for pid in ranks) >= 2, found
    assert sum(len(socks) for socks in found.values()) >= 3, found
    exposed = {pid: socks for pid, socks in found.items()
               if any(not ipaddress.ip_address(ip).is_loopback for ip, _ in socks)}
    assert not exposed, f"listening beyond loopback: {exposed}"
