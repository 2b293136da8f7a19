"""Run directory layout, atomic writes and stage completion records.

The building blocks of the stage protocol (``pretrain_pipeline/stage.py``): a stage writes under
temporary names and renames into place; the last thing it writes is ``_SUCCESS.json`` holding the
fingerprint (config section + upstream hashes + code version) that made the outputs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pretrain_pipeline import __version__

SUCCESS_FILE = "_SUCCESS.json"


@dataclass(frozen=True)
class RunPaths:
    """Where each stage of one run reads and writes (``runs/<name>/...``)."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def clean(self) -> Path:
        return self.root / "clean"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def train(self) -> Path:
        """Holds the training stage's completion record and launcher logs."""
        return self.root / "train"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def plots(self) -> Path:
        return self.root / "plots"


def project_state_dir() -> Path:
    """Caches shared by all runs (compiled DeepSpeed ops, Prefect's database, Ray temp files)."""
    return Path(os.environ.get("PRETRAIN_PIPELINE_STATE", ".state")).resolve()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """Hash of JSON-serialisable parts plus the package version."""
    blob = json.dumps([__version__, *parts], sort_keys=True, default=str).encode()
    return sha256_bytes(blob)


# Errors that mean "no room for this file": a full disk, a full quota, the file-size limit (ulimit -f).
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# How a Rust writer (safetensors) reports an OS error: the message ends "(os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """Re-raise "no room" while writing ``path`` as an ``OSError`` that names ``path``.

    pyarrow, ``file.write`` and safetensors report a full disk as a bare "[Errno 28] No space left
    on device" (safetensors not even as an ``OSError``); only the code writing the file knows its
    name. Other errors, and ones that already name a file, pass unchanged.
    """
    try:
        yield
    except OSError as err:
        if err.errno not in _NO_ROOM or err.filename is not None:
            raise
        raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
    except Exception as err:
        found = _RUST_OS_ERROR.search(str(err))
        if found is None or int(found.group(1)) not in _NO_ROOM:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600; give the file the mode any other new file would get.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with naming_file(path), os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Delete what a killed writer of ``path`` left behind (``.<name>.tmp-<pid>`` of a dead pid)."""
    for leftover in path.parent.glob(f".{path.name}.tmp-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def replace_path(tmp: Path, path: Path) -> None:
    """Move ``tmp`` (a file or directory) to ``path``, replacing what is there."""
    if path.is_dir() and tmp.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed to ``path`` (file or directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.is_dir():
        shutil.rmtree(tmp)
    elif tmp.exists():
        tmp.unlink()
    try:
        yield tmp
        replace_path(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def stage_is_current(stage_dir: str | Path, stage_fingerprint: str) -> bool:
    record = Path(stage_dir) / SUCCESS_FILE
    if not record.exists():
        return False
    try:
        return read_json(record).get("fingerprint") == stage_fingerprint
    except ValueError:
        return False


def mark_stage_done(stage_dir: str | Path, stage_fingerprint: str, summary: dict[str, Any]) -> None:
    atomic_write_json(Path(stage_dir) / SUCCESS_FILE, {"fingerprint": stage_fingerprint, **summary})


def read_stage_record(stage_dir: str | Path) -> dict[str, Any] | None:
    record = Path(stage_dir) / SUCCESS_FILE
    return read_json(record) if record.exists() else None
