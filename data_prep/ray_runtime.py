"""The one place that starts, joins and tunes Ray.

Everything else in ``data_prep`` just starts Ray tasks inside ``with ray_session(cfg):``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from pretrain_pipeline.artifacts import project_state_dir
from pretrain_pipeline.config import RuntimeConfig

log = logging.getLogger(__name__)

QUIET_ENV = "PRETRAIN_PIPELINE_QUIET"

# Ray puts unix sockets at <temp>/session_<date>_<time>_<pid>/sockets/<name>; AF_UNIX paths are
# capped at 107 bytes, and the session folder plus socket name take up to ~70 of them.
_MAX_TEMP_DIR_LEN = 35

# The directory holding the ``data_prep`` package: local Ray workers start in a fresh interpreter
# and must be able to import the functions the driver ships to them.
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def is_quiet() -> bool:
    return os.environ.get(QUIET_ENV, "").lower() not in ("", "0", "false", "no")


def available_cpus() -> int:
    """CPUs Ray can schedule on (the driver's own CPU count when Ray is not running)."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _temp_dir() -> str | None:
    temp = project_state_dir() / "ray"
    if len(str(temp)) > _MAX_TEMP_DIR_LEN:
        log.debug("Ray temp dir %s is too long for unix sockets; using Ray's default", temp)
        return None
    temp.mkdir(parents=True, exist_ok=True)
    return str(temp)


def _worker_env() -> dict[str, str]:
    # Only needed when the project is used from a checkout rather than installed.
    paths = [str(_PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths), QUIET_ENV: os.environ.get(QUIET_ENV, "")}


_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_saved_cluster_mode: list = []


def _single_machine_mode(enable: bool) -> None:
    """Keep a local Ray on loopback.

    On Linux Ray advertises the machine's routable address and its GCS, raylet and agents listen
    there, even for a one-machine cluster. Its single-machine mode (the default on macOS and
    Windows) puts every listener on 127.0.0.1. The flag is read by Ray's processes from the
    environment and by this process from ``ray_constants``; both are restored when the local
    session ends so a later session in this process can still join a real cluster.
    """
    from ray._private import ray_constants

    if enable:
        if os.environ.get(_LOOPBACK_ENV) not in (None, "0"):
            return  # the user asked for cluster mode explicitly
        _saved_cluster_mode.append((os.environ.get(_LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER))
        os.environ[_LOOPBACK_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    elif _saved_cluster_mode:
        env_value, constant = _saved_cluster_mode.pop()
        if env_value is None:
            os.environ.pop(_LOOPBACK_ENV, None)
        else:
            os.environ[_LOOPBACK_ENV] = env_value
        ray_constants.ENABLE_RAY_CLUSTER = constant


@contextlib.contextmanager
def ray_session(runtime_cfg: RuntimeConfig | None = None) -> Iterator[None]:
    """Join the running Ray, the configured cluster, or start a local one; stop only what we started."""
    import ray

    runtime_cfg = runtime_cfg or RuntimeConfig()
    # Usage stats would try to reach the network at start-up; this project never needs it.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    started = False
    if not ray.is_initialized():
        kwargs: dict = dict(
            include_dashboard=False,
            log_to_driver=not is_quiet(),
            configure_logging=True,
            logging_level=logging.WARNING,
        )
        if runtime_cfg.ray_address:
            kwargs["address"] = runtime_cfg.ray_address
        else:
            kwargs["num_cpus"] = runtime_cfg.num_cpus
            _single_machine_mode(True)
            kwargs["runtime_env"] = {"env_vars": _worker_env()}
            temp = _temp_dir()
            if temp:
                kwargs["_temp_dir"] = temp
        log.info("starting Ray (%s)", runtime_cfg.ray_address or "local")
        ray.init(**kwargs)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
            _single_machine_mode(False)


def _main() -> None:  # pragma: no cover - manual smoke check: python -m data_prep.ray_runtime
    with ray_session():
        import ray

        print(ray.cluster_resources(), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    _main()
