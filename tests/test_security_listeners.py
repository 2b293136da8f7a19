"""Listeners the pipeline opens by default stay on loopback (a local Ray, Prefect's temporary
server, `make server`)."""

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from data_prep.ray_runtime import ray_session
from pretrain_pipeline.config import RuntimeConfig

ROOT = Path(__file__).resolve().parents[1]


def _listening_addresses(pids: set[int]) -> list[str]:
    return [
        c.laddr.ip for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


@pytest.mark.integration
def test_local_ray_listens_only_on_loopback():
    import ray

    before = {p.pid for p in psutil.process_iter()}
    with ray_session(RuntimeConfig(num_cpus=1)):
        assert ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        ray.get(ray.remote(lambda: 1).remote())  # start a worker too
        new = {p.pid for p in psutil.process_iter()} - before
        addresses = _listening_addresses(new)
    assert addresses, "found no Ray listeners to check"
    exposed = [a for a in addresses if not _is_loopback(a)]
    assert not exposed, f"Ray listens on non-loopback addresses: {exposed}"


def test_make_server_binds_loopback():
    makefile = (ROOT / "Makefile").read_text()
    server = re.search(r"^server:.*\n\t(.+)$", makefile, re.M).group(1)
    assert "--host 127.0.0.1" in server


# What `pretrain-pipeline run` (or a flow) does without PREFECT_API_URL: Prefect's client starts its
# temporary server, a uvicorn child process; the script prints its URL, then waits on stdin.
_TEMPORARY_SERVER = """
import asyncio, sys
from pretrain_pipeline.stages import configure_environment
configure_environment()
from prefect import get_client

async def main():
    async with get_client() as client:
        await client.hello()
        print(client.api_url, flush=True)
        sys.stdin.readline()

asyncio.run(main())
"""


@pytest.mark.integration
def test_prefect_temporary_server_listens_only_on_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PRETRAIN_PIPELINE_STATE=str(tmp_path / "state"), PREFECT_HOME=str(tmp_path / "state" / "prefect"))
    proc = subprocess.Popen([sys.executable, "-c", _TEMPORARY_SERVER], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        url = proc.stdout.readline().strip()  # blocks until the server answered (or the script died)
        assert url.startswith("http://"), f"the temporary Prefect server did not start (exit {proc.poll()})"
        tree = psutil.Process(proc.pid)
        pids = {proc.pid, *(c.pid for c in tree.children(recursive=True))}
        addresses = _listening_addresses(pids)
        assert addresses, f"found no listener of the temporary server at {url}"
        exposed = [a for a in addresses if not _is_loopback(a)]
        assert not exposed, f"Prefect's temporary server listens on non-loopback addresses: {exposed}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
