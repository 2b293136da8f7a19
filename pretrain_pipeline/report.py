"""The run report: every stage's figures in one markdown page, with plots a person would rather see.

It only reads what the stages wrote (stats.json, meta.json, manifest.json, metrics.jsonl,
summary.json, eval.json, the export's record), so it can be rebuilt at any time.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from pretrain_pipeline.artifacts import SUCCESS_FILE, RunPaths, atomic_write_text


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write; the rest is still useful
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rows], ""]


@contextlib.contextmanager
def _figure(out: Path, title: str, height: float = 3.5) -> Iterator[Any]:
    """Axes of a figure drawn off-screen (no display needed) and saved to ``out`` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, height))
    try:
        yield ax
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)


def _plot_funnel(stats: dict[str, Any], out: Path) -> Path | None:
    dropped = stats.get("dropped") or {}
    labels = ["input"] + [f"- {k}" for k in dropped] + (["- quarantined"] if stats.get("quarantined") else []) + ["kept"]
    values = [stats.get("docs_in", 0)] + list(dropped.values())
    if stats.get("quarantined"):
        values.append(stats["quarantined"])
    values.append(stats.get("kept", 0))
    colors = ["#4c72b0"] + ["#c44e52"] * (len(labels) - 2) + ["#55a868"]
    with _figure(out, "Cleaning funnel", height=0.45 * len(labels) + 1) as ax:
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        for i, v in enumerate(values[::-1]):
            ax.text(v, i, f" {v:,}", va="center", fontsize=8)
        ax.set_xlabel("documents")
    return out


def _plot_lengths(stats: dict[str, Any], out: Path) -> Path | None:
    hist = stats.get("length_histogram")
    if not hist:
        return None
    # stats.json stores bins as [{"min_words", "max_words", "documents"}, ...]
    edges = [max(b["min_words"], 1) for b in hist] + [hist[-1]["max_words"]]
    counts = [b["documents"] for b in hist]
    with _figure(out, "Kept document lengths") as ax:
        ax.stairs(counts, edges, fill=True, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("document length (words)")
        ax.set_ylabel("documents")
    return out


def _loss_series(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) points of each curve in metrics.jsonl."""
    return {
        name: [(m["step"], m[f"{key}/loss"]) for m in metrics if f"{key}/loss" in m and "step" in m]
        for name, key in (("train loss", "train"), ("validation loss", "val"))
    }


def _plot_loss(series: dict[str, list[tuple[int, float]]], out: Path) -> Path | None:
    train, val = series["train loss"], series["validation loss"]
    if not train and not val:
        return None
    with _figure(out, "Training") as ax:
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    return out


def write_report(paths: RunPaths) -> Path:
    paths.plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: `{paths.root.name}`", ""]

    stats = _load(paths.clean / "stats.json")
    lines.append("## 1. Clean")
    if stats:
        lines += _table(
            [("documents in", stats.get("docs_in")), ("kept", stats.get("kept")), ("quarantined", stats.get("quarantined"))]
            + [(f"dropped: {k}", v) for k, v in (stats.get("dropped") or {}).items()]
        )
        if _plot_funnel(stats, paths.plots / "filter_funnel.png"):
            lines += ["![filter funnel](plots/filter_funnel.png)", ""]
        if _plot_lengths(stats, paths.plots / "doc_lengths.png"):
            lines += ["![document lengths](plots/doc_lengths.png)", ""]
    else:
        lines += ["(not run)", ""]

    meta = _load(paths.tokenizer / "meta.json")
    manifest = _load(paths.shards / "manifest.json")
    lines.append("## 2. Tokenizer and shards")
    if meta or manifest:
        rows: list[tuple[str, Any]] = []
        if meta:
            rows += [("vocab size", meta.get("vocab_size")), ("tokenizer sha256", str(meta.get("sha256", ""))[:16])]
        if manifest:
            for split, shards in (manifest.get("splits") or {}).items():
                rows += [
                    (f"{split} shards", len(shards)),
                    (f"{split} documents", sum(s.get("documents", 0) for s in shards)),
                    (f"{split} tokens", sum(s.get("tokens", 0) for s in shards)),
                ]
            rows.append(("token dtype", manifest.get("dtype")))
        lines += _table(rows)
    else:
        lines += ["(not run)", ""]

    summary = _load(paths.train / "summary.json")
    metrics = _metrics(paths.metrics)
    lines.append("## 3. Train")
    if summary:
        lines += _table([(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))])
    series = _loss_series(metrics)
    if _plot_loss(series, paths.plots / "loss.png"):
        lines += ["![loss](plots/loss.png)", ""]
        # What the plot shows, in words: a reader (or a check) sees a missing curve without the image.
        for name, points in series.items():
            last = f", last {points[-1][1]:.4g} at step {points[-1][0]}" if points else ""
            lines.append(f"- {name}: {len(points)} points{last}")
        lines.append("")
    if not summary and not metrics:
        lines += ["(not run)", ""]

    ev = _load(paths.eval / "eval.json")
    lines.append("## 4. Evaluate")
    if ev:
        ev = {**ev.get("result", {}), "checkpoint_tag": ev.get("checkpoint_tag"), "config_sha256": ev.get("config_sha256")}
        lines += _table([(k, v) for k, v in ev.items() if isinstance(v, (int, float, str)) and k not in ("eval_path", "skipped")])
        if ev.get("lm_eval"):
            lines += ["lm-evaluation-harness:", "", "| task | metric | value |", "|---|---|---|"]
            lines += [f"| {task} | {name} | {_fmt(v)} |" for task, m in ev["lm_eval"].items() for name, v in m.items()]
            lines.append("")
        for sample in ev.get("samples") or []:
            prompt = sample.get("prompt", "") if isinstance(sample, dict) else ""
            text = sample.get("completion", sample.get("text", "")) if isinstance(sample, dict) else str(sample)
            shown = (prompt + text).replace("\n", "\\n").replace("`", "'")
            lines += [f"- `{shown}` (prompt: `{prompt}`)"]
        lines.append("")
    else:
        lines += ["(not run)", ""]

    exported = _load(paths.export / SUCCESS_FILE)
    lines.append("## 5. Export")
    if exported:
        result = exported.get("result", {})
        lines += _table([(k, v) for k, v in result.items() if k != "skipped" and not isinstance(v, (dict, list))])
    else:
        lines += ["(not run)", ""]

    atomic_write_text(paths.report, "\n".join(lines))
    return paths.report
