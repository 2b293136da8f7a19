"""Serve the pipeline's flows as deployments, so the Prefect UI's "Run" button starts them.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.deploy --config configs/smoke.yaml

Each deployment's parameters default to the given YAML config; the UI renders the config as a
typed form (from the pydantic schema) and refuses invalid values before a run is created.
Runs execute in this process's working directory, so ``runtime.runs_root`` resolves from here.
"""

from __future__ import annotations

import argparse
from typing import Any

from pretrain_pipeline.config import load_config
from pretrain_pipeline.stages import configure_environment


def build_deployments(config_path: str, overrides: list[str] | None = None) -> list[Any]:
    from flows.pipeline import (
        clean_flow,
        evaluate_flow,
        export_flow,
        pretrain_pipeline,
        tokenize_flow,
        train_flow,
    )

    cfg = load_config(config_path, overrides)
    config = cfg.model_dump(mode="json")
    tags = ["pretrain-pipeline", cfg.runtime.run_name]
    deployments = [
        pretrain_pipeline.to_deployment(
            name=cfg.runtime.run_name,
            parameters={"config": config, "force": []},
            description=f"The whole pipeline with defaults from {config_path}.",
            tags=tags,
        )
    ]
    for stage_flow in (clean_flow, tokenize_flow, train_flow, evaluate_flow, export_flow):
        deployments.append(
            stage_flow.to_deployment(
                name=cfg.runtime.run_name,
                parameters={"config": config, "force": False},
                description=f"{stage_flow.name} stage with defaults from {config_path}.",
                tags=tags,
            )
        )
    if cfg.ablation.recipes:  # a config with an ablation section also serves the ablate flow
        from flows.ablation import ablate_flow

        deployments.append(ablate_flow.to_deployment(
            name=cfg.ablation.name or cfg.runtime.run_name, parameters={"config": config, "force": []},
            description=f"Data-recipe ablation with defaults from {config_path}.", tags=tags,
        ))
    return deployments


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", "-c", default="configs/smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--limit", type=int, default=1, help="Flow runs executed at once.")
    args = parser.parse_args(argv)
    configure_environment()
    from prefect import serve

    serve(*build_deployments(args.config, args.overrides), limit=args.limit)


if __name__ == "__main__":
    main()
