"""A small real English corpus that needs no download: the docstrings of the Python stdlib.

Used by the smoke run (``data.sample_corpus: true``). One document per module, class (with its
methods' docs) and function. Like any scraped corpus it has exact and near-exact duplicates: some
occur naturally (inherited docstrings) and a few are added on purpose so exact dedup has work.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import pkgutil
import random
import subprocess
import sys
import warnings
from pathlib import Path

# Only the standard library is imported at module level: the docstrings are collected by running
# this file in a fresh, isolated interpreter (see _collect_in_subprocess).

# Modules whose import opens windows, prints, starts a browser, or is just huge and slow.
_SKIP = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip",
    "readline", "rlcompleter", "site", "sitecustomize", "usercustomize", "pydoc_data", "lib2to3",
    "msilib", "winreg", "winsound", "msvcrt", "nt", "_winapi", "encodings", "xxsubtype",
    "__hello__", "__phello__", "pty", "tty", "curses", "webbrowser", "venv", "ctypes",
}
# Packages whose submodules are also documented (bounded so the walk stays fast).
_MAX_SUBMODULES = 200
# Share of documents that get an exact copy (and a whitespace/case variant) appended.
_DUPLICATE_EVERY = 40


def _skipped(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in _SKIP or any(p.startswith("_") for p in parts) or parts[0].startswith("turtle")


def _import_quietly(name: str):
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
        io.StringIO()
    ):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException as err:  # noqa: BLE001 - SystemExit and friends from odd modules, too
            if isinstance(err, KeyboardInterrupt):
                raise
            return None


def _module_names() -> list[str]:
    names: set[str] = set()
    for top in sorted(getattr(sys, "stdlib_module_names", ())):
        if _skipped(top):
            continue
        mod = _import_quietly(top)
        if mod is None:
            continue
        names.add(top)
        if hasattr(mod, "__path__"):
            subs = sorted(
                info.name for info in pkgutil.iter_modules(mod.__path__, prefix=f"{top}.") if not _skipped(info.name)
            )
            names.update(subs[:_MAX_SUBMODULES])
    return sorted(names)


def _doc(obj) -> str:
    try:
        return (inspect.getdoc(obj) or "").strip()
    except Exception:  # noqa: BLE001 - some objects raise from __doc__ properties
        return ""


def _documents_of(module_name: str) -> list[tuple[str, str]]:
    mod = _import_quietly(module_name)
    if mod is None:
        return []
    docs: list[tuple[str, str]] = []
    if text := _doc(mod):
        docs.append((module_name, text))
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        # Only what the module defines, so re-exports are not counted once per importer.
        if getattr(obj, "__module__", None) != module_name:
            continue
        qual = f"{module_name}.{attr}"
        if inspect.isclass(obj):
            parts = [_doc(obj)]
            for meth_name in sorted(vars(obj)):
                if meth_name.startswith("_"):
                    continue
                meth_doc = _doc(getattr(obj, meth_name, None))
                if meth_doc:
                    parts.append(f"{meth_name}: {meth_doc}")
            text = "\n\n".join(p for p in parts if p)
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            text = _doc(obj)
        else:
            continue
        if text:
            docs.append((qual, text))
    return docs


def _variant(text: str) -> str:
    """Same document after a sloppy copy: other case and whitespace; normalised dedup must catch it."""
    return "  " + text.upper().replace(" ", "   ") + "\n"


def collect_documents() -> list[tuple[str, str]]:
    docs: list[tuple[str, str]] = []
    for name in _module_names():
        docs.extend(_documents_of(name))
    return sorted(docs)


def _collect_in_subprocess() -> list[tuple[str, str]]:
    """Run the collection in a fresh interpreter that sees only the stdlib.

    What a module defines can depend on what was imported before it (Ray, pandas, ...), so
    collecting in the caller's process gave a slightly different corpus from one caller to another.
    A fresh ``-I -S`` interpreter makes it depend on the Python version only, and keeps the odd
    import side effect (threads, signal handlers, atexit hooks) out of the caller.
    """
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--collect"],
        capture_output=True,
        timeout=300,
        check=False,
        env={"LC_ALL": "C.UTF-8"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"collecting stdlib docstrings failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return [tuple(d) for d in json.loads(proc.stdout)]


def build_sample_corpus(out_path: Path, max_docs: int, seed: int = 0) -> int:
    """Write ``{"id", "text"}`` jsonl lines of stdlib docstrings to ``out_path``; return the count."""
    from pretrain_pipeline.artifacts import atomic_path

    out_path = Path(out_path)
    docs = _collect_in_subprocess()
    rng = random.Random(seed)
    rng.shuffle(docs)

    n_dups = max(1, min(max_docs, len(docs)) // _DUPLICATE_EVERY)
    docs = docs[: max(1, max_docs - n_dups)]
    records = [{"id": doc_id, "text": text} for doc_id, text in docs]
    for k, i in enumerate(sorted(rng.sample(range(len(docs)), min(n_dups, len(docs))))):
        doc_id, text = docs[i]
        # Alternate exact copies and case/whitespace variants; both are exact duplicates after
        # normalisation, and they are appended after the originals so the original is kept.
        records.append({"id": f"{doc_id}#dup", "text": text if k % 2 == 0 else _variant(text)})

    with atomic_path(out_path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return len(records)


def build_heldout_sample(out_path: Path, n_docs: int, max_training_docs: int, seed: int = 0) -> int:
    """Write the last ``n_docs`` documents of the shuffle ``build_sample_corpus`` makes with ``seed``:
    documents no sample corpus of up to ``max_training_docs`` documents holds, nor any text of one."""
    from pretrain_pipeline.artifacts import atomic_path

    docs = _collect_in_subprocess()
    random.Random(seed).shuffle(docs)
    if max_training_docs + n_docs > len(docs):
        raise ValueError(
            f"the docstring corpus has {len(docs)} documents: {n_docs} held out and up to {max_training_docs} for "
            "training overlap; lower ablation.heldout.sample_corpus_docs or data.sample_corpus_max_docs"
        )
    training_texts = {text for _, text in docs[:max_training_docs]}
    heldout = [(doc_id, text) for doc_id, text in docs[len(docs) - n_docs:] if text not in training_texts]
    with atomic_path(Path(out_path)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc_id, text in heldout:
                f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
    return len(heldout)


if __name__ == "__main__":  # pragma: no cover
    if sys.argv[1:] == ["--collect"]:
        # ASCII-only JSON: no dependence on the child's stdout encoding.
        sys.stdout.write(json.dumps(collect_documents(), ensure_ascii=True))
    else:  # python -m data_prep.sample_corpus out.jsonl 4000
        print(build_sample_corpus(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 4000))
