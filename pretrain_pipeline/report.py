"""The run report: every stage's figures in one markdown page, with plots a person would rather see.

It only reads what the stages wrote (stats.json, meta.json, manifest.json, metrics.jsonl,
summary.json, eval.json, the export's record), so it can be rebuilt at any time.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from pretrain.events import read_events
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


def fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|", *[f"| {k} | {fmt(v)} |" for k, v in rows], ""]


@contextlib.contextmanager
def figure(out: Path, title: str, height: float = 3.5) -> Iterator[Any]:
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


def _plot_funnel(steps: list[Any], out: Path) -> Path:
    """Documents left after each step (blue) and removed by it (red), the first step on top."""
    y = list(range(len(steps)))[::-1]
    left, removed = [s.left for s in steps], [s.removed for s in steps]
    with figure(out, "Cleaning funnel", height=0.4 * len(steps) + 1) as ax:
        ax.barh(y, left, color="#4c72b0", label="left")
        ax.barh(y, removed, left=left, color="#c44e52", label="removed")
        ax.set_yticks(y, [s.step for s in steps])
        for yi, s in zip(y, steps):
            ax.text(s.left + s.removed, yi, f" {s.left:,}" + (f" (-{s.removed:,})" if s.removed else ""), va="center", fontsize=8)
        ax.margins(x=0.15)  # room for the labels right of the longest bar
        ax.set_xlabel("documents")
        ax.legend(loc="lower right", fontsize=8)
    return out


def _clean_section(paths: RunPaths) -> list[str]:
    """The funnel (pipeline order, reasons by filter) and short examples of the top drop reasons."""
    from data_prep.inspect import examples_by_reason, examples_markdown, funnel

    stats = _load(paths.clean / "stats.json")
    if not stats:
        return ["(not run)", ""]
    lines = _table([(k, stats.get(key, 0)) for k, key in (
        ("documents in", "docs_in"), ("blank lines skipped", "skipped_blank_lines"), ("kept", "kept"), ("quarantined", "quarantined"))])
    steps = funnel(stats)
    lines += ["| step | removed | left | reasons |", "|---|---|---|---|"]
    lines += [f"| {s.step} | {fmt(s.removed)} | {fmt(s.left)} | {s.reasons_text() or s.note} |" for s in steps]
    lines += ["", "![filter funnel](plots/filter_funnel.png)", ""]
    _plot_funnel(steps, paths.plots / "filter_funnel.png")
    if contamination := stats.get("contamination"):
        lines += [f"Benchmark decontamination ({contamination['ngram']}-grams): documents dropped per task", ""]
        lines += _table([(task, n) for task, n in contamination["documents"].items()])
    if examples := examples_by_reason(paths.clean, top=5, per_reason=3):
        lines += ["Dropped documents, three for each of the most frequent reasons:", "", *examples_markdown(examples)]
    if _plot_lengths(stats, paths.plots / "doc_lengths.png"):
        lines += ["![document lengths](plots/doc_lengths.png)", ""]
    return lines


def _plot_lengths(stats: dict[str, Any], out: Path) -> Path | None:
    hist = stats.get("length_histogram")
    if not hist:
        return None
    # stats.json stores bins as [{"min_words", "max_words", "documents"}, ...]
    edges = [max(b["min_words"], 1) for b in hist] + [hist[-1]["max_words"]]
    counts = [b["documents"] for b in hist]
    with figure(out, "Kept document lengths") as ax:
        ax.stairs(counts, edges, fill=True, alpha=0.7)
        ax.set_xscale("log")
        ax.set_xlabel("document length (words)")
        ax.set_ylabel("documents")
    return out


def _loss_series(metrics: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) points of each curve in metrics.jsonl, in step order; a step logged again after a
    resume or rollback keeps its newest value (the one the run went on from)."""
    series = {}
    for name, key in (("train loss", "train"), ("validation loss", "val")):
        newest = {m["step"]: m[f"{key}/loss"] for m in metrics if f"{key}/loss" in m and "step" in m}
        series[name] = sorted(newest.items())
    return series


def _timeline(events: list[dict[str, Any]]) -> list[str]:
    """The resumes, conversions, rollbacks and restarts of train/events.jsonl as a table."""
    if not events:
        return []
    rows = [f"| {e.get('time', '')} | {'' if e.get('step') is None else e['step']} | {e['kind']} "
            f"| {str(e.get('message', '')).replace('|', '/')} |" for e in events]
    return ["Timeline (train/events.jsonl):", "", "| time | step | event | what |", "|---|---|---|---|", *rows, ""]


# How the loss plot marks the timeline's events (resumes and conversions happen at checkpoints, unmarked).
EVENT_MARKS = {"rollback": ("#c44e52", "--"), "restart": ("#8172b2", ":")}


def _event_marks(events: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(step, kind) of each event the loss plot marks with a vertical line."""
    return [(e["step"], e["kind"]) for e in events if e["kind"] in EVENT_MARKS and e.get("step") is not None]


def _plot_loss(series: dict[str, list[tuple[int, float]]], events: list[dict[str, Any]], out: Path) -> Path | None:
    train, val = series["train loss"], series["validation loss"]
    if not train and not val:
        return None
    with figure(out, "Training") as ax:
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
        labelled: set[str] = set()
        for step, kind in _event_marks(events):
            color, style = EVENT_MARKS[kind]
            ax.axvline(step, color=color, ls=style, lw=1, label=None if kind in labelled else kind)
            labelled.add(kind)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend()
        ax.grid(alpha=0.3)
    return out


def write_report(paths: RunPaths) -> Path:
    paths.plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# Run report: `{paths.root.name}`", ""]

    lines.append("## 1. Clean")
    lines += _clean_section(paths)

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
        if tok_report := _load(paths.tokenizer / "report.json"):
            from data_prep.tokenizer_report import report_markdown

            lines.append(report_markdown(tok_report, level=3))
    else:
        lines += ["(not run)", ""]

    summary = _load(paths.train / "summary.json")
    metrics = _metrics(paths.metrics)
    lines.append("## 3. Train")
    if summary:
        lines += _table([(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))])
    series = _loss_series(metrics)
    events = read_events(paths.train)
    if _plot_loss(series, events, paths.plots / "loss.png"):
        lines += ["![loss](plots/loss.png)", ""]
        # What the plot shows, in words: a reader (or a check) sees a missing curve without the image.
        for name, points in series.items():
            last = f", last {points[-1][1]:.4g} at step {points[-1][0]}" if points else ""
            lines.append(f"- {name}: {len(points)} points{last}")
        lines.append("")
    lines += _timeline(events)
    if not summary and not metrics:
        lines += ["(not run)", ""]

    ev = _load(paths.eval / "eval.json")
    lines.append("## 4. Evaluate")
    if ev:
        ev = {**ev.get("result", {}), "checkpoint_tag": ev.get("checkpoint_tag"), "config_sha256": ev.get("config_sha256")}
        lines += _table([(k, v) for k, v in ev.items() if isinstance(v, (int, float, str)) and k not in ("eval_path", "skipped")])
        if ev.get("lm_eval"):
            lines += ["lm-evaluation-harness:", "", "| task | metric | value |", "|---|---|---|"]
            lines += [f"| {task} | {name} | {fmt(v)} |" for task, m in ev["lm_eval"].items() for name, v in m.items()]
            lines.append("")
        if ev.get("heldout"):
            lines += ["Held-out text (`eval.heldout_inputs`, scored whole):", "", *_table(list(ev["heldout"].items()))]
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
