"""The ``ablate`` flow: every recipe of ``config.ablation`` as Prefect subflows, then the answer.

Waves as ``pretrain_pipeline.ablation.AblationPlan.waves`` orders them; within a wave, runs are
tasks submitted ``ablation.parallel`` at a time, each calling a subflow named after the run whose
stages are the ordinary pipeline's tasks (logs, artifacts and retries as in a single run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows.pipeline import _artifact_key, _preflight, clean_task, evaluate_task, tokenize_task, train_task
from pretrain_pipeline import ablation
from pretrain_pipeline.ablation_report import write_ablation_report
from pretrain_pipeline.config import PipelineConfig
from pretrain_pipeline.stages import forced_stages

STAGE_TASKS = {"clean": clean_task, "tokenize": tokenize_task, "train": train_task, "evaluate": evaluate_task}


def _call_task(stage: str, cfg: PipelineConfig, force: bool) -> dict[str, Any]:
    return STAGE_TASKS[stage](cfg, force)


@flow(name="ablation-run")
def run_flow(config: PipelineConfig, run_name: str, stages: list[str], forced: list[str]) -> dict[str, Any]:
    """One proxy run's stages of one wave (shared stages are linked, not run)."""
    plan = ablation.plan_ablation(config)
    run = next(r for r in plan.runs if r.name == run_name)
    return ablation.run_stages(plan, run, tuple(stages), set(forced), _call_task, get_run_logger().info)


@task(name="ablation-run", cache_policy=NO_CACHE)
def run_task(config: PipelineConfig, name: str, run_name: str, stages: list[str], forced: list[str]) -> dict[str, Any]:
    subflow = run_flow.with_options(flow_run_name=f"{name}/{run_name}: {'+'.join(stages)}")
    return subflow(config, run_name, stages, forced)


# Up to 8 runs of a wave at a time; ablation.parallel decides how many are submitted together.
@flow(name="ablate", task_runner=ThreadPoolTaskRunner(max_workers=8))
def ablate_flow(config: PipelineConfig, force: list[str] | None = None) -> dict[str, Any]:
    """Data-recipe ablation: each recipe's pipeline under runs/<ablation>/<recipe>/, one proxy model and
    one held-out evaluation for all; the table, plots and winner in report.md and as artifacts."""
    forced = sorted(forced_stages(force or ()))
    plan = ablation.plan_ablation(config)
    _preflight(ablation.preflight_config(plan, config), list(ablation.DATA_STAGES + ablation.MODEL_STAGES))
    logger = get_run_logger()
    ablation.prepare_heldout(config, plan, logger.info)
    ablation.record_plan(plan)
    step, done = config.ablation.parallel, {}
    for runs, stages in plan.waves():
        with ablation.shared_ray(plan, stages, runs):
            for i in range(0, len(runs), step):
                futures = {r.name: run_task.submit(config, plan.name, r.name, list(stages), forced) for r in runs[i:i + step]}
                for name, future in futures.items():
                    done.setdefault(name, {}).update(future.result())
    result = {**write_ablation_report(plan, logger.info), "stages": done}
    key = _artifact_key(plan.name, "ablation")
    create_markdown_artifact(key=key, markdown=Path(result["report"]).read_text(), description=f"Ablation {plan.name}")
    create_table_artifact(key=f"{key}-table", table=result["rows"], description=f"Ablation {plan.name}: one row per proxy")
    return result

