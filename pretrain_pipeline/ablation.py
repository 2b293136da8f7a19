"""Data-recipe ablations: which cleaning, tokenizer or mixture recipe makes the better model.

A recipe is the ordinary pipeline (clean -> tokenize -> train -> evaluate) on the base config with a
few ``data.*``, ``tokenizer.*`` or ``train.data_mixture`` fields changed, run under
``<runs_root>/<ablation>/<recipe>/``. Everything else is the same for every recipe: the proxy model
and its token budget, the held-out bytes scored in bits per byte (comparable across tokenizers) and
the lm-eval tasks. So the table answers one question: which data makes the better model.

Sharing: a stage whose config and inputs are the same in two runs runs once; the later run's stage
directories are links to the earlier run's (the seeds of a recipe share its data; a recipe that only
changes the mixture shares the reference's). The first recipe is the reference: it trains the
tokenizer every recipe that leaves ``tokenizer.*`` alone reuses (``tokenizer.from_run``), so the
comparison is of data, not of tokenizers. Everything else is the stage protocol: a rerun skips what
is current, a killed ablation resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain_pipeline.artifacts import RunPaths, atomic_write_json, read_json
from pretrain_pipeline.config import AblationConfig, ModelConfig, PipelineConfig, build_config, set_dotted
from pretrain_pipeline.errors import UserError
from pretrain_pipeline.stage import Stage, prepare_run

Log = Callable[[str], None]
# Runs a list of stages of one run and returns their results: plain calls, or Prefect tasks.
StageCall = Callable[[str, PipelineConfig, bool], dict[str, Any]]

DATA_STAGES = ("clean", "tokenize")
MODEL_STAGES = ("train", "evaluate")
# The directories a data stage writes, linked when another run shares the stage.
STAGE_DIRS = {"clean": ("clean",), "tokenize": ("tokenizer", "shards")}
# Also linked: the sample corpus the clean stage builds (the same for every recipe of a size and seed).
SHARED_DIRS = {"raw": ("raw",), **STAGE_DIRS}
TIMES_FILE = "ablation_times.json"  # in each run: wall seconds of the stages that ran there


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AblationRun:
    """One proxy: a recipe at one seed, with the keys that decide which data stages it shares."""

    recipe: str
    seed_index: int
    overrides: dict[str, Any]
    config: PipelineConfig
    keys: dict[str, str]  # shared directory group (raw, clean, tokenize) -> identity of its contents

    @property
    def name(self) -> str:
        return self.config.runtime.run_name

    @property
    def paths(self) -> RunPaths:
        return RunPaths(self.config.run_dir())


@dataclass
class AblationPlan:
    name: str
    root: Path
    settings: AblationConfig
    runs: list[AblationRun] = field(default_factory=list)

    @property
    def reference(self) -> AblationRun:
        return self.runs[0]

    def owner(self, run: AblationRun, stage: str) -> AblationRun | None:
        """The earlier run whose outputs of ``stage`` this run uses, if any."""
        for other in self.runs:
            if other is run:
                return None
            if other.keys[stage] == run.keys[stage]:
                return other
        return None

    def waves(self) -> list[tuple[list[AblationRun], tuple[str, ...]]]:
        """What runs when: the reference's data (its tokenizer is everyone's), the other data, then
        every proxy's training and evaluation (a mixture recipe needs its sources' shards)."""
        others = [r for r in self.runs[1:] if any(self.owner(r, s) is None for s in DATA_STAGES)]
        return [([self.reference], DATA_STAGES), (others, DATA_STAGES), (self.runs, MODEL_STAGES)]


def recipe_diff(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in overrides.items()) or "(base config)"


def _proxy_tree(cfg: PipelineConfig, name: str, root: Path, heldout: list[str]) -> dict[str, Any]:
    """The base config as every proxy runs it: proxy model, fixed evaluation, the ablation's W&B group."""
    settings = cfg.ablation
    tree = cfg.model_dump(mode="json")
    tree.pop("ablation")
    if settings.proxy.preset:
        tree["model"] = {"preset": settings.proxy.preset, "vocab_size": cfg.model.vocab_size}
    if settings.proxy.train_tokens:
        per_step = cfg.train.tokens_per_step(ModelConfig.model_validate(tree["model"]).block_size)
        tree["train"]["max_steps"] = max(1, math.ceil(settings.proxy.train_tokens / per_step))
    tree["eval"]["heldout_inputs"] = heldout
    if settings.lm_eval_tasks is not None:
        tree["eval"]["lm_eval_tasks"] = list(settings.lm_eval_tasks)
    tree["tracking"]["group"] = name
    tree["tracking"]["tags"] = [*cfg.tracking.tags, "ablation"]
    tree["runtime"]["runs_root"] = str(root)
    return tree


def _check_base(cfg: PipelineConfig) -> None:
    if not cfg.ablation.recipes:
        raise UserError("ablation.recipes is empty: name at least two recipes, e.g. {baseline: {}, strict: "
                        "{data.gopher_quality.min_words: 50}}")
    if cfg.tokenizer.from_run or cfg.train.data_mixture:
        raise UserError("an ablation's base config sets tokenizer.from_run or train.data_mixture: the ablation decides "
                        "both (the reference recipe's tokenizer; mixtures of recipes in a recipe's train.data_mixture)")


def plan_ablation(cfg: PipelineConfig) -> AblationPlan:
    """Every proxy run of the ablation, validated, before anything starts (a bad recipe is a user error)."""
    _check_base(cfg)
    settings = cfg.ablation
    name = settings.name or cfg.runtime.run_name
    root = Path(cfg.runtime.runs_root) / name
    plan = AblationPlan(name, root, settings)
    base = _proxy_tree(cfg, name, root, heldout_inputs(cfg, root))
    recipes = list(settings.recipes)
    for recipe, overrides in settings.recipes.items():
        unknown = [s for s in (overrides.get("train.data_mixture") or {}) if s not in recipes]
        if unknown:
            raise UserError(f"ablation.recipes.{recipe}: train.data_mixture names {unknown}, which are not recipes of "
                            f"this ablation ({recipes})")
        for seed_index in range(settings.seeds):
            tree = copy.deepcopy(base)
            for key, value in overrides.items():
                set_dotted(tree, key, copy.deepcopy(value))
            tree["train"]["seed"] = cfg.train.seed + seed_index
            tree["runtime"]["run_name"] = recipe if seed_index == 0 else f"{recipe}.seed{seed_index}"
            plan.runs.append(_planned_run(plan, recipe, seed_index, overrides, tree))
    _refuse_duplicates(plan)
    return plan


def _planned_run(plan: AblationPlan, recipe: str, seed_index: int, overrides: dict[str, Any],
                 tree: dict[str, Any]) -> AblationRun:
    """One run's config, with the reference's tokenizer where the recipe keeps the tokenizer settings."""
    data, sample = tree["data"], tree["data"]["sample_corpus"]
    # Only the reference's sample corpus is shared: it exists before any other data stage starts.
    raw_key = _digest("raw", data["sample_corpus_max_docs"], tree["runtime"]["seed"]) if sample else None
    if raw_key is None or (plan.runs and raw_key != plan.reference.keys["raw"]):
        raw_key = _digest("raw", tree["runtime"]["run_name"])
    clean_key = _digest("clean", json.dumps(data, sort_keys=True), tree["runtime"]["seed"] if sample else None)
    trained_on = clean_key
    if plan.runs and not any(k.startswith("tokenizer.") for k in overrides):
        reference = plan.reference
        trained_on = reference.keys["clean"]
        if clean_key != trained_on:
            tree["tokenizer"]["from_run"] = reference.name
    tokenizer = {k: v for k, v in tree["tokenizer"].items() if k != "from_run"}
    keys = {"raw": raw_key, "clean": clean_key, "tokenize": _digest("tokenize", clean_key, tokenizer, trained_on)}
    config = build_config(tree, source=f"ablation.recipes.{recipe}")
    return AblationRun(recipe, seed_index, dict(overrides), config, keys)


def _refuse_duplicates(plan: AblationPlan) -> None:
    seen: dict[str, str] = {}
    for run in plan.runs:
        tree = run.config.model_dump(mode="json")
        tree["runtime"].pop("run_name")
        tree["tokenizer"].pop("from_run")
        key = _digest(tree)
        if key in seen:
            raise UserError(f"ablation.recipes: {seen[key]} and {run.name} make the same run; drop one")
        seen[key] = run.name


def preflight_config(plan: AblationPlan, cfg: PipelineConfig) -> PipelineConfig:
    """The reference run's config as the preflight checks it: the held-out files it is given, not
    the sample held-out set this ablation builds."""
    checked = plan.reference.config.model_copy(deep=True)
    checked.eval.heldout_inputs = list(cfg.ablation.heldout.inputs)
    return checked


def heldout_inputs(cfg: PipelineConfig, root: Path) -> list[str]:
    """The held-out files every proxy is scored on: given ones, or the docstring documents held out
    of every sample corpus (written by ``prepare_heldout``)."""
    if cfg.ablation.heldout.inputs:
        return [str(Path(p).resolve()) if not any(c in p for c in "*?[") else p for p in cfg.ablation.heldout.inputs]
    if not cfg.data.sample_corpus:
        raise UserError("ablation.heldout.inputs is empty: give the held-out documents every recipe is scored on")
    return [str((root / "heldout" / "heldout.jsonl").resolve())]


def prepare_heldout(cfg: PipelineConfig, plan: AblationPlan, log: Log = print) -> list[str]:
    """Build the sample-corpus held-out set once (a stage of its own), or check the given files exist."""
    from data_prep.readers import expand_inputs

    if cfg.ablation.heldout.inputs:
        expand_inputs(cfg.ablation.heldout.inputs)  # a pattern that matches nothing is a user error here
        return plan.reference.config.eval.heldout_inputs
    from data_prep.sample_corpus import build_heldout_sample

    directory = plan.root / "heldout"
    max_docs = max(r.config.data.sample_corpus_max_docs for r in plan.runs)
    settings = {"docs": cfg.ablation.heldout.sample_corpus_docs, "max_training_docs": max_docs, "seed": cfg.runtime.seed}
    stage = Stage("heldout", directory, settings)
    if not stage.current():
        with stage.outputs(directory) as (tmp,):
            n = build_heldout_sample(Path(tmp) / "heldout.jsonl", settings["docs"], max_docs, cfg.runtime.seed)
        stage.done({"documents": n})
        log(f"ablation {plan.name}: {n} held-out documents -> {directory / 'heldout.jsonl'}")
    return plan.reference.config.eval.heldout_inputs


def link_shared(plan: AblationPlan, run: AblationRun) -> None:
    """Point the run's shared data-stage directories at their owner's (a relative link, so the
    ablation folder can move)."""
    root = run.paths.root
    root.mkdir(parents=True, exist_ok=True)
    for stage, dirs in SHARED_DIRS.items():
        owner = plan.owner(run, stage)
        for d in dirs:
            path, target = root / d, os.path.relpath(owner.paths.root / d, root) if owner else None
            if path.is_symlink() and os.readlink(path) != target:
                path.unlink()
            elif target and path.exists() and not path.is_symlink():
                shutil.rmtree(path)  # outputs of an earlier plan in which this run owned the stage
            if target and not path.is_symlink():
                path.symlink_to(target, target_is_directory=True)


def _skipped(result: dict[str, Any]) -> bool:
    flags = [v.get("skipped") for v in result.values() if isinstance(v, dict) and "skipped" in v]
    return bool(result.get("skipped")) or (bool(flags) and all(flags))


def run_stages(plan: AblationPlan, run: AblationRun, stages: tuple[str, ...], forced: set[str],
               call: StageCall, log: Log = print) -> dict[str, Any]:
    """The run's ``stages`` in order; a shared one is not run here (its owner ran it). The wall
    seconds of every stage that did work are recorded for the table's cost column."""
    log(f"ablation {plan.name}: {run.name}, {' and '.join(stages)}")
    prepare_run(run.config)
    link_shared(plan, run)
    times_path = run.paths.root / TIMES_FILE
    results: dict[str, Any] = {}
    for stage in stages:
        owner = plan.owner(run, stage) if stage in STAGE_DIRS else None
        if owner is not None:
            results[stage] = {"shared_with": owner.name, "skipped": True}
            continue
        start = time.monotonic()
        results[stage] = call(stage, run.config, stage in forced)
        if not _skipped(results[stage]):
            times = read_json(times_path) if times_path.exists() else {}
            atomic_write_json(times_path, {**times, stage: round(time.monotonic() - start, 2)})
    log(f"ablation {plan.name}: {run.name}, " + ", ".join(
        f"{s} {'shared with ' + r['shared_with'] if 'shared_with' in r else 'current' if _skipped(r) else 'done'}"
        for s, r in results.items()))
    return results


def record_plan(plan: AblationPlan) -> None:
    """``ablation.json``: the settings, and per run its recipe, seed, data keys and owners (lineage)."""
    atomic_write_json(plan.root / "ablation.json", {
        "name": plan.name,
        "settings": plan.settings.model_dump(mode="json"),
        "runs": [{"run": r.name, "recipe": r.recipe, "seed": r.config.train.seed, "overrides": r.overrides,
                  "keys": r.keys, "shares": {s: o.name for s in SHARED_DIRS if (o := plan.owner(r, s))}}
                 for r in plan.runs],
    })


def shared_ray(plan: AblationPlan, stages: tuple[str, ...], runs: list[AblationRun]) -> contextlib.AbstractContextManager:
    """One Ray for data stages that run side by side in this process: each would otherwise start
    a local Ray of its own and stop it under the other's feet."""
    if stages != DATA_STAGES or plan.settings.parallel < 2 or len(runs) < 2:
        return contextlib.nullcontext()
    from data_prep.ray_runtime import ray_session

    return ray_session(plan.reference.config.runtime)


def plain_stage_call(log: Log) -> StageCall:
    from pretrain_pipeline.stages import STAGE_FUNCTIONS

    return lambda stage, cfg, force: STAGE_FUNCTIONS[stage](cfg, force=force, log=log)


def run_ablation(cfg: PipelineConfig, force: set[str] | None = None, log: Log = print) -> dict[str, Any]:
    """The whole ablation without Prefect (``flows/ablation.py`` runs the same waves as subflows);
    ``force``: stages to redo in every run (as ``run --force``)."""
    from pretrain_pipeline.ablation_report import write_ablation_report
    from pretrain_pipeline.stages import forced_stages

    forced = forced_stages(force or ())
    plan = plan_ablation(cfg)
    prepare_heldout(cfg, plan, log)
    record_plan(plan)
    call = plain_stage_call(log)
    done: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=plan.settings.parallel) as pool:
        for runs, stages in plan.waves():
            with shared_ray(plan, stages, runs):
                results = list(pool.map(lambda run: run_stages(plan, run, stages, forced, call, log), runs))
            for run, result in zip(runs, results):
                done.setdefault(run.name, {}).update(result)
    return {**write_ablation_report(plan, log), "stages": done}
