"""What the CLI shows on the terminal: by default one progress bar and one summary line per stage.

Everything else (rank output, DeepSpeed and Prefect notices, Ray's start-up warnings) still goes
to the run's log files and to Prefect's run logs; ``--verbose`` shows it here as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator

from tqdm import tqdm

# A stage's own lines ("clean: 3000 documents in, ...") and an ablation's, without the launcher's plan and command.
_STAGE_LINE = re.compile(r"^(clean|tokenize|train|evaluate|export|report|ablation \S+): (?!plan: |\S*/(torchrun|deepspeed|python\S*) )")
# Rank 0's step line, which drives the training progress bar.
_STEP_LINE = re.compile(r"\[pretrain\] step (\d+) loss (\S+)")

# Ray warns at every start of a local cluster that token authentication is on; it stays on.
_RAY_TOKEN_LOGGER = "ray._private.authentication.authentication_token_setup"


class QuietConsole:
    """Decides, line by line, what reaches the terminal; rank 0's step lines move a progress bar."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._bar: tqdm | None = None
        self._out = sys.stdout  # the terminal, also while muted() hides other prints

    @contextlib.contextmanager
    def muted(self) -> Iterator[None]:
        """Libraries' own prints (DeepSpeed's checkpoint consolidation, Ray workers' output) go
        nowhere while a stage runs; this console's lines and the progress bars still show."""
        try:
            with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                yield
        finally:
            self.close_bar()

    def shows(self, line: str) -> bool:
        """Whether ``line`` goes to the terminal; a step line moves the training bar instead."""
        if step := _STEP_LINE.search(line):
            if self._bar is None:
                self._bar = tqdm(total=self.max_steps, desc="train", unit="step", file=sys.stderr)
            self._bar.set_postfix_str(f"loss {step.group(2)}", refresh=False)
            self._bar.update(int(step.group(1)) - self._bar.n)
            return False
        if _STAGE_LINE.match(line):
            self.close_bar()
            return True
        return False

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, line: str) -> None:
        """The ``log`` a stage function is given when it runs without Prefect."""
        if self.shows(line):
            print(line, file=self._out, flush=True)


class _PrefectConsoleFilter(logging.Filter):
    """On Prefect's console handler: a stage's own lines are printed as they are (without Prefect's
    time and run-name prefix), warnings pass, the rest (banners, flow and task state changes,
    failure tracebacks the CLI reports itself) stays in the run logs."""

    def __init__(self, console: QuietConsole) -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        self.console.log(record.getMessage())
        return logging.WARNING <= record.levelno < logging.ERROR and not record.exc_info


def quiet_start_up() -> None:
    """Before Ray or Prefect is imported: their start-up notices stay off the terminal."""
    logging.getLogger(_RAY_TOKEN_LOGGER).setLevel(logging.ERROR)
    # Ray started from a Prefect task's thread (an ablation's subflows) cannot set its SIGTERM
    # handler there, and says so; the stage stops its Ray itself.
    logging.getLogger("ray._private.worker").addFilter(lambda record: "SIGTERM handler is not set" not in record.getMessage())
    # DeepSpeed sets its logger's level when imported; a filter stays (its accelerator notice goes).
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar


def quiet_prefect(console: QuietConsole) -> None:
    """After Prefect configured its logging: filter what its console handler prints."""
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("", "prefect", "uvicorn", "fastapi"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_PrefectConsoleFilter(console))
