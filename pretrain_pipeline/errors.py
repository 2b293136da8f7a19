"""Which failures a user fixes and which may pass on a second try.

A :class:`UserError` (invalid config, missing inputs, a refused resume, no device, a plan that
does not fit) ends the CLI with ``error:`` lines and exit status 2, without a traceback, and no
orchestrator retries it. :func:`is_transient` says what a retry can cure: a lost Ray worker or
node, a transient OS error. Nothing here imports Ray or Prefect.
"""

from __future__ import annotations

import errno
import sys


class UserError(Exception):
    """A failure the user fixes (config, inputs, device, resume, plan); the message names the field or file."""


class MissingInput(UserError, FileNotFoundError):
    """An input the config names is not there: a raw-corpus pattern, or an earlier stage's output."""


# OS errors that a second attempt can get past: a busy or briefly unreachable resource, a stale
# network-filesystem handle, an I/O error of a flaky disk or mount. A missing file, a refused
# permission or a full disk stay the same on a retry.
_TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ESTALE, errno.ETIMEDOUT,
    errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
})

# Ray's exceptions for a worker, actor, node or object lost under a task: the work itself was fine.
_RAY_LOST = ("RayActorError", "WorkerCrashedError", "NodeDiedError", "ObjectLostError", "LocalRayletDiedError")


def _ray_lost_types() -> tuple[type, ...]:
    # Only an imported Ray can have raised one of its exceptions; so no import of Ray here.
    ray_exceptions = sys.modules.get("ray.exceptions")
    return tuple(getattr(ray_exceptions, name) for name in _RAY_LOST if hasattr(ray_exceptions, name))


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or during, outermost first."""
    seen: list[BaseException] = []
    while err is not None and not any(err is s for s in seen):
        seen.append(err)
        context = None if err.__suppress_context__ else err.__context__
        err = err.__cause__ or context or getattr(err, "cause", None)
    return seen


def is_transient(err: BaseException) -> bool:
    """True when a retry may pass: a lost Ray worker, actor, node or object, or a transient OS
    error, anywhere in ``err``'s chain and no :class:`UserError` there. Anything else (a user
    error, a ValueError, a missing input, a bug) fails the same way again."""
    chain = _chain(err)
    if any(isinstance(e, UserError) for e in chain):
        return False
    lost = _ray_lost_types()
    for e in chain:
        if lost and isinstance(e, lost):
            return True
        if isinstance(e, (ConnectionError, TimeoutError)) or (isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS):
            return True
    return False
