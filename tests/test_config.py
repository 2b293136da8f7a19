"""The config schema: YAML + overrides, refusals that name the field, shipped configs valid."""

from pathlib import Path

import pytest

from pretrain_pipeline.cli import main
from pretrain_pipeline.config import ConfigError, PipelineConfig, build_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smoke.yaml", "gpt2-124m.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_gpt2_config_is_the_gpt2_small_shape():
    cfg = load_config(ROOT / "configs" / "gpt2-124m.yaml")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    assert (t.precision, t.zero_stage) == ("bf16", 1)


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["train.max_steps=20", "data.inputs=[a.jsonl, b.jsonl]", "runtime.ray_address="]) == {
        "train": {"max_steps": 20},
        "data": {"inputs": ["a.jsonl", "b.jsonl"]},
        "runtime": {"ray_address": None},
    }


def test_override_beats_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {sample_corpus: true}\ntrain: {max_steps: 5, lr: 0.1}\n")
    cfg = load_config(f, ["train.max_steps=7"])
    assert (cfg.train.max_steps, cfg.train.lr) == (7, 0.1)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"train": {"zero_stage": 4}}, "train.zero_stage"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "n_embd"),
        ({"train": {"max_stepz": 3}}, "train.max_stepz"),
        ({"runtime": {"run_name": "../escape"}}, "runtime.run_name"),
        ({"train": {"offload_param": True, "zero_stage": 2}}, "offload_param"),
    ],
)
def test_invalid_config_names_the_field(raw, field):
    raw = {"data": {"sample_corpus": True}, **raw}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config(raw, source="x.yaml")


def test_nothing_to_read_is_refused():
    with pytest.raises(ConfigError, match="nothing to read"):
        build_config({})


def test_bad_yaml_names_the_file(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(f)


def test_cli_refuses_bad_config_before_any_work(tmp_path, capsys):
    rc = main(["train", "-c", str(ROOT / "configs/smoke.yaml"), "--set", "train.precision=fp8",
               "--set", f"runtime.runs_root={tmp_path}"])
    assert rc == 2
    assert "train.precision" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "an invalid config must not create a run directory"


def test_cli_prints_resolved_config(capsys):
    assert main(["config", "-c", str(ROOT / "configs/smoke.yaml"), "--run-name", "abc"]) == 0
    assert "run_name: abc" in capsys.readouterr().out


def test_section_fingerprint_tracks_values():
    a = PipelineConfig.model_validate({"data": {"sample_corpus": True}})
    b = PipelineConfig.model_validate({"data": {"sample_corpus": True}, "train": {"lr": 1e-3}})
    assert a.data.fingerprint() == b.data.fingerprint()
    assert a.train.fingerprint() != b.train.fingerprint()
