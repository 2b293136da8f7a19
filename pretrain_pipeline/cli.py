"""The ``pretrain-pipeline`` command; its --help text (DESCRIPTION, EPILOG) is written for a terminal."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from pretrain_pipeline.config import PipelineConfig, dump_config, load_config
from pretrain_pipeline.console import QuietConsole, quiet_prefect, quiet_start_up
from pretrain_pipeline.errors import UserError
from pretrain_pipeline.preflight import check_stages, mark_checked
from pretrain_pipeline.stages import STAGE_FUNCTIONS, STAGES, configure_environment, forced_stages

USER_ERROR = 2  # exit status of a user error (config, inputs, device, resume, plan): fix what it names

DESCRIPTION = """\
Pretrain a GPT from a raw text corpus: clean -> tokenize -> train -> evaluate -> export.
One command per stage, and run for the whole pipeline (a Prefect flow). Outputs go to
runs/<run_name>/. Before Prefect, Ray or any stage starts, the config is validated and the
stages about to run are checked (inputs, run directory, device, memory plan); check does
only that.
"""

EPILOG = """\
examples:
  pretrain-pipeline check -c configs/gpt2-124m.yaml    what would stop a run, found in seconds
  pretrain-pipeline run -c configs/smoke.yaml          the whole pipeline on CPU
  pretrain-pipeline plan -c configs/gpt2-124m.yaml     parameters, memory per rank, ETA
  pretrain-pipeline config -c configs/gpt2-124m.yaml   the resolved config
  pretrain-pipeline train -c configs/smoke.yaml --set train.max_steps=50 --force
  pretrain-pipeline inspect -c configs/smoke.yaml --reason gopher_repetition:top_2_gram
  pretrain-pipeline ablate -c configs/ablate-smoke.yaml   which data recipe makes the better model

Each command: pretrain-pipeline COMMAND --help. --verbose shows rank output and Ray, Prefect
and DeepSpeed notices on the terminal; --json prints a stage's result for scripts.

exit status:
  0  done
  1  a stage failed (the error and its traceback are printed); rerun to resume
  2  a user error: invalid config, missing input, no such device, a refused resume, a plan
     that does not fit; the "error:" lines name the field or file to fix
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="YAML config (see configs/).")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="Override one config field (repeatable), e.g. --set train.max_steps=20.",
    )
    p.add_argument("--run-name", help="Shortcut for --set runtime.run_name=NAME.")
    p.add_argument("--ray-address", help="Shortcut for --set runtime.ray_address=ADDR.")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="Show everything on the terminal (rank output, Ray, Prefect and DeepSpeed notices).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain-pipeline", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "clean": "Clean and deduplicate the raw corpus on Ray -> runs/<name>/clean/",
        "tokenize": "Train the SentencePiece tokenizer and write Arrow shards -> tokenizer/, shards/",
        "train": "Pretrain the GPT with DeepSpeed ZeRO -> checkpoints/, metrics.jsonl, W&B",
        "evaluate": "Held-out loss, perplexity, bits per byte and samples -> eval/eval.json",
        "export": "Export to Hugging Face format (safetensors + tokenizer) -> export/hf/",
    }
    for name in STAGES:
        p = sub.add_parser(name, help=helps[name])
        _add_common(p)
        p.add_argument("--force", action="store_true", help="Redo the stage even if its outputs are current.")
        p.add_argument("--json", action="store_true", help="Print the stage's result as JSON at the end.")

    p = sub.add_parser("run", help="The whole pipeline as one Prefect flow (or plain Python with --no-prefect).")
    _add_common(p)
    p.add_argument(
        "--force",
        nargs="*",
        default=[],
        metavar="STAGE",
        help=f"Stages to redo even if current ({', '.join(STAGES)}, or all).",
    )
    p.add_argument("--no-prefect", action="store_true", help="Run the stages as plain Python, without Prefect.")
    p.add_argument("--json", action="store_true", help="Print every stage's result as JSON at the end.")

    p = sub.add_parser("ablate", help="Data-recipe ablation: the ablation section's recipes, one proxy model and one "
                       "evaluation for all -> runs/<ablation>/report.md")
    _add_common(p)
    p.add_argument("--force", nargs="*", default=[], metavar="STAGE",
                   help=f"Stages to redo in every run even if current ({', '.join(STAGES)}, or all).")
    p.add_argument("--no-prefect", action="store_true", help="Run the recipes as plain Python, without Prefect.")
    p.add_argument("--json", action="store_true", help="Print the results (rows, summary, winner) as JSON at the end.")

    p = sub.add_parser("report", help="(Re)write runs/<name>/report.md from the run's outputs.")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="Print the report's path as JSON.")

    p = sub.add_parser("plan", help="Parameters, per-rank memory, FLOPs/token and ETA for the training config.")
    _add_common(p)
    p.add_argument("--json", action="store_true", help="Print the plan as JSON.")

    p = sub.add_parser("check", help="Preflight: inputs, run directory, device and plan, without running anything.")
    _add_common(p)
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="Check for these stages only.")

    p = sub.add_parser("inspect", help="What the clean stage dropped: samples for a drop reason, or the funnel.")
    _add_common(p)
    p.add_argument("--reason", help="A drop reason (gopher_repetition:top_2_gram) or a filter (gopher_repetition); "
                   "without it, the funnel with every reason.")
    p.add_argument("-n", type=int, default=5, help="Samples to print.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the sample.")
    p.add_argument("--chars", type=int, default=300, help="Characters of each excerpt to print.")

    p = sub.add_parser("config", help="Validate and print the resolved config.")
    _add_common(p)
    p.add_argument("--schema", action="store_true", help="Print the JSON schema instead.")
    return parser


def _resolve(args: argparse.Namespace) -> PipelineConfig:
    overrides = list(args.overrides)
    if args.run_name:
        overrides.append(f"runtime.run_name={args.run_name}")
    if args.ray_address:
        overrides.append(f"runtime.ray_address={args.ray_address}")
    return load_config(args.config, overrides)


def _errors(lines: list[str]) -> int:
    """Each line as ``error: ...`` (an indented line continues the one above); the user-error status."""
    for line in lines:
        print(line if line.startswith(" ") else f"error: {line}", file=sys.stderr)
    return USER_ERROR


def _check(cfg: PipelineConfig, stages: list[str]) -> int:
    """``pretrain-pipeline check``: the findings table, then every problem."""
    found = check_stages(cfg, stages)
    print(found.table())
    if found.problems:
        return _errors([str(p) for p in found.problems])
    print("ok: nothing found that would stop these stages")
    return 0


def _stages_to_run(args: argparse.Namespace) -> list[str]:
    """The stages ``run`` or a stage command is about to start; an unknown --force is a user error."""
    if args.command in ("run", "ablate"):
        try:
            forced_stages(args.force)
        except ValueError as err:
            raise UserError(f"--force: {err}") from None
        if args.command == "ablate":
            from pretrain_pipeline.ablation import DATA_STAGES, MODEL_STAGES

            return [*DATA_STAGES, *MODEL_STAGES]
        return list(STAGES)
    return [args.command] if args.command in STAGES else []


def _inspect(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from data_prep.inspect import dropped_samples, format_samples, funnel

    try:
        if args.reason:
            print(format_samples(dropped_samples(cfg.run_dir(), args.reason, args.n, args.seed), args.chars))
            return 0
        stats = json.loads((cfg.run_dir() / "clean" / "stats.json").read_text())
    except (FileNotFoundError, ValueError) as err:
        return _errors([str(err)])
    for s in funnel(stats):
        removed = f"-{s.removed:,}" if s.removed else ""
        print(f"{s.step:<16}{s.left:>12,}{removed:>12}  {s.reasons_text(limit=50) or s.note}")
    return 0


def _plan(cfg: PipelineConfig, as_json: bool) -> int:
    from pretrain.plan import plan_launch
    from pretrain_pipeline.artifacts import RunPaths

    cfg, plan = plan_launch(cfg, RunPaths(cfg.run_dir()))  # with the grad accumulation a resume changes
    print(json.dumps(plan.to_dict(), indent=2) if as_json else "\n".join(plan.lines()))
    if not plan.fits:
        return _errors([f"train.plan.device_memory_gb: the plan does not fit in {cfg.train.plan.device_memory_gb:g} GB per rank"])
    return 0


def _flow(command: str) -> Any:
    """The Prefect flow of ``run`` or ``ablate`` (imported only when used: Prefect is slow to import)."""
    if command == "run":
        from flows.pipeline import pretrain_pipeline

        return pretrain_pipeline
    from flows.ablation import ablate_flow

    return ablate_flow


def _plain(command: str) -> Any:
    """The same as plain Python, for --no-prefect."""
    if command == "run":
        from pretrain_pipeline.stages import run_all

        return run_all
    from pretrain_pipeline.ablation import run_ablation

    return run_ablation


def _execute(cfg: PipelineConfig, args: argparse.Namespace, train_steps: int) -> int:
    """A stage, the report, the whole pipeline or an ablation, after the preflight found nothing in the way."""
    configure_environment()
    console = None if args.verbose else QuietConsole(train_steps)
    if console:
        quiet_start_up()
    log = console.log if console else print
    result: Any
    with console.muted() if console else contextlib.nullcontext():
        if args.command in ("run", "ablate") and not args.no_prefect:
            flow = _flow(args.command)  # imported first: Prefect sets up its log handlers on import
            if console:
                quiet_prefect(console)
            result = flow(config=cfg, force=sorted(args.force))
        elif args.command in ("run", "ablate"):
            result = _plain(args.command)(cfg, force=set(args.force), log=log)
        elif args.command == "report":
            from pretrain_pipeline.stages import report

            result = {"report": str(report(cfg, log=log))}
        else:
            result = STAGE_FUNCTIONS[args.command](cfg, force=args.force, log=log)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.schema:
        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
        return 0
    try:
        cfg = _resolve(args)
        if args.command == "config":
            print(dump_config(cfg), end="")
            return 0
        if args.command == "inspect":
            return _inspect(cfg, args)
        if args.command == "plan":
            return _plan(cfg, args.json)
        if args.command == "check":
            return _check(cfg, args.stages)
        prefect = args.command in ("run", "ablate") and not args.no_prefect  # a stage command runs without Prefect
        checked = cfg
        if args.command == "ablate":  # every recipe validated; the checks run on the reference recipe's run
            from pretrain_pipeline.ablation import plan_ablation, preflight_config

            checked = preflight_config(plan_ablation(cfg), cfg)
        problems = check_stages(checked, _stages_to_run(args), prefect=prefect).problems
        if problems:
            return _errors([str(p) for p in problems])
        mark_checked(checked, _stages_to_run(args))
        return _execute(cfg, args, checked.train.max_steps)
    except UserError as err:  # raised by the config, the preflight or inside a stage: no traceback
        return _errors(str(err).splitlines())


if __name__ == "__main__":
    sys.exit(main())
