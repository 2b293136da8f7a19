"""Listeners the pipeline opens by default stay on loopback (a local Ray, `make server`)."""

import ipaddress
import re
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
