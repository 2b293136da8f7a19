"""Session-wide environment for the tests: quiet, offline, and sharing compiled DeepSpeed ops."""

import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed compiles its CPU comm op (~40 s) on first use; share the project's build cache so the
# tests that launch training pay for it once, not once per temporary state directory.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".state" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("PRETRAIN_PIPELINE_QUIET", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A real local Ray (2 CPUs) per test module, with its own state directory."""
    from data_prep.ray_runtime import ray_session
    from pretrain_pipeline.config import RuntimeConfig

    old = {k: os.environ.get(k) for k in ("PRETRAIN_PIPELINE_STATE", "PRETRAIN_PIPELINE_QUIET")}
    os.environ["PRETRAIN_PIPELINE_STATE"] = str(tmp_path_factory.mktemp("state"))
    os.environ["PRETRAIN_PIPELINE_QUIET"] = "1"
    try:
        with ray_session(RuntimeConfig(num_cpus=2)):
            yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def two_sources(run_dir, tmp_path_factory):
    """Two named datasets, web and books, for mixtures: the module's ``run_dir`` and a copy of its
    tokenizer and shards (sources share one tokenizer; each walks its own seed)."""
    import shutil

    books = tmp_path_factory.mktemp("books")
    shutil.copytree(run_dir / "tokenizer", books / "tokenizer")
    shutil.copytree(run_dir / "shards", books / "shards")
    return {"web": run_dir / "shards", "books": books / "shards"}


RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_node_cluster():
    """Two Ray nodes on this machine (head + a second `ray start`, 1 CPU each), token-authenticated.

    Yields (GCS address, dashboard URL, environment for drivers of this cluster).
    """
    # Ray's unix socket paths must stay short, hence a short temp dir of our own.
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")
    gcs_port, dash_port = free_port(), free_port()
    # Ray 2.60 heads require a cluster token; every node and driver must present the same one.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # Only this cluster's processes and drivers get the token: Ray keeps auth state per process,
    # and the pytest process itself starts local (token-less) Rays in other tests.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {**os.environ, **auth, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [
        RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs_port),
        "--num-cpus", "1", "--resources", '{"head_node": 1}', "--temp-dir", temp_dir,
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
        "--disable-usage-stats",
    ]
    worker = [
        RAY, "start", "--address", f"127.0.0.1:{gcs_port}", "--node-ip-address", "127.0.0.1",
        "--num-cpus", "1", "--resources", '{"worker_node": 1}', "--disable-usage-stats",
    ]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=180)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=180)
        wait_for_two = (
            "import ray, time; ray.init(address='127.0.0.1:%d', log_to_driver=False)\n"
            "deadline = time.time() + 60\n"
            "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() < deadline: time.sleep(1)\n"
            "assert len([n for n in ray.nodes() if n['Alive']]) == 2, 'worker node did not join'\n"
        ) % gcs_port
        subprocess.run([sys.executable, "-c", wait_for_two], env=env, check=True, capture_output=True, timeout=180)
        yield f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", env
    finally:
        stop_cluster(temp_dir, str(token))


def stop_cluster(temp_dir: str, token_path: str) -> None:
    """Stop this cluster's processes only: `ray stop` would kill every Ray on the machine (other
    tests' and other users'). Ray's C++ daemons inherited the cluster's token path; its Python
    processes (agents, workers) overwrite their environ with their title, but every node of this
    cluster logs under the head's temp dir. Those processes are then ended by pid."""
    import psutil

    def ours(proc: psutil.Process) -> bool:
        if proc.environ().get("RAY_AUTH_TOKEN_PATH") == token_path:
            return True
        return any(f.path.startswith(temp_dir + os.sep) for f in proc.open_files())

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and ours(proc):
                found.append(proc)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    for proc in found:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    # Ray's agents ignore SIGTERM once their raylet is gone; do not wait long for them.
    _, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
