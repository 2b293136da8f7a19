"""Prefect flows: one per stage and ``pretrain-pipeline`` for the whole run.

This layer only wires: it calls ``pretrain_pipeline.stages`` (plain Python that also runs
without Prefect), routes stage logs into the Prefect run logs, retries what can fail
transiently and publishes a markdown artifact per stage. Skipping up-to-date stages is done by
the stages' own fingerprints, so Prefect's input-hash caching is switched off here (it would
hash the config but not the data on disk).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pretrain.events import read_events
from data_prep.inspect import examples_by_reason, examples_markdown, funnel_rows
from pretrain_pipeline import stages
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.errors import UserError, is_transient
from pretrain_pipeline.preflight import already_checked, preflight


def _artifact_key(run_name: str, stage: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", f"{run_name}-{stage}".lower()).strip("-")


def _markdown_summary(stage: str, cfg: PipelineConfig, result: dict[str, Any]) -> str:
    rows = []
    flat = result if stage != "tokenize" else {**result.get("tokenizer", {}), **result.get("shards", {})}
    for key, value in flat.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, default=str)
            if len(value) > 200:
                value = value[:197] + "..."
        rows.append(f"| {key} | {value} |")
    return "\n".join(
        [
            f"## {stage}: run `{cfg.runtime.run_name}`",
            f"Run directory: `{cfg.run_dir().resolve()}`",
            "",
            "| field | value |",
            "|---|---|",
            *rows,
        ]
    )


def _clean_artifacts(run: str, clean_dir: Path) -> None:
    """The filter funnel (steps in pipeline order, reasons by filter) and short examples of the
    documents the most frequent reasons dropped, from the clean stage's outputs."""
    stats = json.loads((clean_dir / "stats.json").read_text())
    create_table_artifact(
        key=_artifact_key(run, "filter-funnel"), table=funnel_rows(stats),
        description=f"Filter funnel of run {run}: documents left after each step, in pipeline order",
    )
    examples = examples_markdown(examples_by_reason(clean_dir, top=5, per_reason=3))
    create_markdown_artifact(
        key=_artifact_key(run, "dropped-examples"),
        markdown="\n".join([f"## Dropped documents of run `{run}`", "", *(examples or ["(none dropped)"])]),
        description=f"Three dropped documents for each of the top drop reasons of run {run}",
    )


def _manifest_summary(manifest_path: Path) -> list[dict[str, Any]]:
    """Per split: shard files, documents, tokens and text bytes from the shard manifest."""
    manifest = json.loads(manifest_path.read_text())
    return [{"split": split, **totals} for split, totals in manifest.get("totals", {}).items()]


def _stage_extras(stage: str, cfg: PipelineConfig, result: dict[str, Any]) -> None:
    """Tables and links next to the markdown summary; keys are stable per run so the UI's
    Artifacts page shows their history across reruns."""
    run = cfg.runtime.run_name
    if stage == "clean":
        _clean_artifacts(run, Path(result.get("output_dir") or cfg.run_dir() / "clean"))
    elif stage == "tokenize":
        manifest = Path(result.get("shards", {}).get("manifest_path") or cfg.run_dir() / "shards" / "manifest.json")
        if manifest.exists():
            create_table_artifact(
                key=_artifact_key(run, "shard-manifest"), table=_manifest_summary(manifest),
                description=f"Shard manifest summary of run {run} ({manifest})",
            )
        if (tok_report := cfg.run_dir() / "tokenizer" / "report.md").exists():
            create_markdown_artifact(
                key=_artifact_key(run, "tokenizer-report"), markdown=tok_report.read_text(),
                description=f"Tokenizer report of run {run}: bytes per token, byte fallback, vocabulary use",
            )
    elif stage == "train":
        run_dir = cfg.run_dir().resolve()
        create_link_artifact(
            key=_artifact_key(run, "run-dir"), link=run_dir.as_uri(), link_text=str(run_dir),
            description=f"Run directory of {run}: config, checkpoints, metrics, report",
        )
        events = read_events(run_dir / "train")
        if events:
            create_table_artifact(
                key=_artifact_key(run, "train-events"),
                table=[{k: e.get(k) for k in ("time", "step", "kind", "message")} for e in events],
                description=f"Resumes, conversions, rollbacks and restarts of run {run} (train/events.jsonl)",
            )
        if result.get("wandb_dir"):
            wandb_dir = Path(result["wandb_dir"]).resolve()
            create_link_artifact(
                key=_artifact_key(run, "wandb"), link=wandb_dir.as_uri(), link_text=str(wandb_dir),
                description=f"W&B run {result.get('wandb_run_id')} (offline: `wandb sync {wandb_dir}`)",
            )
    elif stage == "evaluate":
        metrics = {k: result.get(k) for k in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes", "checkpoint_tag")}
        create_table_artifact(
            key=_artifact_key(run, "final-metrics"),
            table=[{"metric": k, "value": v} for k, v in metrics.items()],
            description=f"Held-out metrics of run {run}",
        )


def _run_stage(stage: str, cfg: PipelineConfig, force: bool) -> dict[str, Any]:
    logger = get_run_logger()
    result = stages.STAGE_FUNCTIONS[stage](cfg, force=force, log=logger.info)
    create_markdown_artifact(
        key=_artifact_key(cfg.runtime.run_name, stage),
        markdown=_markdown_summary(stage, cfg, result),
        description=f"{stage} stage of run {cfg.runtime.run_name}",
    )
    _stage_extras(stage, cfg, result)
    return result


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for the stage tasks: retry a lost Ray worker or a transient OS
    error; a user error, a bad value or a missing input would only fail the same way again."""
    err = state.result(raise_on_failure=False)
    return isinstance(err, BaseException) and is_transient(err)


# Data stages can fail on a flaky worker or filesystem; a retry redoes only unfinished work.
@task(name="clean", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def clean_task(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    return _run_stage("clean", cfg, force)


@task(name="tokenize", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def tokenize_task(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    return _run_stage("tokenize", cfg, force)


# A retried training task resumes from its latest checkpoint rather than starting over.
@task(name="train", retries=1, retry_delay_seconds=10, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def train_task(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    return _run_stage("train", cfg, force)


@task(name="evaluate", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def evaluate_task(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    return _run_stage("evaluate", cfg, force)


@task(name="export", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def export_task(cfg: PipelineConfig, force: bool = False) -> dict[str, Any]:
    return _run_stage("export", cfg, force)


@task(name="report", cache_policy=NO_CACHE)
def report_task(cfg: PipelineConfig) -> str:
    path = stages.report(cfg, log=get_run_logger().info)
    create_markdown_artifact(
        key=_artifact_key(cfg.runtime.run_name, "report"),
        markdown=path.read_text(),
        description=f"Run report of {cfg.runtime.run_name}",
    )
    return str(path)


class PreflightFailed(UserError):
    """The config cannot run here (missing inputs, no device, ...): one line per problem."""


def _preflight(config: PipelineConfig, stage_names: list[str]) -> None:
    # Deployments start flows without the CLI: refuse before any task (and its retries) starts.
    if already_checked(config, stage_names):  # the CLI that started this flow just did
        return
    problems = preflight(config, stage_names)
    if problems:
        raise PreflightFailed("\n".join(str(p) for p in problems))


@flow(name="clean")
def clean_flow(config: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Clean and deduplicate the raw corpus on Ray."""
    _preflight(config, ["clean"])
    return clean_task(config, force)


@flow(name="tokenize")
def tokenize_flow(config: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Train the SentencePiece tokenizer and write Arrow shards on Ray."""
    _preflight(config, ["tokenize"])
    return tokenize_task(config, force)


@flow(name="train")
def train_flow(config: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Pretrain the GPT with DeepSpeed ZeRO; logs stream into this run."""
    _preflight(config, ["train"])
    return train_task(config, force)


@flow(name="evaluate")
def evaluate_flow(config: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Held-out perplexity, bits per byte and sample generations."""
    _preflight(config, ["evaluate"])
    return evaluate_task(config, force)


@flow(name="export")
def export_flow(config: PipelineConfig, force: bool = False) -> dict[str, Any]:
    """Export the trained model to Hugging Face format."""
    _preflight(config, ["export"])
    return export_task(config, force)


@flow(name="pretrain-pipeline")
def pretrain_pipeline(config: PipelineConfig, force: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline: clean -> tokenize -> train -> evaluate -> export -> report.

    ``force`` lists stages to redo even when their outputs are current ("all" for every stage);
    stages after a redone one notice their inputs changed and redo themselves.
    """
    forced = stages.forced_stages(force or ())
    _preflight(config, list(stages.STAGES))
    results: dict[str, Any] = {
        "clean": clean_task(config, "clean" in forced),
        "tokenize": tokenize_task(config, "tokenize" in forced),
        "train": train_task(config, "train" in forced),
        "evaluate": evaluate_task(config, "evaluate" in forced),
        "export": export_task(config, "export" in forced),
    }
    results["report"] = report_task(config)
    return results
