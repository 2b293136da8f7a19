"""The config schema: YAML + overrides, refusals that name the field, shipped configs valid."""

import json
import re
from pathlib import Path

import pytest

from pretrain_pipeline.cli import main
from pretrain_pipeline.config import (
    MOVED_DATA_KEYS,
    MOVED_TRAIN_KEYS,
    ConfigError,
    DataConfig,
    PipelineConfig,
    Section,
    TrainConfig,
    build_config,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["smoke.yaml", "gpt2-124m.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_gpt2_config_is_the_gpt2_small_shape():
    cfg = load_config(ROOT / "configs" / "gpt2-124m.yaml")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    assert (t.precision, t.zero.stage) == ("bf16", 1)


def test_overrides_are_parsed_as_yaml_and_nested():
    assert parse_overrides(["train.max_steps=20", "data.inputs=[a.jsonl, b.jsonl]", "runtime.ray_address="]) == {
        "train": {"max_steps": 20},
        "data": {"inputs": ["a.jsonl", "b.jsonl"]},
        "runtime": {"ray_address": None},
    }


def test_override_beats_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data: {sample_corpus: true}\ntrain: {max_steps: 5, optimizer: {lr: 0.1}}\n")
    cfg = load_config(f, ["train.max_steps=7"])
    assert (cfg.train.max_steps, cfg.train.optimizer.lr) == (7, 0.1)


@pytest.mark.parametrize(
    "raw, field",
    [
        ({"train": {"zero": {"stage": 4}}}, "train.zero.stage"),
        ({"train": {"micro_batch_size": 0}}, "train.micro_batch_size"),
        ({"model": {"n_embd": 100, "n_head": 3}}, "n_embd"),
        ({"train": {"max_stepz": 3}}, "train.max_stepz"),
        ({"runtime": {"run_name": "../escape"}}, "runtime.run_name"),
        ({"train": {"zero": {"offload_param": True, "stage": 2}}}, "offload_param"),
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
    b = PipelineConfig.model_validate({"data": {"sample_corpus": True}, "train": {"optimizer": {"lr": 1e-3}}})
    assert a.data.fingerprint() == b.data.fingerprint()
    assert a.train.fingerprint() != b.train.fingerprint()


# TrainConfig's defaults when its fields were flat: grouping them must not change one of them.
FLAT_TRAIN_DEFAULTS = {
    "zero_stage": 2, "keep_zero_stage_on_one_rank": False, "offload_optimizer": False, "offload_param": False,
    "precision": "fp32", "micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 1000,
    "lr": 6e-4, "min_lr": 6e-5, "warmup_steps": 100, "lr_schedule": "cosine", "decay_fraction": 0.2,
    "wsd_decay": "linear", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
    "activation_checkpointing": False, "compile": False, "nonfinite_loss": "stop", "max_skipped_batches": 10,
    "checkpoint_every": 500, "keep_last_checkpoints": 3, "eval_every": 250, "eval_batches": 20, "log_every": 10,
    "nproc_per_node": 1, "nnodes": 1, "launcher": "torchrun", "ray_max_failures": 3, "node_rank": 0,
    "master_addr": "127.0.0.1", "master_port": 29500, "hostfile": None, "no_ssh": False, "device": "auto",
    "seed": 1337, "resume": "auto", "device_memory_gb": 0.0, "peak_tflops": 0.0, "planned_mfu": 0.4,
    "data_mixture": {},
}


def lookup(model, dotted: str):
    for name in dotted.split("."):
        model = getattr(model, name)
    return model


def test_grouped_train_defaults_equal_the_flat_ones():
    train = PipelineConfig.model_validate({"data": {"sample_corpus": True}}).train
    assert set(MOVED_TRAIN_KEYS) < set(FLAT_TRAIN_DEFAULTS)
    for old, default in FLAT_TRAIN_DEFAULTS.items():
        new = MOVED_TRAIN_KEYS.get(old, f"train.{old}")
        assert lookup(train, new.removeprefix("train.")) == default, (old, new)


def test_every_train_field_has_a_description():
    groups = [f.annotation for f in TrainConfig.model_fields.values() if isinstance(f.annotation, type)
              and issubclass(f.annotation, Section)]
    sections = [TrainConfig, *groups]
    assert len(sections) == 9  # TrainConfig and its eight groups
    for section in sections:
        for name, field in section.model_fields.items():
            assert field.description, f"{section.__name__}.{name} has no description"


@pytest.mark.parametrize("old", sorted(MOVED_TRAIN_KEYS))
def test_a_moved_train_key_names_its_new_place(tmp_path, old):
    new = MOVED_TRAIN_KEYS[old]
    value = FLAT_TRAIN_DEFAULTS[old]
    message = f"train.{old} moved to {new}"
    f = tmp_path / "old.yaml"
    f.write_text(f"data: {{sample_corpus: true}}\ntrain: {{{old}: {json.dumps(value)}}}\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(f)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_config({"data": {"sample_corpus": True}}, [f"train.{old}={json.dumps(value)}"])
    # The place it names takes the same value.
    cfg = build_config({"data": {"sample_corpus": True}}, [f"{new}={json.dumps(value)}"])
    assert lookup(cfg.train, new.removeprefix("train.")) == value


def test_all_moved_keys_of_an_old_file_are_named_at_once(tmp_path):
    f = tmp_path / "old.yaml"
    f.write_text("data: {sample_corpus: true}\ntrain: {zero_stage: 1, max_steps: 5, nproc_per_node: 2}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert "train.zero_stage moved to train.zero.stage" in str(err.value)
    assert "train.nproc_per_node moved to train.launch.nproc_per_node" in str(err.value)


def test_cross_field_checks_live_in_their_group():
    with pytest.raises(ConfigError, match=r"train\.launch\.node_rank=2 must be < train\.launch\.nnodes=2"):
        build_config({"data": {"sample_corpus": True}}, ["train.launch.nnodes=2", "train.launch.node_rank=2"])
    with pytest.raises(ConfigError, match=r"train\.zero\.offload_optimizer needs train\.zero\.stage >= 1"):
        build_config({"data": {"sample_corpus": True}}, ["train.zero.stage=0", "train.zero.offload_optimizer=true"])
    # The WSD check needs the schedule and max_steps, so it is TrainConfig's.
    with pytest.raises(ConfigError, match="exceed max_steps"):
        build_config({"data": {"sample_corpus": True}}, ["train.schedule.kind=wsd", "train.max_steps=100"])


def test_prefect_form_shows_the_train_groups():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pretrain_pipeline

    schema = parameter_schema(pretrain_pipeline.fn).model_dump()
    train = schema["definitions"]["TrainConfig"]["properties"]
    for group in ("zero", "optimizer", "schedule", "checkpoint", "validation", "recovery", "launch", "plan"):
        ref = train[group]["$ref"].rsplit("/", 1)[-1]
        fields = schema["definitions"][ref]["properties"]
        assert fields and all(f.get("description") for f in fields.values()), group
    assert "nproc_per_node" in schema["definitions"]["LaunchConfig"]["properties"]
    assert "nproc_per_node" not in train


# DataConfig's filter settings before they were grouped by filter family, with their defaults then.
FLAT_DATA_DEFAULTS = {
    "language_filter": True, "languages": ["en"], "language_threshold": 0.65,
    "gopher_repetition": True, "max_duplicate_line_fraction": 0.3, "max_duplicate_paragraph_fraction": 0.3,
    "max_duplicate_line_char_fraction": 0.2, "max_duplicate_paragraph_char_fraction": 0.2,
    "gopher_top_ngram_fractions": {2: 0.2, 3: 0.18, 4: 0.16},
    "gopher_dup_ngram_fractions": {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
    "gopher_quality": True, "min_words": 5, "max_words": 100_000, "min_mean_word_length": 3.0,
    "max_mean_word_length": 10.0, "max_symbol_to_word_ratio": 0.1, "min_alpha_word_fraction": 0.8,
    "min_stop_words": 2, "max_bullet_lines_ratio": 0.9, "max_ellipsis_lines_ratio": 0.3,
    "c4_filter": False, "c4_min_words_per_line": 3, "c4_min_sentences": 5, "c4_max_word_length": 1000,
    "c4_drop_no_terminal_punct": True, "c4_drop_curly_bracket": True, "c4_drop_lorem_ipsum": True,
    "c4_drop_javascript_lines": True, "c4_drop_policy_lines": True, "c4_remove_citations": True,
    "fineweb_filter": True, "fineweb_line_punct_ratio": 0.12, "fineweb_short_line_ratio": 0.67,
    "fineweb_short_line_chars": 30, "fineweb_char_duplicates_ratio": 0.01, "fineweb_new_line_ratio": 0.3,
}
# The two keys that were on/off switches and are sections now.
MOVED_DATA_SWITCHES = {"gopher_quality": "data.gopher_quality.enabled", "gopher_repetition": "data.gopher_repetition.enabled"}


def test_grouped_filter_defaults_equal_the_flat_ones():
    moved = {**MOVED_DATA_KEYS, **MOVED_DATA_SWITCHES}
    assert set(moved) == set(FLAT_DATA_DEFAULTS)
    for old, default in FLAT_DATA_DEFAULTS.items():
        assert lookup(DataConfig(), moved[old].removeprefix("data.")) == default, (old, moved[old])


@pytest.mark.parametrize("old", sorted(FLAT_DATA_DEFAULTS))
def test_a_moved_data_key_names_its_new_place(old):
    new = {**MOVED_DATA_KEYS, **MOVED_DATA_SWITCHES}[old]
    value = json.dumps(FLAT_DATA_DEFAULTS[old])
    with pytest.raises(ConfigError, match=re.escape(f"data.{old} moved to {new}")):
        build_config({"data": {"sample_corpus": True}}, [f"data.{old}={value}"])
    cfg = build_config({"data": {"sample_corpus": True}}, [f"{new}={value}"])
    assert lookup(cfg.data, new.removeprefix("data.")) == FLAT_DATA_DEFAULTS[old]


def test_filter_sections_hold_exactly_the_filter_parameters():
    """build_filters passes each section as it is, so its fields are the filter's keyword arguments."""
    import inspect

    from data_prep.filters import C4Quality, FineWebQuality, GopherQuality, GopherRepetition
    from data_prep.langid import LanguageFilter

    data = DataConfig()
    filters = {"language": LanguageFilter, "gopher_repetition": GopherRepetition, "gopher_quality": GopherQuality,
               "c4": C4Quality, "fineweb": FineWebQuality}
    for name, cls in filters.items():
        assert cls.name == name
        section = getattr(data, name)
        assert set(section.model_fields) - {"enabled"} == set(inspect.signature(cls).parameters), name
        assert all(field.description for field in section.model_fields.values()), name
