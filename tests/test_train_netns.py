"""Two training "machines" on one host: two Linux network namespaces joined by a veth pair.

tests/test_train_multinode.py proves the two-node launch over 127.0.0.1; here each node is
``pretrain-pipeline train`` run inside its own network namespace (own interfaces, own loopback,
own port space), the two sharing the run directory as cluster nodes share it over NFS. The only
way the ranks can reach each other is the veth link between 10.231.0.1 and 10.231.0.2, so
torchrun's static rendezvous and gloo's collectives both cross a non-loopback address, as they
would between two hosts. The per-step
losses must be bitwise equal to a one-node 2-process run, and the veth's byte counters must show
the gradient traffic.

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); elsewhere it skips with the kernel's own error.
The addresses exist only inside the namespaces this test creates, so nothing leaves the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.launch import launch_training
from pretrain.plan import make_plan, plan_vocab_size
from pretrain.tracking import losses_by_step
from pretrain_pipeline.artifacts import RunPaths, atomic_write_text, read_stage_record
from pretrain_pipeline.config import dump_config, load_config
from test_train_multinode import make_cfg  # tests/ is on sys.path (rootdir conftest)
from synthetic import make_synthetic_run  # tests/ is on sys.path (rootdir conftest)

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.231.0"
MASTER_PORT = 29500  # each namespace has its own port space, so no clash with anything on the host


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def veth_bytes(ns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) bytes of ``dev`` inside namespace ``ns``."""
    out = ip("-n", ns, "-j", "-s", "link", "show", "dev", dev)
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)[0]["stats64"]
    return stats["rx"]["bytes"], stats["tx"]["bytes"]


@pytest.fixture
def netns_pair():
    """Namespaces (ns0, ns1) with veth ends (dev0 at .1, dev1 at .2) and loopback up; always deleted."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    tag = str(os.getpid())
    names = [f"pp{tag}n0", f"pp{tag}n1"]
    devs = [f"pp{tag}v0", f"pp{tag}v1"]  # interface names are limited to 15 characters
    created: list[str] = []
    try:
        for ns in names:
            res = ip("netns", "add", ns)
            if res.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {res.stderr.strip()}")
            created.append(ns)
        steps = [
            ("link", "add", devs[0], "netns", names[0], "type", "veth", "peer", "name", devs[1], "netns", names[1]),
        ]
        for i, (ns, dev) in enumerate(zip(names, devs)):
            steps += [
                ("-n", ns, "link", "set", "lo", "up"),
                ("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", dev),
                ("-n", ns, "link", "set", dev, "up"),
            ]
        for step in steps:
            res = ip(*step)
            if res.returncode != 0:
                pytest.skip(f"`ip {' '.join(step)}` failed: {res.stderr.strip()}")
        # The link is up once either side can reach the other (carrier may take a moment).
        ping = subprocess.run(["ip", "netns", "exec", names[1], sys.executable, "-c", (
            "import socket, time\n"
            "for _ in range(100):\n"
            "    try:\n"
            f"        socket.create_connection(('{SUBNET}.1', 9), timeout=0.2)\n"
            "    except ConnectionRefusedError:\n"
            "        break  # an RST came back over the veth: the path works\n"
            "    except OSError:\n"
            "        time.sleep(0.1)\n"
            "else:\n"
            "    raise SystemExit('veth link never came up')\n"
        )], capture_output=True, text=True, timeout=60)
        assert ping.returncode == 0, ping.stderr
        yield names, devs
    finally:
        # Deleting a namespace also deletes the veth end inside it (and with it the peer).
        for ns in created:
            ip("netns", "del", ns)


def start_node(ns: str, dev: str, config: Path, rank: int, overrides: list[str], log: Path) -> subprocess.Popen:
    """``pretrain-pipeline train`` for node ``rank``, run inside namespace ``ns``."""
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "pretrain_pipeline.cli", "train", "--config", str(config)]
    for override in (*overrides, f"train.launch.node_rank={rank}"):
        cmd += ["--set", override]
    # gloo otherwise binds to whatever the hostname resolves to, which no namespace here has.
    node_env = {**os.environ, "GLOO_SOCKET_IFNAME": dev, "TP_SOCKET_IFNAME": dev}
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=ROOT, env=node_env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


@pytest.mark.integration
def test_two_namespaced_nodes_match_one_node_two_processes(tmp_path, monkeypatch, netns_pair):
    names, devs = netns_pair
    state = tmp_path / "state"
    monkeypatch.setenv("PRETRAIN_PIPELINE_STATE", str(state))
    # One thread per rank in both runs: a different OpenMP split could change CPU reduction order
    # and with it the last bits of the loss.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = tmp_path / "data"
    make_synthetic_run(data)

    one = RunPaths(tmp_path / "runs" / "one")
    shutil.copytree(data, one.root)
    launch_training(make_cfg(one.root), one, log=lambda _: None)

    # Both "machines" see the same run directory, as on a cluster with a shared filesystem.
    two = RunPaths(tmp_path / "runs" / "two")
    shutil.copytree(data, two.root)
    config = tmp_path / "two.yaml"
    config.write_text(dump_config(make_cfg(two.root, launch={"nproc_per_node": 1, "nnodes": 2})))
    overrides = [f"train.launch.master_addr={SUBNET}.1", f"train.launch.master_port={MASTER_PORT}"]
    # Node 0 writes config.yaml; write it first so node 1's rank never finds it missing (on a
    # cluster the run directory is prepared before the job starts). Node 1's CLI rewrites it with
    # its own node_rank, which the ranks do not read.
    atomic_write_text(two.config, dump_config(load_config(config, [*overrides, "train.launch.node_rank=0"])))
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"node{r}.out" for r in (0, 1)]
    try:
        for r in (0, 1):
            procs.append(start_node(names[r], devs[r], config, r, overrides, logs[r]))
        # A node that fails leaves the other waiting at the rendezvous: stop both then.
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        # SIGINT, not SIGKILL: the CLI's KeyboardInterrupt makes it stop its launcher's own
        # process group (torchrun and the ranks), which a kill of the CLI alone would orphan.
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"node {r} exited with {p.returncode}:\n{outputs[r][-4000:]}"

    expected, got = losses_by_step(one.metrics), losses_by_step(two.metrics)
    assert sorted(got) == list(range(1, 7))
    assert got == expected  # bitwise: same seed, same data, same sum of two gradients
    assert read_stage_record(two.train) is not None

    # Both launchers were pointed at the veth address, and the ranks' traffic crossed the veth:
    # with ZeRO-1 each rank sends at least half the fp32 gradients every step (reduce-scatter).
    for log_name in ("launcher.log", "launcher-node1.log"):
        assert f"--master_addr {SUBNET}.1 --master_port {MASTER_PORT}" in (two.train / log_name).read_text()
    cfg = make_cfg(one.root)
    n_params = make_plan(cfg, plan_vocab_size(cfg, one)).params_total
    rx, tx = veth_bytes(names[1], devs[1])
    floor = cfg.train.max_steps * n_params * 4 // 2
    assert tx > floor and rx > floor, (rx, tx, floor)
