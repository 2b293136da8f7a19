"""``pretrain-pipeline``: one command per stage, plus ``run`` for the whole pipeline.

    pretrain-pipeline run --config configs/smoke.yaml
    pretrain-pipeline train --config configs/smoke.yaml --set train.max_steps=50 --force
    pretrain-pipeline config --config configs/gpt2-124m.yaml      # print the resolved config
    pretrain-pipeline inspect -c configs/smoke.yaml --reason gopher_repetition:top_2_gram -n 5
    pretrain-pipeline check --config configs/gpt2-124m.yaml       # inputs, run dir, device: no run

The config is validated and the stages about to run are checked (pretrain_pipeline.preflight)
before Prefect, Ray or any stage starts; a user error prints ``error:`` lines naming the field or
file and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pretrain_pipeline.config import ConfigError, PipelineConfig, dump_config, load_config
from pretrain_pipeline.preflight import check_stages
from pretrain_pipeline.stages import STAGE_FUNCTIONS, STAGES, configure_environment, forced_stages

USER_ERROR = 2  # exit status of a config or preflight refusal: fix the config, nothing ran


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain-pipeline", description=__doc__.split("\n\n")[0])
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

    p = sub.add_parser("report", help="(Re)write runs/<name>/report.md from the run's outputs.")
    _add_common(p)

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
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
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
    """The stages ``run`` or a stage command is about to start; raises ValueError on an unknown --force."""
    if args.command == "run":
        forced_stages(args.force)
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
        print(f"error: {err}", file=sys.stderr)
        return 1
    for s in funnel(stats):
        removed = f"-{s.removed:,}" if s.removed else ""
        print(f"{s.step:<16}{s.left:>12,}{removed:>12}  {s.reasons_text(limit=50) or s.note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config" and args.schema:
        print(json.dumps(PipelineConfig.model_json_schema(), indent=2))
        return 0
    try:
        cfg = _resolve(args)
    except ConfigError as err:
        return _errors([str(err)])
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command == "inspect":
        return _inspect(cfg, args)

    if args.command == "plan":
        from pretrain.plan import make_plan, plan_vocab_size
        from pretrain_pipeline.artifacts import RunPaths

        plan = make_plan(cfg, plan_vocab_size(cfg, RunPaths(cfg.run_dir())))
        print(json.dumps(plan.to_dict(), indent=2) if args.json else "\n".join(plan.lines()))
        if not plan.fits:
            print(f"error: does not fit in train.plan.device_memory_gb={cfg.train.plan.device_memory_gb:g}", file=sys.stderr)
            return 3
        return 0

    if args.command == "check":
        return _check(cfg, args.stages)
    try:
        problems = check_stages(cfg, _stages_to_run(args)).problems
    except ValueError as err:
        return _errors([str(err)])
    if problems:
        return _errors([str(p) for p in problems])

    configure_environment()
    result: Any
    if args.command == "run":
        force = set(args.force)
        if args.no_prefect:
            from pretrain_pipeline.stages import run_all

            result = run_all(cfg, force=force)
        else:
            from flows.pipeline import pretrain_pipeline

            result = pretrain_pipeline(config=cfg, force=sorted(force))
    elif args.command == "report":
        from pretrain_pipeline.stages import report

        result = {"report": str(report(cfg))}
    else:
        result = STAGE_FUNCTIONS[args.command](cfg, force=args.force)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
