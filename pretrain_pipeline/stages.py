"""The pipeline's stages as plain functions: what the CLI calls directly and what flows/ wraps.

Each stage takes the validated config, works in ``runs/<run_name>/`` and returns a small dict of
paths and figures. Each follows the protocol of ``pretrain_pipeline/stage.py``: it skips itself
when its completion record matches the fingerprint of its inputs and config section;
``force=True`` redoes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pretrain_pipeline.artifacts import project_state_dir
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.stage import prepare_run

STAGES = ("clean", "tokenize", "train", "evaluate", "export")

Log = Callable[[str], None]


def forced_stages(force: Iterable[str]) -> set[str]:
    """The stages to redo for a ``force`` list ("all" means every stage); an unknown name is an error."""
    force = set(force)
    unknown = force - set(STAGES) - {"all"}
    if unknown:
        raise ValueError(f"unknown stage(s) to force: {sorted(unknown)}; stages are {STAGES}")
    return set(STAGES) if "all" in force else force


def _figure(value: Any) -> str:
    """A metric for a summary line: four significant digits (the files keep every digit)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _result(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def clean(cfg: PipelineConfig, force: bool = False, log: Log = print) -> dict[str, Any]:
    from data_prep.clean import clean_corpus

    paths = prepare_run(cfg)
    # clean_corpus starts Ray only when it has work: a current stage skips in a second.
    result = _result(clean_corpus(cfg, paths, force=force))
    log(f"clean: {result.get('docs_in')} documents in, {result.get('kept')} kept -> {paths.clean}")
    return result


def tokenize(cfg: PipelineConfig, force: bool = False, log: Log = print) -> dict[str, Any]:
    from data_prep.shards import encode_runner, write_shards
    from data_prep.tokenizer import train_tokenizer
    from data_prep.tokenizer_report import write_tokenizer_report

    paths = prepare_run(cfg)
    # The encode workers start first, so they are up by the time the tokenizer is trained.
    with encode_runner(cfg, paths) as runner:
        tok = _result(train_tokenizer(cfg, paths, force=force))
        shards = _result(write_shards(cfg, paths, force=force, runner=runner))
    tok["report"] = str(write_tokenizer_report(paths))
    source = f" (tokenizer of run {tok['from_run']!r})" if tok.get("from_run") else ""
    log(
        f"tokenize: vocab {tok.get('vocab_size')}{source}, "
        f"{shards.get('train_tokens')} train / {shards.get('val_tokens')} val tokens -> {paths.shards}"
    )
    return {"tokenizer": tok, "shards": shards}


def train(cfg: PipelineConfig, force: bool = False, log: Log = print) -> dict[str, Any]:
    from pretrain.launch import launch_training

    paths = prepare_run(cfg)
    result = _result(launch_training(cfg, paths, force=force, log=log))
    log(f"train: {result.get('steps')} steps, final loss {_figure(result.get('final_loss'))}")
    return result


def evaluate(cfg: PipelineConfig, force: bool = False, log: Log = print) -> dict[str, Any]:
    from pretrain.evaluate import evaluate as run_eval

    paths = prepare_run(cfg)
    result = _result(run_eval(cfg, paths, force=force))
    log(f"evaluate: val loss {_figure(result.get('loss'))}, ppl {_figure(result.get('perplexity'))}, "
        f"bpb {_figure(result.get('bits_per_byte'))}"
        + (f", held-out bpb {_figure(result['heldout']['bits_per_byte'])}" if result.get("heldout") else "")
        + "".join(f"; {task} {metrics}" for task, metrics in (result.get("lm_eval") or {}).items()))
    return result


def export(cfg: PipelineConfig, force: bool = False, log: Log = print) -> dict[str, Any]:
    from pretrain.export import export as run_export

    paths = prepare_run(cfg)
    result = _result(run_export(cfg, paths, force=force))
    log(f"export: {result.get('hf_dir')}")
    return result


def report(cfg: PipelineConfig, log: Log = print) -> Path:
    from pretrain_pipeline.report import write_report

    paths = prepare_run(cfg)
    path = write_report(paths)
    log(f"report: {path}")
    return path


STAGE_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "clean": clean,
    "tokenize": tokenize,
    "train": train,
    "evaluate": evaluate,
    "export": export,
}


def run_all(cfg: PipelineConfig, force: set[str] | None = None, log: Log = print) -> dict[str, Any]:
    """The whole pipeline without Prefect (the Prefect flow in flows/ calls the same functions)."""
    forced = forced_stages(force or ())
    results: dict[str, Any] = {}
    for name in STAGES:
        results[name] = STAGE_FUNCTIONS[name](cfg, force=name in forced, log=log)
    results["report"] = str(report(cfg, log=log))
    return results


def configure_environment() -> None:
    """Process-wide defaults that must be set before Prefect, Ray or DeepSpeed are imported."""
    state = project_state_dir()
    os.environ.setdefault("PREFECT_HOME", str(state / "prefect"))
    # Prefect creates its home but not the parents, and then fails to open its database.
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(state / "torch_extensions"))
    # Without PREFECT_API_URL, Prefect starts a temporary local server; on a fresh database and
    # a loaded 2-core machine its migrations take longer than Prefect's 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("WANDB_SILENT", "true")
    # Ray's usage stats would try the network, which is closed here and undesirable on clusters.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DO_NOT_TRACK", "1")
