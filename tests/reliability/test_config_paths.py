"""Paths taken from a config can never make a stage write outside the run directory.

Audit of every config field that becomes a path: ``runtime.run_name`` (the run directory's name,
validated below), ``train.data_mixture`` names (read as ``<runs_root>/<name>/shards``) and
``tokenizer.from_run`` (read as ``<runs_root>/<name>/tokenizer``) are plain names;
``runtime.runs_root`` *is* the chosen root; ``data.inputs`` and ``train.launch.hostfile`` are
only read. Every path a stage writes is a fixed name under ``RunPaths(root)``.
"""

from __future__ import annotations

import dataclasses

import pytest

from pretrain_pipeline.artifacts import RunPaths
from pretrain_pipeline.config import ConfigError, build_config

BASE = {"data": {"sample_corpus": True}}
ESCAPES = ["..", "../other", "a/../../b", "/etc", "a/b", "a\\b", ".hidden", "", "-x", "name\n"]


@pytest.mark.parametrize("name", ESCAPES)
def test_run_name_must_be_a_plain_name(name):
    with pytest.raises(ConfigError, match="runtime.run_name"):
        build_config(BASE, [f"runtime.run_name={name!r}"] if name else ["runtime.run_name=''"])


@pytest.mark.parametrize("name", [n for n in ESCAPES if n])
def test_data_mixture_names_must_be_plain_names(name):
    with pytest.raises(ConfigError, match="data_mixture"):
        build_config({**BASE, "train": {"data_mixture": {name: 1.0, "web": 1.0}}})


@pytest.mark.parametrize("name", [n for n in ESCAPES if n])
def test_tokenizer_from_run_must_be_a_plain_name(name):
    with pytest.raises(ConfigError, match="tokenizer.from_run"):
        build_config({**BASE, "tokenizer": {"from_run": name}})


def test_plain_names_are_accepted():
    cfg = build_config({**BASE, "tokenizer": {"from_run": "web-2024.v1"}, "train": {"data_mixture": {"web_1": 1.0}}},
                       ["runtime.run_name=books.v2"])
    assert (cfg.tokenizer.from_run, list(cfg.train.data_mixture), cfg.runtime.run_name) == ("web-2024.v1", ["web_1"], "books.v2")


def test_every_stage_output_is_inside_the_run_directory(tmp_path):
    cfg = build_config(BASE, ["runtime.run_name=ok.name-1", f"runtime.runs_root={tmp_path}"])
    paths = RunPaths(cfg.run_dir())
    root = paths.root.resolve()
    assert root.parent == tmp_path.resolve()
    outputs = [name for name, value in vars(RunPaths).items() if isinstance(value, property)]
    assert len(outputs) >= 10 and not dataclasses.fields(RunPaths)[1:]  # root is the only input
    for name in outputs:
        assert getattr(paths, name).resolve().is_relative_to(root), name
