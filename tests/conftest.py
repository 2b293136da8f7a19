"""Session-wide environment for the tests: quiet, offline, and sharing compiled DeepSpeed ops."""

import os
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
