"""The answer of an ablation: one row per proxy, one summary per recipe, the winner, plots.

Written to ``<runs_root>/<ablation>/`` as ``results.json``, ``report.md`` and ``plots/*.png``, and
logged once to W&B (a summary run in the ablation's group; every proxy's own runs are in it too).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from pretrain_pipeline.ablation import SHARED_DIRS, STAGE_DIRS, TIMES_FILE, AblationPlan, AblationRun, Log, recipe_diff
from pretrain_pipeline.artifacts import atomic_write_json, atomic_write_text, read_json
from pretrain_pipeline.report import figure, fmt
from pretrain_pipeline.stage import Stage

# Metric -> (column title, True when higher is better, None when it only describes the recipe).
FIXED_METRICS: dict[str, tuple[str, bool | None]] = {
    "heldout_bpb": ("held-out bits/byte", False),
    "docs_kept": ("documents kept", None),
    "train_tokens": ("train tokens", None),
    "cost_s": ("cost (s)", None),
}


def _read(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


def _stage_times(plan: AblationPlan, run: AblationRun) -> dict[str, float]:
    """Seconds of each stage that made this run's outputs: its own, and the owner's for shared ones."""
    times = _read(run.paths.root / TIMES_FILE) or {}
    for stage in STAGE_DIRS:
        if owner := plan.owner(run, stage):
            times[stage] = (_read(owner.paths.root / TIMES_FILE) or {}).get(stage, 0.0)
    return times


def run_row(plan: AblationPlan, run: AblationRun) -> dict[str, Any]:
    """What one proxy scored and cost; ``done`` is false until its evaluation exists."""
    paths = run.paths
    ev = (_read(paths.eval / "eval.json") or {}).get("result")
    stats = _read(paths.clean / "stats.json") or {}
    manifest = _read(paths.shards / "manifest.json") or {}
    row: dict[str, Any] = {
        "recipe": run.recipe, "run": run.name, "seed": run.config.train.seed, "change": recipe_diff(run.overrides),
        "done": ev is not None,
        "heldout_bpb": (ev or {}).get("heldout", {}).get("bits_per_byte"),
        "val_bpb": (ev or {}).get("bits_per_byte"),
        "docs_kept": stats.get("kept"),
        "train_tokens": manifest.get("totals", {}).get("train", {}).get("tokens"),
        "cost_s": round(sum(_stage_times(plan, run).values()), 1),
    }
    for task, metrics in ((ev or {}).get("lm_eval") or {}).items():
        row.update({f"{task} {name}": v for name, v in metrics.items() if not name.endswith("_stderr")})
    return row


def metric_directions(rows: list[dict[str, Any]]) -> dict[str, tuple[str, bool | None]]:
    """The table's metrics: held-out bpb, each lm-eval metric (higher is better), then what the recipe kept and cost."""
    tasks = sorted({k for r in rows for k in r if " " in k and k not in FIXED_METRICS and k != "change"})
    return {"heldout_bpb": FIXED_METRICS["heldout_bpb"], **{k: (k, True) for k in tasks},
            **{k: v for k, v in FIXED_METRICS.items() if k != "heldout_bpb"}}


def summarize(rows: list[dict[str, Any]], metrics: dict[str, tuple[str, bool | None]]) -> list[dict[str, Any]]:
    """Per recipe, for each metric: the mean over seeds and the lowest and highest seed."""
    out = []
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        mine = [r for r in rows if r["recipe"] == recipe and r["done"]]
        entry: dict[str, Any] = {"recipe": recipe, "change": next(r["change"] for r in rows if r["recipe"] == recipe),
                                 "seeds": len(mine)}
        for key in metrics:
            values = [r[key] for r in mine if r.get(key) is not None]
            if values:
                entry[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
        out.append(entry)
    return out


def winner(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The recipe with the lowest mean held-out bits per byte, and whether its seeds' range clears
    the runner-up's (with one seed there is no spread to judge by)."""
    scored = sorted((s for s in summary if "heldout_bpb" in s), key=lambda s: s["heldout_bpb"]["mean"])
    if not scored:
        return None
    best = scored[0]
    result = {"recipe": best["recipe"], "heldout_bpb": best["heldout_bpb"]["mean"], "seeds": best["seeds"]}
    if len(scored) > 1:
        second = scored[1]
        result.update(runner_up=second["recipe"], margin=second["heldout_bpb"]["mean"] - best["heldout_bpb"]["mean"],
                      separated=best["seeds"] > 1 and best["heldout_bpb"]["max"] < second["heldout_bpb"]["min"])
    return result


def _slug(metric: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", metric.lower()).strip("_")


def plot_metrics(plan: AblationPlan, rows: list[dict[str, Any]], metrics: dict[str, tuple[str, bool | None]]) -> list[Path]:
    """One horizontal bar chart per metric: the recipe's mean over seeds, each seed a dot."""
    plots = plan.root / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    written = []
    for key, (title, higher_better) in metrics.items():
        values = {rc: [r[key] for r in rows if r["recipe"] == rc and r["done"] and r.get(key) is not None] for rc in recipes}
        if not any(values.values()):
            continue
        out = plots / f"{_slug(key)}.png"
        better = "" if higher_better is None else (" (higher is better)" if higher_better else " (lower is better)")
        with figure(out, f"{plan.name}: {title}{better}", height=0.5 * len(recipes) + 1.5) as ax:
            y = list(range(len(recipes)))[::-1]
            means = [statistics.fmean(v) if v else 0 for v in values.values()]
            ax.barh(y, means, color="#4c78a8")
            for yi, vs, mean in zip(y, values.values(), means):
                ax.plot(vs, [yi] * len(vs), "o", color="black", markersize=4)
                ax.text(mean, yi, f" {_number(mean)}", va="center")
            if higher_better is not None:  # a score: zoom on the differences, which are small next to the value
                seen = [v for vs in values.values() for v in vs]
                pad = (max(seen) - min(seen)) or abs(max(seen)) * 0.05 or 1.0
                ax.set_xlim(min(seen) - pad, max(seen) + pad)
            ax.set_yticks(y, recipes)
            ax.set_xlabel(title)
        written.append(out)
    return written


def _number(value: float) -> str:
    return fmt(int(value)) if float(value).is_integer() else fmt(value)


def _cell(entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if value is None:
        return "–"
    if value["min"] == value["max"]:
        return _number(value["mean"])
    return f"{_number(value['mean'])} ({_number(value['min'])}–{_number(value['max'])})"


def report_markdown(plan: AblationPlan, rows: list[dict[str, Any]], summary: list[dict[str, Any]],
                    best: dict[str, Any] | None, metrics: dict[str, tuple[str, bool | None]], plots: list[Path]) -> str:
    ref = plan.reference.config
    tc = ref.train
    per_step = tc.tokens_per_step(ref.model.block_size)
    heldout = next((r for r in rows if r["done"]), None)
    lines = [
        f"# Ablation `{plan.name}`", "",
        f"Proxy: {ref.model.n_layer} layers x {ref.model.n_embd} wide ({ref.model.preset or 'base model'}), "
        f"{tc.max_steps} steps x {per_step:,} tokens = {tc.max_steps * per_step:,} tokens per proxy; "
        f"{plan.settings.seeds} seed(s) per recipe. Held-out: `{', '.join(ref.eval.heldout_inputs)}`. "
        f"lm-eval tasks: {', '.join(ref.eval.lm_eval_tasks) or 'none'}.", "",
    ]
    if best:
        spread = ("" if best["seeds"] < 2 else
                  " Its seeds' range is clear of the runner-up's." if best.get("separated") else
                  " The seeds' ranges overlap: at this budget the difference is within seed noise.")
        vs = f", {fmt(best['margin'])} below {best['runner_up']}" if "runner_up" in best else ""
        lines += [f"**Winner: `{best['recipe']}`**, held-out {fmt(best['heldout_bpb'])} bits per byte{vs}.{spread}", ""]
    pending = [r["run"] for r in rows if not r["done"]]
    if pending:
        lines += [f"Not finished yet: {', '.join(pending)}.", ""]
    header = ["recipe", "change", *[metrics[k][0] for k in metrics]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in summary:
        lines.append("| " + " | ".join([f"`{entry['recipe']}`", entry["change"], *[_cell(entry, k) for k in metrics]]) + " |")
    lines += [
        "",
        "Each cell is the mean over the recipe's seeds (lowest–highest seed in brackets when they differ). "
        "Held-out bits per byte: the proxy's loss on the same held-out documents for every recipe, divided by their "
        "UTF-8 bytes, so recipes with different tokenizers compare; lower is better. lm-eval columns: the task's "
        "metric on the proxy, higher is better. Documents kept and train tokens: what the recipe's cleaning left. "
        "Cost: wall seconds of the stages that made the proxy (shared stages counted for every recipe using them).",
        "",
    ]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    lines += ["## Runs", "", "| run | seed | held-out bpb | val bpb (own tokenizer) | shares |", "|---|---|---|---|---|"]
    for run, row in zip(plan.runs, rows):
        shares = ", ".join(f"{s} of {o.name}" for s in SHARED_DIRS if (o := plan.owner(run, s))) or "–"
        lines.append(f"| `{row['run']}` | {row['seed']} | {fmt(row['heldout_bpb']) if row['done'] else '–'} | "
                     f"{fmt(row['val_bpb']) if row['done'] else '–'} | {shares} |")
    return "\n".join(lines) + "\n"


def log_to_wandb(plan: AblationPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """A summary run in the ablation's W&B group with the results table; once per set of results."""
    from pretrain.tracking import Tracker

    tracking = plan.reference.config.tracking
    if tracking.wandb_mode == "disabled":
        return
    directory = plan.root / "wandb-summary"
    stage = Stage("ablation-wandb", directory, tracking.model_dump(mode="json"), rows)
    if stage.current():
        return
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tracker = Tracker(tracking, directory, {"ablation": plan.settings.model_dump(mode="json")}, run_name=f"{plan.name}-summary")
    try:
        tracker.table("ablation/results", columns, [[r.get(c) for c in columns] for r in rows])
        if best:
            tracker.summary({"ablation/winner": best["recipe"], "ablation/winner_heldout_bpb": best["heldout_bpb"]})
    finally:
        tracker.finish()
    stage.done({"rows": len(rows)})


def write_ablation_report(plan: AblationPlan, log: Log = print) -> dict[str, Any]:
    rows = [run_row(plan, run) for run in plan.runs]
    metrics = metric_directions(rows)
    summary = summarize(rows, metrics)
    best = winner(summary)
    plots = plot_metrics(plan, rows, metrics)
    report = plan.root / "report.md"
    atomic_write_text(report, report_markdown(plan, rows, summary, best, metrics, plots))
    atomic_write_json(plan.root / "results.json", {"ablation": plan.name, "rows": rows, "summary": summary, "winner": best})
    if all(r["done"] for r in rows):
        log_to_wandb(plan, rows, best)
    log(f"ablation {plan.name}: winner {best['recipe'] if best else '(none yet)'} -> {report}")
    return {"report": str(report), "winner": best, "rows": rows, "summary": summary}
