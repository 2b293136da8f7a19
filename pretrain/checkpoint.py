"""Training checkpoints: writing them so a crash never leaves one that passes for complete, and
reading them back without running pickled code.

A tag (``checkpoints/step_000100/``) holds DeepSpeed's files (``*model_states.pt``,
``*optim_states.pt``), our client state (``client_state.pt``: step, tokens, data cursor, RNG states,
W&B id) and, written last by rank 0 once every rank has saved, ``_COMPLETE.json`` with each file's
size and sha256. Only then does ``latest`` move. A tag without the record is an interrupted save
and is ignored; a tag whose files no longer match it (truncated, corrupted) is refused by name and
the previous complete tag is used instead.

Everything is read with ``torch.load(weights_only=True)``: our client state holds only tensors and
plain containers, and DeepSpeed's files need just the few DeepSpeed classes in
``deepspeed_safe_globals`` (plain data holders, allow-listed explicitly). A file that pickles
anything else is refused before any of its code could run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pretrain_pipeline.artifacts import atomic_write_json, atomic_write_text, read_json, sha256_file

log = logging.getLogger(__name__)

TAG_RE = re.compile(r"^step_(\d{6,})$")
COMPLETE_FILE = "_COMPLETE.json"
CLIENT_STATE_FILE = "client_state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def tag_for(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(tag: str) -> int:
    return int(TAG_RE.match(tag).group(1))


def _tag_dirs(checkpoint_dir: str | Path) -> list[str]:
    """Every ``step_*`` directory, complete or not, oldest first."""
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=_step_of)


def is_complete(tag_dir: str | Path) -> bool:
    return (Path(tag_dir) / COMPLETE_FILE).is_file()


def list_tags(checkpoint_dir: str | Path) -> list[str]:
    """Complete checkpoint tags (their save finished on every rank), oldest first."""
    return [t for t in _tag_dirs(checkpoint_dir) if is_complete(Path(checkpoint_dir) / t)]


# sha256 of files this process has already hashed (or written), keyed by identity and stat, so a
# tag verified at resume or written by this rank is not read again in the same process.
_HASHES: dict[tuple, str] = {}


def _file_sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def write_completion_record(tag_dir: str | Path) -> dict[str, Any]:
    """Record every file of a fully saved tag (size + sha256); written atomically, last."""
    tag_dir = Path(tag_dir)
    files = {}
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file() and p.name != COMPLETE_FILE):
        files[path.relative_to(tag_dir).as_posix()] = {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
    record = {"tag": tag_dir.name, "files": files, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_json(tag_dir / COMPLETE_FILE, record)
    return record


def verify_tag(checkpoint_dir: str | Path, tag: str, hashes: bool = True) -> None:
    """Raise :class:`CheckpointError` naming the first file of ``tag`` that does not match its record."""
    tag_dir = Path(checkpoint_dir) / tag
    record_path = tag_dir / COMPLETE_FILE
    if not record_path.is_file():
        raise CheckpointError(f"checkpoint {tag_dir} is incomplete: {record_path} is missing (its save did not finish)")
    try:
        record = read_json(record_path)
        files = record["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint record {record_path} is unreadable: {err}") from None
    if not files:
        raise CheckpointError(f"checkpoint record {record_path} lists no files")
    for name, want in files.items():
        path = tag_dir / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {record_path})")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(
                f"checkpoint file {path} is {size} bytes, {want['bytes']} when saved (truncated or overwritten)"
            )
        if hashes and _file_sha256(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {path} does not match its sha256 in {record_path} (corrupted)")


def find_usable_tag(checkpoint_dir: str | Path, verify: bool = True) -> tuple[str | None, list[str]]:
    """The newest tag whose files match its record, and why each newer tag was passed over."""
    passed_over: list[str] = []
    for tag in reversed(_tag_dirs(checkpoint_dir)):
        try:
            verify_tag(checkpoint_dir, tag, hashes=verify)
            return tag, passed_over
        except CheckpointError as err:
            passed_over.append(str(err))
    return None, passed_over


def latest_tag(checkpoint_dir: str | Path, verify: bool = True, warn: Callable[[str], Any] | None = None) -> str | None:
    """The newest usable tag; None when there is no complete one at all.

    A newer tag that is incomplete (killed mid-save) or damaged is skipped with a warning naming
    the file. When tags were saved completely but every one is damaged this raises instead: going
    on from scratch would silently throw the run away. ``verify=False`` checks sizes only.
    """
    tag, passed_over = find_usable_tag(checkpoint_dir, verify)
    warn = warn or log.warning
    for reason in passed_over:
        warn(f"{reason}; falling back to an older checkpoint" if tag else reason)
    if tag is None and list_tags(checkpoint_dir):
        raise CheckpointError(f"no usable checkpoint in {checkpoint_dir}: " + "; ".join(passed_over))
    return tag


def require_tag(checkpoint_dir: str | Path, verify: bool = True) -> str:
    """:func:`latest_tag` for readers (eval, export): no usable checkpoint is an error naming why."""
    tag, passed_over = find_usable_tag(checkpoint_dir, verify)
    if tag is None:
        why = "; ".join(passed_over) or "no checkpoint was saved"
        raise FileNotFoundError(f"no usable checkpoint in {checkpoint_dir}: {why}")
    for reason in passed_over:
        log.warning("%s; using %s instead", reason, tag)
    return tag


def prune_checkpoints(checkpoint_dir: str | Path, keep: int, protect: str | None = None) -> list[str]:
    """Delete all but the newest ``keep`` complete tags, and interrupted saves older than the newest
    complete tag. The newest complete tag (and ``protect``, the one just saved) is never deleted."""
    tags = list_tags(checkpoint_dir)
    if not tags:
        return []
    newest = tags[-1]
    doomed = tags[: max(0, len(tags) - max(keep, 1))]
    doomed += [t for t in _tag_dirs(checkpoint_dir) if t not in tags and _step_of(t) < _step_of(newest)]
    removed = []
    for tag in sorted(set(doomed) - {newest, protect}, key=_step_of):
        shutil.rmtree(Path(checkpoint_dir) / tag, ignore_errors=True)
        removed.append(tag)
    return removed


# --------------------------------------------------------------------------------------------
# Client state: tensors and plain containers only, so it loads with weights_only=True.


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers (no numpy objects, no pickled classes)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _plain(value: Any, where: str) -> Any:
    """``value`` as tensors, str/int/float/bool/None, lists and str-keyed dicts; numpy is converted."""
    import numpy as np

    if value is None or isinstance(value, (str, bool, int, float, torch.Tensor)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"client state {where} is a {type(value).__name__}; only tensors and plain data are saved")


def save_client_state(tag_dir: str | Path, state: dict[str, Any]) -> Path:
    path = Path(tag_dir) / CLIENT_STATE_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(_plain(state, "pretrain"), tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return path


def safe_load(path: str | Path, map_location: Any = "cpu", extra_globals: list | None = None) -> Any:
    """``torch.load(weights_only=True)``; a file that is damaged or pickles anything beyond tensors,
    plain data and ``extra_globals`` raises :class:`CheckpointError` naming it (nothing in it runs)."""
    try:
        with torch.serialization.safe_globals(extra_globals or []):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; the line naming the offending global is the news.
        lines = str(err).splitlines()
        why = next((x.strip() for x in lines if "Unsupported global" in x or "Unsupported operand" in x), lines[0] if lines else "")
        raise CheckpointError(f"refusing to load {path}: it holds more than tensors and plain data ({why[:300]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint file {path}: {err}") from err


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed pickles into its checkpoint files (0.19, ZeRO 0-3, fp32/bf16/fp16),
    found with ``torch.serialization.get_unsafe_globals_in_checkpoint``. Each is a plain holder of
    numbers (an enum, a dataclass of two ints, the loss scalers' settings); allowing them lets the
    unpickler rebuild them from their fields, which runs none of their code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def safe_checkpoint_engine(engine: Any) -> None:
    """Make DeepSpeed read this engine's checkpoints with weights_only=True and name the file of a
    failed write (DeepSpeed's torch checkpoint engine loads with weights_only=False)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            return safe_load(path, map_location, deepspeed_safe_globals())

        def save(self, state_dict, path: str):
            try:
                super().save(state_dict, path)
            except (RuntimeError, OSError) as err:
                raise CheckpointError(f"could not write checkpoint file {path}: {err}{_free_space_note(path)}") from err

    current = getattr(engine, "checkpoint_engine", None)
    if type(current) is TorchCheckpointEngine:  # leave a configured (async, Nebula) engine alone
        safe = SafeTorchCheckpointEngine.__new__(SafeTorchCheckpointEngine)
        safe.__dict__.update(current.__dict__)
        engine.checkpoint_engine = safe


def _free_space_note(path: str | Path) -> str:
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(Path(path).parent).free
        return f" ({free:,} bytes free on that file system)"
    return ""


def load_consolidated_state_dict(
    checkpoint_dir: str | Path, tag: str | None = None, *, lazy: bool = False
) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint written at any ZeRO stage and world size.

    The checkpoint files are memory-mapped, so what is resident is the consolidated copy, not the
    ZeRO fragments and their optimizer states as well. With ``lazy=True`` nothing is consolidated
    up front: each value has ``.shape``, ``.dtype`` and ``.contiguous()``, which builds that one
    tensor (``.contiguous().float()`` gives exactly what ``lazy=False`` holds), so a writer can
    stream a model larger than memory tensor by tensor. Tied weights are one object under two names.
    - ZeRO-1/2/3: DeepSpeed's ``zero_to_fp32`` in lazy mode (optimizer files opened with
      ``torch.load(mmap=True)``); ZeRO-3 values are its ``GatheredTensor``s, which gather a
      parameter from every rank's flat partition only when asked. ZeRO-1/2 store each group as one
      flat vector split across ranks: DeepSpeed concatenates it once, values are views into it.
      ``zero_to_fp32`` unpickles with ``weights_only=False``, so every file is first checked to
      pickle nothing beyond ``deepspeed_safe_globals`` (read from the pickle, running none of it).
    - ZeRO-0: the model file holds the full weights: ``torch.load(mmap=True, weights_only=True)``.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or latest_tag(checkpoint_dir)
    if tag is None or not (checkpoint_dir / tag).is_dir():
        raise FileNotFoundError(f"no checkpoint {tag or '(latest)'} in {checkpoint_dir}")
    tag_dir = checkpoint_dir / tag
    allowed = deepspeed_safe_globals()
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
        for f in sorted(tag_dir.glob("*.pt")):
            try:
                unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - names
            except Exception as err:  # not a torch zip file, truncated, ...
                raise CheckpointError(f"cannot read checkpoint file {f}: {err}") from err
            if unsafe:
                raise CheckpointError(f"refusing to load {f}: it pickles {sorted(unsafe)}, not just tensors and plain data")
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, lazy_mode=True)
    else:  # ZeRO stage 0: the model file holds the full weights
        files = sorted(tag_dir.glob("*mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{tag_dir} holds no DeepSpeed model states")
        try:
            with torch.serialization.safe_globals(allowed):
                state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)["module"]
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"refusing to load {files[0]}: it holds more than tensors and plain data ({err})") from None
        except (RuntimeError, EOFError, OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"cannot read checkpoint file {files[0]}: {err}") from err
    if lazy:
        return dict(state)
    built: dict[int, torch.Tensor] = {}  # a tied weight is built once and shared, as in the model
    out = {}
    for name, value in state.items():
        if id(value) not in built:
            built[id(value)] = value.contiguous().detach().float()
        out[name] = built[id(value)]
    return out


def load_client_state(checkpoint_dir: str | Path, tag: str | None = None) -> dict:
    """Our training state saved next to the weights (step, tokens, data cursor, RNG, wandb id).

    Read with ``weights_only=True``: it holds only tensors and plain containers.
    """
    checkpoint_dir = Path(checkpoint_dir)
    tag = tag or require_tag(checkpoint_dir)
    path = checkpoint_dir / tag / CLIENT_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_dir / tag} has no {CLIENT_STATE_FILE} (not written by this pipeline)")
    state = safe_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a client state dict")
    return state


def resume_refusal(state: dict[str, Any], model_fingerprint: str, checkpoint_dir: str | Path) -> str | None:
    """Why a checkpoint (its client state) cannot continue this model config, or None. The ranks
    check it before DeepSpeed reads any weight, the preflight before anything starts."""
    if state.get("model_fingerprint") != model_fingerprint:
        return (f"{checkpoint_dir} holds checkpoints of a different model config; "
                "set train.resume: never (they are moved aside) or use another run name")
    return None


def zero_stages_of(tag_dir: str | Path) -> list[int]:
    """The ZeRO stages whose file layout a tag has, for checkpoints that do not record their stage.

    ZeRO-0 keeps the optimizer inside ``mp_rank_*_model_states.pt``; ZeRO-1/2 (one layout) add
    ``*_optim_states.pt`` per rank; ZeRO-3 also writes ``zero_pp_rank_*_model_states.pt``.
    """
    names = [f.name for f in Path(tag_dir).glob("*_states.pt")]
    if not any(n.endswith("optim_states.pt") for n in names):
        return [0]
    if any(n.startswith("zero_pp_rank_") and n.endswith("model_states.pt") for n in names):
        return [3]
    return [1, 2]


# --------------------------------------------------------------------------------------------
# The training side: every rank calls these together.


def _ds(engine: Any) -> Any:
    return getattr(engine, "ds", engine)  # our Engine wrapper or a bare DeepSpeed engine


def save_checkpoint(engine: Any, checkpoint_dir: str | Path, tag: str, client_state: dict[str, Any], keep: int) -> str:
    """DeepSpeed save on every rank, then (rank 0) client state, completion record, ``latest``, prune.

    DeepSpeed's own ``latest`` is written by rank 0 as soon as *its* files are saved, possibly while
    other ranks are still writing theirs, so we pass ``save_latest=False`` and move ``latest``
    ourselves after the record. A crash anywhere before the record leaves a tag that is ignored.
    """
    import torch.distributed as dist

    checkpoint_dir = Path(checkpoint_dir)
    tag_dir = checkpoint_dir / tag
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():
        # An interrupted (or refused) earlier save of this step: never mix its files with the new ones.
        shutil.rmtree(tag_dir)
    dist.barrier()
    safe_checkpoint_engine(_ds(engine))
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state={}, save_latest=False)
    dist.barrier()  # every rank's files are on disk
    if rank == 0:
        target = tag_dir / CLIENT_STATE_FILE
        try:
            save_client_state(tag_dir, client_state)
            target = tag_dir / COMPLETE_FILE
            write_completion_record(tag_dir)
            target = checkpoint_dir / "latest"
            atomic_write_text(target, tag)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            raise CheckpointError(f"could not write checkpoint file {target}: {err}{_free_space_note(target)}") from err
        prune_checkpoints(checkpoint_dir, keep, protect=tag)
    dist.barrier()
    return tag


def _set_aside(checkpoint_dir: Path, tags: list[str], log_line: Callable[[str], Any]) -> None:
    """Tags newer than the one resumed from: interrupted saves are deleted, damaged ones renamed
    (``<tag>.damaged``) so they are kept for inspection but never chosen or counted again."""
    for tag in tags:
        path = checkpoint_dir / tag
        if not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            continue
        aside = checkpoint_dir / f"{tag}.damaged"
        shutil.rmtree(aside, ignore_errors=True)
        path.rename(aside)
        log_line(f"moved damaged checkpoint {path} to {aside}")


def load_checkpoint(
    engine: Any,
    checkpoint_dir: str | Path,
    log_line: Callable[[str], Any] = print,
    check: Callable[[dict[str, Any]], Any] | None = None,
    convert: Callable[[str, dict[str, Any]], bool] | None = None,
) -> tuple[str, dict[str, Any]] | None:
    """Resume every rank from the newest usable tag (chosen by rank 0); None when there is none.

    Returns the tag and our client state (``check`` sees it before DeepSpeed reads any weights;
    ``convert(tag, state)`` loads a checkpoint written on another world size or ZeRO stage itself
    and returns True, or returns False for DeepSpeed's own load). A
    damaged newest tag is refused with a line naming the file and the previous complete one is
    used; when every complete tag is damaged this raises.
    """
    import torch.distributed as dist

    checkpoint_dir = Path(checkpoint_dir)
    rank = dist.get_rank()
    choice: list[Any] = [None, None]
    if rank == 0:
        try:
            tag = latest_tag(checkpoint_dir, warn=log_line)
            newer = [t for t in _tag_dirs(checkpoint_dir) if tag is None or _step_of(t) > _step_of(tag)]
            if tag is None and newer:
                log_line(f"no complete checkpoint in {checkpoint_dir} (interrupted saves: {newer}); starting from step 0")
            _set_aside(checkpoint_dir, newer, log_line)
            choice = [tag, None]
        except CheckpointError as err:
            choice = [None, f"{err}. Move the damaged tags aside to start over, or set train.resume: never"]
    dist.broadcast_object_list(choice, src=0)
    tag, error = choice
    if error:
        raise CheckpointError(error)
    if tag is None:
        return None
    state = load_client_state(checkpoint_dir, tag)
    if "zero_stage" not in state:  # saved before checkpoints recorded it: read it off the files
        state["zero_stages_from_files"] = zero_stages_of(checkpoint_dir / tag)
    if check:
        check(state)
    if convert and convert(tag, state):
        return tag, state
    safe_checkpoint_engine(_ds(engine))
    load_path, _ = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}")
    return tag, state
