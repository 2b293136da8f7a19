"""The one module of ``data_prep`` that talks to Ray: it starts, joins and tunes Ray, and runs
units of work on it.

The stages only say what one unit computes and hand the units to a ``UnitRunner``: ``ray_runner``
runs them as Ray tasks on a local Ray or a cluster, ``LocalRunner`` in this process (tests),
``ProcessPoolRunner`` and ``ThreadPoolRunner`` in processes or threads of this machine.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sized

from tqdm import tqdm

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


# --------------------------------------------------------------------------------------------
# Units of work: the stages say what one unit computes; a runner says where it runs.

# A unit whose worker process died (killed, OOM, node lost) is run again this many times before
# the stage fails naming the unit: a unit that kills every worker it meets must not loop forever.
TASK_RETRIES = 3


class UnitRunner(abc.ABC):
    """Runs ``fn(unit, *shared)`` over units of work and hands back their results.

    The scheduling (a bounded window of units in flight, results in unit or completion order, a
    progress bar, a failure that names its unit and cancels the rest) lives here once; a subclass
    only says how one unit is started, awaited and cancelled, as datatrove keeps its executors
    apart from its pipeline steps.
    """

    @abc.abstractmethod
    def cpus(self) -> int:
        """How many units run at the same time."""

    @abc.abstractmethod
    def _starter(self, fn: Callable[..., Any], shared: tuple) -> Callable[[Any], Any]:
        """A function that starts one unit and returns its handle."""

    @abc.abstractmethod
    def _first_done(self, handles: list[Any]) -> Any:
        """The handle, among ``handles``, of a unit that has finished (waiting for one)."""

    @abc.abstractmethod
    def _result(self, handle: Any) -> Any:
        """The unit's result, or its exception raised."""

    def _cause(self, err: Exception) -> BaseException:
        return err

    def _cancel(self, handle: Any) -> None:
        pass

    def _restart(self, err: Exception) -> bool:
        """After ``err``, start fresh workers if ``err`` means the workers died (all units in flight
        are then lost and started again); False: ``err`` is the unit's own failure."""
        return False

    def map(
        self,
        fn: Callable[..., Any],
        units: Iterable[Any],
        *,
        describe: Callable[[Any], str],
        desc: str,
        shared: tuple = (),
        window: int | None = None,
        ordered: bool = True,
    ) -> Iterator[Any]:
        """``fn(unit, *shared)`` for every unit, with at most ``window`` units started and not yet
        consumed (all of them when None), so a slow consumer bounds the results held in memory
        and units made on the fly (an iterator) are made only as they can start.

        ``ordered`` yields in unit order; otherwise in completion order, which fails at the first
        broken unit whatever its place. ``shared`` arguments are sent once, not once per unit. A
        failing unit raises naming ``describe(unit)`` (an ``OSError`` keeps its errno and file);
        the units not yet consumed are cancelled then, or when the consumer closes the iterator.
        """
        start = self._starter(fn, shared)
        rest = iter(units)
        pending: dict[Any, Any] = {}  # handle -> unit, in start order
        total = len(units) if isinstance(units, Sized) else None
        restarts = 0
        with tqdm(total=total, desc=desc, unit="task", disable=is_quiet()) as bar:
            try:
                for unit in itertools.islice(rest, window):
                    pending[start(unit)] = unit
                while pending:
                    handle = next(iter(pending)) if ordered else self._first_done(list(pending))
                    unit = pending.pop(handle)
                    try:
                        result = self._result(handle)
                    except Exception as err:
                        if restarts < TASK_RETRIES and self._restart(err):
                            restarts += 1
                            pending = {start(u): u for u in (unit, *pending.values())}
                            continue
                        raise _unit_failure(describe(unit), err, self._cause(err)) from err
                    for following in itertools.islice(rest, 1):
                        pending[start(following)] = following
                    yield result
                    bar.update(1)
            finally:
                for handle in pending:
                    self._cancel(handle)


def _unit_failure(what: str, err: Exception, cause: BaseException) -> Exception:
    if isinstance(cause, OSError) and cause.filename:
        # A full disk, say: the file the unit could not write is the news, not its traceback.
        return OSError(cause.errno, f"{what} failed: {cause.strerror}", cause.filename)
    return RuntimeError(f"{what} failed: {err}")


class LocalRunner(UnitRunner):
    """Runs each unit in this process, one at a time, when its result is consumed: the same
    stage code without Ray, for tests and for debugging a unit under pdb."""

    def cpus(self) -> int:
        return 1

    def _starter(self, fn: Callable[..., Any], shared: tuple) -> Callable[[Any], Any]:
        return lambda unit: functools.partial(fn, unit, *shared)

    def _first_done(self, handles: list[Any]) -> Any:
        return handles[0]

    def _result(self, handle: Any) -> Any:
        return handle()


class _ExecutorRunner(UnitRunner):
    """Runs each unit on ``self.pool``, a ``concurrent.futures`` executor of ``self._cpus`` workers."""

    pool: Any
    _cpus: int

    def cpus(self) -> int:
        return self._cpus

    def _starter(self, fn: Callable[..., Any], shared: tuple) -> Callable[[Any], Any]:
        return lambda unit: self.pool.submit(fn, unit, *shared)

    def _first_done(self, handles: list[Any]) -> Any:
        from concurrent.futures import FIRST_COMPLETED, wait

        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return next(h for h in handles if h in done)

    def _result(self, handle: Any) -> Any:
        return handle.result()

    def _cancel(self, handle: Any) -> None:
        handle.cancel()

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the workers once the units started have finished."""

    def __enter__(self) -> "_ExecutorRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class ThreadPoolRunner(_ExecutorRunner):
    """Runs each unit in one of ``threads`` threads of this process: for units whose work
    releases the GIL (Arrow, Parquet, numpy), with nothing to start or pickle."""

    def __init__(self, threads: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._cpus = threads
        self.pool = ThreadPoolExecutor(threads)

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class ProcessPoolRunner(_ExecutorRunner):
    """Runs each unit in a pool of ``cpus`` processes on this machine, without Ray.

    The workers are forked from a forkserver that imported ``preload`` and the main module once
    (so, as with any start method but fork, a script must guard its entry point with
    ``if __name__ == "__main__"``); not forked from the caller, which may hold threads. They start
    in a background thread as soon as the runner is made (the forkserver's imports would otherwise
    hold up the caller), so they are ready before the first unit comes. A worker that dies (killed,
    out of memory) breaks the pool: a fresh pool takes over and the units in flight start again, up
    to ``TASK_RETRIES`` times per map, as Ray retries a task whose worker died. Close it with
    ``shutdown()`` (``process_pool_runner`` does).
    """

    def __init__(self, cpus: int, preload: tuple[str, ...] = ()) -> None:
        import multiprocessing
        import threading
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["__main__", *preload])  # else each worker imports __main__ again
        self._cpus = cpus
        self._new_pool = functools.partial(ProcessPoolExecutor, cpus, mp_context=context, initializer=_exit_when_gone,
                                           initargs=(os.getpid(),))
        self.pool = self._new_pool()
        # Each submit that finds no idle worker starts one; submit is thread-safe.
        self._starting = threading.Thread(target=lambda: [self.pool.submit(int) for _ in range(cpus)], daemon=True)
        self._starting.start()

    def _starter(self, fn: Callable[..., Any], shared: tuple) -> Callable[[Any], Any]:
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        def start(unit: Any) -> Any:
            try:
                return self.pool.submit(fn, unit, *shared)
            except BrokenProcessPool as err:  # broke since the last result: met, and restarted, when awaited
                failed: Future = Future()
                failed.set_exception(err)
                return failed

        return start

    def _restart(self, err: Exception) -> bool:
        from concurrent.futures.process import BrokenProcessPool

        if not isinstance(err, BrokenProcessPool):
            return False
        log.warning("a worker of the process pool died (%s); starting the units in flight again", err)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()
        return True

    def shutdown(self) -> None:
        self._starting.join()
        self.pool.shutdown(wait=True, cancel_futures=True)


def _exit_when_gone(pid: int) -> None:
    """Pool worker initializer: end this worker once process ``pid`` (the pool's maker) is gone.

    A killed maker never shuts its pool down, and a forkserver's workers are neither its children
    nor told: they would wait on their queue forever (and keep the forkserver alive).
    """
    import threading
    import time

    def watch() -> None:
        while True:
            time.sleep(1)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@contextlib.contextmanager
def process_pool_runner(cpus: int, preload: tuple[str, ...] = ()) -> Iterator[ProcessPoolRunner]:
    runner = ProcessPoolRunner(cpus, preload)
    try:
        yield runner
    finally:
        runner.shutdown()


class RayRunner(UnitRunner):
    """Runs each unit as a plain Ray task holding one CPU, wherever the session's cluster has one.

    Plain tasks rather than Ray Data or actors: units are already cut by the stages, results must
    come back in order, and Ray reuses its task workers, so nothing waits for an executor or actor
    processes to start. The task is ``fn`` itself, so a worker's process title names it.
    """

    def __init__(self, retries: int = TASK_RETRIES) -> None:
        self.retries = retries

    def cpus(self) -> int:
        return available_cpus()

    def _starter(self, fn: Callable[..., Any], shared: tuple) -> Callable[[Any], Any]:
        import ray

        task = ray.remote(num_cpus=1, max_retries=self.retries)(fn)
        shared_refs = [ray.put(value) for value in shared]
        return lambda unit: task.remote(unit, *shared_refs)

    def _first_done(self, handles: list[Any]) -> Any:
        import ray

        done, _ = ray.wait(handles, num_returns=1)
        return done[0]

    def _result(self, handle: Any) -> Any:
        import ray

        return ray.get(handle)

    def _cause(self, err: Exception) -> BaseException:
        return getattr(err, "cause", None) or err  # a task's own exception, inside Ray's wrapper

    def _cancel(self, handle: Any) -> None:
        import ray

        ray.cancel(handle, force=True)


@contextlib.contextmanager
def ray_runner(runtime_cfg: RuntimeConfig | None = None) -> Iterator[RayRunner]:
    """A ``RayRunner`` on the Ray of ``ray_session``: the running one, the configured cluster
    address, or a local one started (and stopped) here."""
    with ray_session(runtime_cfg):
        yield RayRunner()


def _main() -> None:  # pragma: no cover - manual smoke check: python -m data_prep.ray_runtime
    with ray_session():
        import ray

        print(ray.cluster_resources(), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    _main()
