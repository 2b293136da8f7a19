"""The texts benchmarks show a model, read through lm-evaluation-harness, for decontamination.

``data.decontaminate.tasks`` names lm-eval tasks (or groups); lm-eval's own ``TaskManager``
resolves them, so the local task YAMLs under ``eval.lm_eval_include_path`` work as they do for
the evaluate stage. For each document of a task's evaluation split the texts are the context the
model reads joined to each continuation it scores (every choice of a multiple-choice task, the
target otherwise): the question, the answer, and the n-grams that straddle them. This runs once,
in the driver; the workers get the resulting :class:`BenchmarkNgrams`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from data_prep.filters.decontamination import BenchmarkNgrams, normalized_words
from pretrain_pipeline.config import PipelineConfig

log = logging.getLogger(__name__)


def resolve_tasks(names: list[str], include_path: str | None):
    """lm-eval's TaskManager and the names it does not know: only the local task directory when it
    defines every name (indexing lm-eval's own thousands of task YAMLs takes seconds), else that
    directory over lm-eval's tasks. Nothing is downloaded (the preflight calls this too)."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(name in local.all_tasks for name in names):
            return local, []
    manager = TaskManager(include_path=include_path)
    return manager, [name for name in names if name not in manager.all_tasks]


def unknown_tasks_message(unknown: list[str], include_path: str | None) -> str:
    where = f"eval.lm_eval_include_path ({include_path}) nor " if include_path else ""
    return f"{unknown} are in neither {where}lm-eval's own tasks"


def _task_manager(names: list[str], include_path: str | None):
    manager, unknown = resolve_tasks(names, include_path)
    if unknown:
        raise ValueError(f"data.decontaminate.tasks: {unknown_tasks_message(unknown, include_path)}")
    return manager


def _as_texts(value: Any, choices: list[str] | None) -> list[str]:
    """A doc_to_text / doc_to_target value as strings: an int indexes ``choices``, a list is each of its items."""
    if isinstance(value, list):
        return [text for item in value for text in _as_texts(item, choices)]
    if isinstance(value, int) and choices is not None:
        return [str(choices[value])] if 0 <= value < len(choices) else []
    return [str(value)] if value is not None and str(value).strip() else []


def shown_texts(task) -> Iterator[str]:
    """Context + delimiter + continuation for every continuation of every evaluation document."""
    # lm-eval joins with target_delimiter; an empty one would glue two words into one here.
    delimiter = task.config.target_delimiter or " "
    for doc in task.eval_docs:
        choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
        if choices is not None and task.multiple_input:
            # Winogrande-style: each choice is a context, scored before the one target.
            contexts, continuations = [str(c) for c in choices], _as_texts(task.doc_to_target(doc), None)
        elif choices is not None:
            # Each choice is scored after the context.
            contexts, continuations = _as_texts(task.doc_to_text(doc), choices), [str(c) for c in choices]
        else:
            contexts, continuations = _as_texts(task.doc_to_text(doc), None), _as_texts(task.doc_to_target(doc), None)
        if not continuations:
            yield from contexts
        for context in contexts or [""]:
            for continuation in continuations:
                yield f"{context}{delimiter}{continuation}"


def load_benchmark_texts(names: list[str], include_path: str | None) -> dict[str, list[str]]:
    """Leaf task name -> the texts of its evaluation documents (a group gives each of its tasks)."""
    tasks = _task_manager(names, include_path).load(list(names))["tasks"]
    return {name: list(shown_texts(task)) for name, task in sorted(tasks.items())}


def benchmark_ngrams(cfg: PipelineConfig) -> BenchmarkNgrams | None:
    """The n-gram index of ``data.decontaminate``, or None when it lists no task."""
    section = cfg.data.decontaminate
    if not section.tasks:
        return None
    texts = load_benchmark_texts(section.tasks, cfg.eval.lm_eval_include_path)
    index = BenchmarkNgrams.build(texts, section.ngram)
    for task, docs in texts.items():
        short = sum(1 for t in docs if len(normalized_words(t)) < section.ngram)
        log.info("decontaminate: %s: %d texts, %d distinct %d-grams%s", task, len(docs), index.ngrams_per_task[task],
                 section.ngram, f" ({short} texts shorter than {section.ngram} words cannot match)" if short else "")
    return index
