"""Session-wide environment for the tests: quiet, offline, and sharing compiled DeepSpeed ops."""

import os
from pathlib import Path

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
