"""The one typed config of the pipeline.

The same pydantic schema is read from YAML (``configs/*.yaml``), overridden from the command
line (``--set train.max_steps=20``) and rendered as the Prefect UI form, so a bad value is refused
in one place, before any work starts, with the dotted name of the field.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pretrain_pipeline.errors import UserError


RUN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class Section(BaseModel):
    # Unknown keys are refused so a typo in YAML fails loudly instead of being ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def fingerprint(self) -> str:
        """Stable hash of this section, used to decide whether a stage's output is current."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def refuse_moved_keys(section: str, data: Any, moved: dict[str, str]) -> Any:
    """Refuse keys that moved to another place, naming the new one, so an old YAML file or
    ``--set`` override says where its setting lives now instead of only "extra inputs".

    For a ``model_validator(mode="before")``: ``moved`` maps an old key of ``section`` to its new
    dotted name, e.g. ``{"nproc_per_node": "train.launch.nproc_per_node"}``.
    """
    if isinstance(data, dict):
        found = [f"{section}.{old} moved to {moved[old]}" for old in data if old in moved]
        if found:
            raise ValueError("; ".join(found))
    return data


class FilterSection(Section):
    """One filter family: ``enabled`` plus its filter class's keyword arguments, under the same names.

    The defaults live here, not in the filter classes: this is what runs, what the stage
    fingerprint hashes and what the Prefect form shows.
    """

    def params(self) -> dict[str, Any]:
        """Keyword arguments of the filter class (every field but ``enabled``)."""
        return self.model_dump(exclude={"enabled"})


class LanguageConfig(FilterSection):
    """Language identification with py3langid (the model ships in the package): data_prep.langid."""

    enabled: bool = Field(True, description="Drop documents not in `languages` (the language is then recorded).")
    languages: list[str] = Field(
        default_factory=lambda: ["en"], description="ISO 639-1 codes to keep; empty keeps every language."
    )
    threshold: float = Field(0.65, ge=0, le=1, description="Minimum language probability (FineWeb: 0.65).")


class GopherRepetitionConfig(FilterSection):
    """Gopher repetition rules (Rae et al. 2021): data_prep.filters.gopher_repetition."""

    enabled: bool = Field(True, description="Apply the Gopher repetition rules.")
    dup_line_frac: float = Field(0.3, ge=0, le=1, description="Max share of lines that are duplicates.")
    dup_para_frac: float = Field(0.3, ge=0, le=1, description="Max share of paragraphs that are duplicates.")
    dup_line_char_frac: float = Field(0.2, ge=0, le=1, description="Max share of characters in duplicate lines.")
    dup_para_char_frac: float = Field(0.2, ge=0, le=1, description="Max share of characters in duplicate paragraphs.")
    top_n_grams: dict[int, float] = Field(
        default_factory=lambda: {2: 0.2, 3: 0.18, 4: 0.16},
        description="n -> max share of characters in the most frequent n-gram.",
    )
    dup_n_grams: dict[int, float] = Field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10},
        description="n -> max share of characters in repeated n-grams.",
    )


class GopherQualityConfig(FilterSection):
    """Gopher quality rules (Rae et al. 2021): data_prep.filters.gopher_quality."""

    enabled: bool = Field(True, description="Apply the Gopher quality rules.")
    min_words: int = Field(
        5, ge=0, description="Drop documents with fewer words (Gopher: 50; lower keeps short documents such as docstrings)."
    )
    max_words: int = Field(100_000, ge=1, description="Drop documents with more words.")
    min_mean_word_length: float = Field(3.0, ge=0, description="Drop if the mean word length is below.")
    max_mean_word_length: float = Field(10.0, ge=0, description="Drop if the mean word length is above.")
    max_symbol_to_word_ratio: float = Field(0.1, ge=0, description="Max '#' and '...' per word.")
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1, description="Min share of words that contain a letter.")
    max_bullet_lines_ratio: float = Field(0.9, ge=0, le=1, description="Max share of lines starting with a bullet.")
    max_ellipsis_lines_ratio: float = Field(0.3, ge=0, le=1, description="Max share of lines ending with an ellipsis.")
    min_stop_words: int = Field(2, ge=0, description="Minimum count of the, be, to, of, and, that, have, with.")


class C4Config(FilterSection):
    """C4 rules (Raffel et al. 2020): line rules rewrite the text, document rules drop it (data_prep.filters.c4)."""

    enabled: bool = Field(
        False,
        description="Apply the C4 rules (off by default: they drop code, lists and documents under 5 "
        "sentences, e.g. most of the docstring sample corpus).",
    )
    min_words_per_line: int = Field(3, ge=0, description="Drop lines with fewer words.")
    min_sentences: int = Field(5, ge=0, description="Drop documents with fewer sentences.")
    max_word_length: int = Field(1000, ge=0, description="Drop lines with a longer word (0: off).")
    drop_no_terminal_punct: bool = Field(True, description="Drop lines not ending in terminal punctuation.")
    drop_curly_bracket: bool = Field(True, description="Drop documents containing '{' (code).")
    drop_lorem_ipsum: bool = Field(True, description="Drop documents containing 'lorem ipsum'.")
    drop_javascript_lines: bool = Field(True, description="Drop lines mentioning javascript.")
    drop_policy_lines: bool = Field(True, description="Drop cookie/privacy/terms notices.")
    remove_citations: bool = Field(True, description="Remove [1], [edit], [citation needed].")


class FineWebConfig(FilterSection):
    """FineWeb's own rules (Penedo et al. 2024): data_prep.filters.fineweb."""

    enabled: bool = Field(True, description="Apply the FineWeb quality rules.")
    line_punct_ratio: float = Field(0.12, ge=0, le=1, description="Min share of lines ending in punctuation.")
    short_line_ratio: float = Field(0.67, ge=0, le=1, description="Max share of short lines.")
    short_line_chars: int = Field(30, ge=0, description="A line this long or shorter is short.")
    char_duplicates_ratio: float = Field(0.01, ge=0, le=1, description="Max share of characters in duplicate lines.")
    new_line_ratio: float = Field(0.3, ge=0, description="Max newlines per word.")


class BoilerplateConfig(FilterSection):
    """Notice and navigation boilerplate (cookie banners, privacy and terms notices, menus, footers,
    subscribe and share prompts): data_prep.filters.boilerplate."""

    enabled: bool = Field(True, description="Drop documents made mostly of notice and navigation lines.")
    max_notice_line_ratio: float = Field(
        0.5, ge=0, le=1, description="Drop a document when at least this share of its lines are notice or navigation lines."
    )
    max_notice_line_words: int = Field(
        40, ge=1, description="A line with a notice phrase counts only up to this many words (longer: prose mentioning one)."
    )
    max_nav_line_words: int = Field(6, ge=1, description="A line made only of navigation and button words counts up to this many words.")
    min_menu_block_lines: int = Field(
        4, ge=2, description="This many short capitalised lines in a row (menu entries) count as navigation lines."
    )
    footer_max_char_share: float = Field(
        0.1, ge=0, le=1, description="Notice lines holding less than this share of the characters, after prose with no notice phrase, are a footer: kept."
    )


class DecontaminateConfig(Section):
    """Benchmark decontamination: data_prep.benchmarks reads the tasks' texts, data_prep.filters.decontamination drops."""

    tasks: list[str] = Field(
        default_factory=list,
        description="lm-evaluation-harness tasks or groups, resolved by lm-eval's TaskManager with eval.lm_eval_include_path; "
        "a document sharing a word n-gram with a task's prompts and answers is dropped as contamination:<task>. Empty: off.",
    )
    ngram: int = Field(13, ge=3, description="Words per n-gram, after lowercasing and stripping punctuation (GPT-3, datatrove: 13).")


class PIIConfig(Section):
    """PII redaction of the kept documents: data_prep.pii.PIIRedactor's keyword arguments."""

    entities: list[Literal["email", "ip", "phone"]] = Field(
        default_factory=lambda: ["email", "ip", "phone"],
        description="What becomes a placeholder: e-mail addresses, globally routable IP addresses (not "
        "private or documentation ranges), valid phone numbers. Empty turns redaction off.",
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB", "DE", "FR"],
        description="Regions (phonenumbers' ISO 3166 codes) whose national numbers, written without "
        "+country code, are recognised; numbers written with + are recognised for every region.",
    )

    @model_validator(mode="after")
    def _check_with_redactor(self) -> "PIIConfig":
        from data_prep.pii import PIIRedactor  # its constructor is where entities and regions are checked

        PIIRedactor(**self.model_dump())
        return self


# Flat DataConfig keys of earlier versions -> where they live now.
MOVED_DATA_KEYS: dict[str, str] = {
    "language_filter": "data.language.enabled",
    "languages": "data.language.languages",
    "language_threshold": "data.language.threshold",
    "max_duplicate_line_fraction": "data.gopher_repetition.dup_line_frac",
    "max_duplicate_paragraph_fraction": "data.gopher_repetition.dup_para_frac",
    "max_duplicate_line_char_fraction": "data.gopher_repetition.dup_line_char_frac",
    "max_duplicate_paragraph_char_fraction": "data.gopher_repetition.dup_para_char_frac",
    "gopher_top_ngram_fractions": "data.gopher_repetition.top_n_grams",
    "gopher_dup_ngram_fractions": "data.gopher_repetition.dup_n_grams",
    **{name: f"data.gopher_quality.{name}" for name in GopherQualityConfig.model_fields if name != "enabled"},
    "c4_filter": "data.c4.enabled",
    **{f"c4_{name}": f"data.c4.{name}" for name in C4Config.model_fields if name != "enabled"},
    "fineweb_filter": "data.fineweb.enabled",
    **{f"fineweb_{name}": f"data.fineweb.{name}" for name in FineWebConfig.model_fields if name != "enabled"},
}


class DataConfig(Section):
    """Where the raw corpus comes from and how it is cleaned."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Files, directories or glob patterns of raw documents "
        "(.jsonl, .jsonl.gz, .jsonl.zst, .parquet, .txt). Relative paths are from the working directory.",
    )
    sample_corpus: bool = Field(
        False,
        description="Build a small English corpus from the docstrings of the installed Python "
        "packages instead of reading `inputs` (used by the smoke run; needs no download).",
    )
    sample_corpus_max_docs: int = Field(4000, ge=10, description="Cap on documents in the sample corpus.")
    text_field: str = Field("text", description="Field holding the document text (jsonl, parquet).")
    id_field: str | None = Field(
        "id", description="Field holding the document id; ids are made from file and line when absent."
    )
    max_chars: int = Field(
        1_000_000, ge=1000, description="Documents longer than this are cut to this many characters."
    )
    long_doc_rule: Literal["truncate", "drop"] = Field(
        "truncate", description="Documents over `max_chars`: cut at a word boundary, or drop them."
    )
    unicode_repair: bool = Field(True, description="Repair mojibake and strip control characters with ftfy (NFC, never NFKC).")
    normalize_whitespace: bool = Field(
        True, description="Unify line breaks and odd spaces, drop invisible characters, trailing spaces and extra blank lines."
    )
    # The filters, in the order they run; each section holds its filter class's keyword arguments.
    language: LanguageConfig = Field(default_factory=LanguageConfig, description="Language identification filter.")
    gopher_repetition: GopherRepetitionConfig = Field(
        default_factory=GopherRepetitionConfig, description="Gopher repetition filter."
    )
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig, description="Gopher quality filter.")
    c4: C4Config = Field(default_factory=C4Config, description="C4 line and document filter.")
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig, description="FineWeb quality filter.")
    boilerplate: BoilerplateConfig = Field(
        default_factory=BoilerplateConfig, description="Notice and navigation boilerplate filter."
    )
    decontaminate: DecontaminateConfig = Field(
        default_factory=DecontaminateConfig, description="Benchmark decontamination (lm-eval tasks' n-grams)."
    )
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII redaction (after the filters).")
    exact_dedup: bool = Field(True, description="Drop exact duplicates (hash of normalised text).")
    # MinHash LSH near-dup dedup (FineWeb: 5-gram shingles, 14 bands x 8 rows).
    minhash_dedup: bool = Field(True, description="Drop near duplicates found by MinHash LSH.")
    minhash_ngram: int = Field(5, ge=1, description="Word n-gram size of the shingles.")
    minhash_bands: int = Field(14, ge=1, description="LSH bands; a pair sharing one band's hashes is a candidate.")
    minhash_rows: int = Field(8, ge=1, description="Hashes per band (bands x rows hashes per document).")
    minhash_seed: int = Field(1, description="Seed of the MinHash permutations.")
    documents_per_shard: int = Field(50_000, ge=1, description="Documents per cleaned Parquet shard.")
    clean_task_mb: float = Field(
        128.0,
        gt=0,
        description="Input files bigger than this are cleaned as several Ray tasks of about this size "
        "(plain jsonl cut at line starts, Parquet at row groups; .gz, .zst and .txt are read whole).",
    )
    clean_batch_mb: float = Field(
        4.0,
        ge=0,
        description="With fewer input files than CPUs, tasks of at least this size: files are cut smaller and "
        "compressed jsonl is read once by the driver and cleaned in line batches of this many MB; 0: one task per file.",
    )
    dropped_excerpt_chars: int = Field(
        300, ge=0, description="Characters of each dropped document kept in dropped.parquet, to see what a filter removed."
    )

    @model_validator(mode="before")
    @classmethod
    def _refuse_flat_filter_keys(cls, data: Any) -> Any:
        # gopher_quality and gopher_repetition were on/off switches before they were sections.
        switches = {k: f"data.{k}.enabled" for k in ("gopher_quality", "gopher_repetition")
                    if isinstance(data, dict) and isinstance(data.get(k), bool)}
        return refuse_moved_keys("data", data, {**MOVED_DATA_KEYS, **switches})

    @model_validator(mode="before")
    @classmethod
    def _refuse_pii_switch(cls, data: Any) -> Any:
        # One list instead of a switch plus a list: `entities: []` is off, and cannot disagree with it.
        return refuse_moved_keys("data", data, {"pii_redact": "data.pii.entities ([] turns redaction off)"})


class TokenizerConfig(Section):
    """SentencePiece training and Arrow shard writing."""

    vocab_size: int = Field(8000, ge=64, le=1_000_000, description="Vocabulary size including special tokens.")
    model_type: Literal["bpe", "unigram"] = Field("bpe", description="SentencePiece model type.")
    character_coverage: float = Field(0.9999, gt=0, le=1, description="SentencePiece character coverage.")
    byte_fallback: bool = Field(True, description="Encode unknown characters as bytes (no <unk>).")
    split_digits: bool = Field(True, description="Split numbers into single digits.")
    input_sentence_size: int = Field(
        2_000_000, ge=100, description="Lines sampled (seeded) for training; bounds memory."
    )
    max_sentence_length: int = Field(16384, ge=64, description="Longer lines are split before training.")
    user_defined_symbols: list[str] = Field(
        default_factory=list,
        description="Extra special tokens, each always one id (4, 5, ... after unk, bos, eos, pad); no whitespace.",
    )
    val_fraction: float = Field(
        0.01, ge=0, lt=1, description="Share of documents routed to validation by a seeded hash of the id."
    )
    shard_size_mb: float = Field(64.0, gt=0, description="Target size of one Arrow shard.")
    seed: int = Field(1234, description="Seed for the training sample and the train/val split.")
    from_run: str | None = Field(
        None,
        description="Reuse the finished tokenizer of this run (a run name under runtime.runs_root) instead of "
        "training one, so named sources (web, books, code) share token ids and can be mixed by "
        "train.data_mixture. The training fields above are then ignored; val_fraction, shard_size_mb and seed "
        "still shape this run's shards.",
    )

    @model_validator(mode="after")
    def _check_tokenizer(self) -> "TokenizerConfig":
        if self.from_run is not None and (not RUN_NAME_RE.fullmatch(self.from_run) or ".." in self.from_run):
            # It becomes a path under runs_root: a plain run name can never point elsewhere.
            raise ValueError(f"tokenizer.from_run: {self.from_run!r} is not a plain run name (no '/', no '..')")
        for sym in self.user_defined_symbols:
            # SentencePiece splits text at whitespace before matching pieces: such a symbol would
            # never come out as its one id.
            if not sym or any(c.isspace() for c in sym):
                raise ValueError(f"tokenizer.user_defined_symbols: {sym!r} is empty or contains whitespace")
            if sym in ("<unk>", "<s>", "</s>", "<pad>"):
                raise ValueError(f"tokenizer.user_defined_symbols: {sym!r} is already a special token")
        if len(set(self.user_defined_symbols)) != len(self.user_defined_symbols):
            raise ValueError("tokenizer.user_defined_symbols: a symbol is listed twice")
        return self


# Published shapes. A preset fills only the fields the user did not set, so
# ``{preset: gpt2-124m, block_size: 256}`` is GPT-2 small with a shorter context.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=128, norm="layernorm", position="learned",
                 mlp="gelu", bias=True, tie_embeddings=True),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, norm="layernorm",
                      position="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "gpt2-350m": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024, norm="layernorm",
                      position="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "gpt2-774m": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024, norm="layernorm",
                      position="learned", mlp="gelu", bias=True, tie_embeddings=True),
    "gpt2-1.5b": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024, norm="layernorm",
                      position="learned", mlp="gelu", bias=True, tie_embeddings=True),
    # Llama-2 7B: RMSNorm, RoPE, SwiGLU, no biases, untied output layer, 4k context.
    "llama-7b": dict(n_layer=32, n_head=32, n_embd=4096, block_size=4096, norm="rmsnorm", position="rope",
                     mlp="swiglu", bias=False, tie_embeddings=False),
}


class ModelConfig(Section):
    """GPT shape. ``vocab_size`` 0 means: take it from the trained tokenizer."""

    preset: Literal["tiny", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b", "llama-7b"] | None = Field(
        None,
        description="Named shape filling n_layer, n_head, n_embd, block_size, norm, position, mlp, bias and "
        "tie_embeddings; fields set explicitly win over the preset.",
    )
    n_layer: int = Field(12, ge=1, description="Transformer blocks.")
    n_head: int = Field(12, ge=1, description="Attention heads per block; must divide n_embd.")
    n_embd: int = Field(768, ge=8, description="Width of the residual stream.")
    block_size: int = Field(1024, ge=8, description="Context length in tokens.")
    vocab_size: int = Field(0, ge=0, description="0 = the tokenizer's vocabulary size.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on attention, residual and embeddings (0 for pretraining).")
    bias: bool = Field(True, description="Biases in linear layers and norms (GPT-2 style).")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalisation layer (GPT-2 or Llama style).")
    position: Literal["learned", "rope"] = Field("learned", description="Learned position embeddings or rotary (RoPE).")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="Feed-forward block: GELU (GPT-2) or SwiGLU (Llama).")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the output layer.")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency (position: rope).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            shape = MODEL_PRESETS.get(data["preset"])
            if shape is not None:  # an unknown name is left for the Literal check to report
                data = {**shape, **data}
        return data

    @model_validator(mode="after")
    def _heads_divide_width(self) -> "ModelConfig":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self


class ZeroConfig(Section):
    """DeepSpeed ZeRO partitioning and CPU offload."""

    stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    keep_stage_on_one_rank: bool = Field(
        False,
        description="ZeRO on one rank has nothing to partition, so such a run (without offload) uses "
        "ZeRO-0 in fp32 and ZeRO-1 in bf16/fp16, skipping ZeRO's per-step copies and partitioning work; "
        "true keeps the configured stage.",
    )
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU (stage >= 1).")
    offload_param: bool = Field(False, description="ZeRO-3 parameter offload to CPU (stage 3).")

    @model_validator(mode="after")
    def _offload_needs_stage(self) -> "ZeroConfig":
        if self.offload_param and self.stage != 3:
            raise ValueError("train.zero.offload_param needs train.zero.stage: 3")
        if self.offload_optimizer and self.stage == 0:
            raise ValueError("train.zero.offload_optimizer needs train.zero.stage >= 1")
        return self


class OptimizerConfig(Section):
    """AdamW and gradient clipping."""

    lr: float = Field(6e-4, gt=0, description="Peak learning rate, reached at the end of warmup.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay of weight matrices (not norms, biases or embeddings).")
    beta1: float = Field(0.9, gt=0, lt=1, description="AdamW first-moment decay.")
    beta2: float = Field(0.95, gt=0, lt=1, description="AdamW second-moment decay.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0 disables clipping.")


class ScheduleConfig(Section):
    """Learning-rate schedule over train.max_steps."""

    kind: Literal["cosine", "constant", "wsd"] = Field(
        "cosine",
        description="After warmup: cosine to min_lr, constant, or wsd (warmup-stable-decay: lr until the "
        "last decay_fraction of the steps, then down to min_lr).",
    )
    warmup_steps: int = Field(100, ge=0, description="Steps of linear warmup from 0 to train.optimizer.lr.")
    min_lr: float = Field(6e-5, ge=0, description="Learning rate at the end of the cosine or wsd decay.")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of max_steps spent decaying.")
    wsd_decay: Literal["linear", "1-sqrt"] = Field(
        "linear", description="wsd: shape of the final decay (1-sqrt after Hagele et al. 2024)."
    )


class CheckpointConfig(Section):
    """When checkpoints are saved and how many are kept."""

    every: int = Field(500, ge=1, description="Save a checkpoint every N steps (and at the end).")
    keep_last: int = Field(3, ge=1, description="Checkpoints kept on disk; older ones are deleted after a save.")


class ValidationConfig(Section):
    """Periodic validation loss during training (the eval stage scores the final model)."""

    every: int = Field(250, ge=1, description="Validation loss every N steps.")
    batches: int = Field(20, ge=1, description="Micro-batches per periodic validation.")


class RecoveryConfig(Section):
    """What a non-finite loss, a loss spike or a failed rank does."""

    nonfinite_loss: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN/inf loss on any rank: stop every rank without saving (the last good checkpoint "
        "stays latest), or skip that micro-batch on every rank and draw the next one.",
    )
    max_skipped_batches: int = Field(
        10, ge=0, description="skip: stop like `stop` once more micro-batches than this were skipped."
    )
    spike_policy: Literal["off", "rollback"] = Field(
        "off",
        description="rollback: on a loss spike or a NaN/inf loss or gradients (replacing nonfinite_loss), every "
        "rank reloads the last checkpoint, skips the global samples drawn since it, and goes on.",
    )
    spike_window: int = Field(50, ge=2, description="A spike is judged against the last this many finite step losses.")
    spike_k: float = Field(
        6.0, gt=0, description="A step loss above the window's mean + spike_k standard deviations is a spike."
    )
    max_rollbacks: int = Field(
        3, ge=0, description="rollback: after this many rollbacks the next bad step stops like nonfinite_loss: stop."
    )
    rollback_lr_factor: float = Field(
        1.0, gt=0, le=1, description="rollback: the LR is multiplied by this for rollback_lr_steps steps after each one."
    )
    rollback_lr_steps: int = Field(0, ge=0, description="rollback: how many steps after a rollback run at the lowered LR.")
    max_restarts: int = Field(
        0, ge=0, description="torchrun / deepspeed launcher: restart a failed rank group this many times, "
        "resuming from the latest checkpoint (launcher ray: launch.ray_max_failures)."
    )


class LaunchConfig(Section):
    """How and where the training ranks are started."""

    launcher: Literal["torchrun", "deepspeed", "ray"] = Field(
        "torchrun",
        description="How ranks are started: torchrun or the deepspeed launcher (one command per node), "
        "or ray: a Ray Train TorchTrainer of nnodes x nproc_per_node workers on the Ray cluster "
        "(runtime.ray_address; empty = a local Ray), restarted from the last checkpoint on failure.",
    )
    nproc_per_node: int = Field(1, ge=1, description="Training processes per node (GPUs, or CPU ranks).")
    nnodes: int = Field(1, ge=1, description="Nodes in the run; world size is nnodes x nproc_per_node.")
    node_rank: int = Field(0, ge=0, description="This node's index (multi-node; 0 writes the stage records).")
    master_addr: str = Field("127.0.0.1", description="Address of node 0 (multi-node rendezvous).")
    master_port: int = Field(29500, ge=1, le=65535, description="Rendezvous port on node 0.")
    hostfile: str | None = Field(
        None, description="DeepSpeed hostfile (`host slots=N` lines); without no_ssh, pdsh starts every node."
    )
    no_ssh: bool = Field(False, description="DeepSpeed launcher: one command per node (Kubernetes/Slurm), no pdsh.")
    ray_max_failures: int = Field(
        3, ge=-1, description="launcher ray: worker-group restarts (from the last checkpoint) before the run "
        "fails; -1 = unlimited (Ray Train FailureConfig.max_failures).",
    )

    @model_validator(mode="after")
    def _check_nodes(self) -> "LaunchConfig":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.launch.node_rank={self.node_rank} must be < train.launch.nnodes={self.nnodes}")
        if self.launcher == "ray" and self.node_rank:
            # Ray Train places every worker from one driver; there is no per-node command.
            raise ValueError("train.launch.launcher=ray starts all nodes from one command: leave node_rank at 0")
        return self


class PlanConfig(Section):
    """The pre-launch plan: memory check and time estimate."""

    device_memory_gb: float = Field(
        0.0, ge=0, description="Per-device memory for the pre-launch plan; a run that needs more is refused. 0 = no check."
    )
    peak_tflops: float = Field(
        0.0, ge=0, description="Per-device peak dense TFLOP/s for MFU. 0 = by GPU name (A100/H100/H200 bf16 dense); the plan's ETA uses train.accelerator's when set."
    )
    planned_mfu: float = Field(0.4, gt=0, le=1, description="MFU assumed by the plan's time estimate.")


# Flat TrainConfig keys of earlier versions -> where they live now.
MOVED_TRAIN_KEYS: dict[str, str] = {
    "zero_stage": "train.zero.stage",
    "keep_zero_stage_on_one_rank": "train.zero.keep_stage_on_one_rank",
    "offload_optimizer": "train.zero.offload_optimizer",
    "offload_param": "train.zero.offload_param",
    **{name: f"train.optimizer.{name}" for name in ("lr", "weight_decay", "beta1", "beta2", "grad_clip")},
    **{name: f"train.schedule.{name}" for name in ("min_lr", "warmup_steps", "decay_fraction", "wsd_decay")},
    "lr_schedule": "train.schedule.kind",
    "checkpoint_every": "train.checkpoint.every",
    "keep_last_checkpoints": "train.checkpoint.keep_last",
    "eval_every": "train.validation.every",
    "eval_batches": "train.validation.batches",
    "nonfinite_loss": "train.recovery.nonfinite_loss",
    "max_skipped_batches": "train.recovery.max_skipped_batches",
    **{name: f"train.launch.{name}" for name in LaunchConfig.model_fields},
    **{name: f"train.plan.{name}" for name in PlanConfig.model_fields},
}


class TrainConfig(Section):
    """DeepSpeed training. The DeepSpeed JSON is generated from these fields."""

    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Training precision.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per rank per micro-step.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps.")
    activation_checkpointing: bool = Field(
        False, description="Recompute each block's activations in backward (torch.utils.checkpoint)."
    )
    compile: bool = Field(False, description="torch.compile the model (DeepSpeed engine.compile, inductor).")
    log_every: int = Field(10, ge=1, description="Log training loss and throughput every N steps.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    accelerator: Literal["none", "h100", "a100", "h200"] = Field(
        "none", description="The GPU the plan's ETA is for (its datasheet bf16 dense peak at train.plan.planned_mfu), "
        "also when planned elsewhere; none = this machine's GPU, if any."
    )
    seed: int = Field(1337, description="Seed of model initialisation and the training data order.")
    resume: Literal["auto", "never"] = Field("auto", description="auto = continue from the latest checkpoint.")
    data_mixture: dict[str, float] = Field(
        default_factory=dict,
        description="Named datasets mixed by weight: run name under runs_root -> weight (its shards/ must share "
        "this run's tokenizer). Empty = this run's shards only.",
    )
    zero: ZeroConfig = Field(default_factory=ZeroConfig, description="DeepSpeed ZeRO stage and offload.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="AdamW and clipping.")
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Learning-rate schedule.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoint cadence.")
    validation: ValidationConfig = Field(default_factory=ValidationConfig, description="Periodic validation loss.")
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig, description="Non-finite loss policy.")
    launch: LaunchConfig = Field(default_factory=LaunchConfig, description="Rank topology and launcher.")
    plan: PlanConfig = Field(default_factory=PlanConfig, description="Pre-launch memory and time plan.")

    def tokens_per_step(self, block_size: int, world_size: int | None = None) -> int:
        """Tokens in one optimizer step: micro batch x accumulation x ranks x context."""
        world = world_size or self.launch.nproc_per_node * self.launch.nnodes
        return self.micro_batch_size * self.grad_accum_steps * world * block_size

    @model_validator(mode="before")
    @classmethod
    def _refuse_flat_keys(cls, data: Any) -> Any:
        return refuse_moved_keys("train", data, MOVED_TRAIN_KEYS)

    @model_validator(mode="after")
    def _check_train(self) -> "TrainConfig":
        for name in self.data_mixture:
            # Names become paths under runs_root: a plain run name can never point elsewhere.
            if not RUN_NAME_RE.fullmatch(name) or ".." in name:
                raise ValueError(f"train.data_mixture: {name!r} is not a plain run name (no '/', no '..')")
        schedule = self.schedule
        decay_steps = round(schedule.decay_fraction * self.max_steps)
        if schedule.kind == "wsd" and schedule.warmup_steps + decay_steps > self.max_steps:
            raise ValueError(
                f"train.schedule.kind=wsd: warmup_steps ({schedule.warmup_steps}) + decay "
                f"({decay_steps} steps) exceed max_steps ({self.max_steps})"
            )
        return self


class EvalConfig(Section):
    """Held-out evaluation and samples."""

    max_tokens: int = Field(
        1_000_000, ge=1, description="Validation tokens scored (the same every time, for comparability)."
    )
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward pass while scoring.")
    prompts: list[str] = Field(
        default_factory=lambda: ["The ", "In this module, "], description="Prompts the samples continue."
    )
    max_new_tokens: int = Field(48, ge=1, description="Tokens generated per sample.")
    temperature: float = Field(0.8, ge=0, description="0 = greedy.")
    top_k: int = Field(50, ge=0, description="0 = no top-k cut.")
    seed: int = Field(7, description="Seed of sampling (prompt i uses seed + i).")
    wandb: bool = Field(True, description="Log the results to the training run's W&B run (tracking.wandb_mode).")
    lm_eval_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks run on the checkpoint (none: skipped)."
    )
    lm_eval_include_path: str | None = Field(
        None, description="Directory of local lm-eval task YAMLs (and their data); its files are part of the stage's hash."
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="At most this many documents per lm-eval task.")
    heldout_inputs: list[str] = Field(
        default_factory=list,
        description="Held-out documents (.jsonl, .jsonl.gz, .txt; data.text_field) scored whole in bits per UTF-8 byte: "
        "the same bytes for any tokenizer, so runs with different data or tokenizers compare. Empty: skipped.",
    )


class ExportConfig(Section):
    """Exports of the last checkpoint: always a Hugging Face folder (GPT-2 or Llama family), which
    the ONNX graph is traced from and lm-eval reads, optionally ONNX and GGUF."""

    max_shard_size: str = Field("2GB", description="Largest safetensors shard (transformers size string).")
    onnx: bool = Field(False, description="Also export ONNX and check it with onnxruntime.")
    onnx_opset: int = Field(18, ge=14, le=23, description="ONNX opset of the exported graph.")
    gguf: bool = Field(
        False, description="Also write export/gguf/model.gguf (llama.cpp; Llama family without biases only)."
    )
    gguf_dtype: Literal["f32", "f16"] = Field(
        "f32", description="GGUF matrix precision (norms stay f32); checked against our logits either way."
    )


class TrackingConfig(Section):
    """Weights & Biases logging of training and evaluation."""

    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="online needs WANDB_API_KEY in the environment, never in the config."
    )
    project: str = Field("pretrain-pipeline", description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; empty = the API key's default.")
    tags: list[str] = Field(default_factory=list, description="W&B run tags.")
    group: str | None = Field(None, description="W&B run group (an ablation puts all its runs in one); empty = none.")


class RuntimeConfig(Section):
    """Where runs live and which Ray runs the data stages."""

    run_name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name of runs/<run_name>/.")
    runs_root: str = Field("runs", description="Folder holding run directories.")
    ray_address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or host:6379); empty = start a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (empty = all).")
    seed: int = Field(0, description="Seed of the sample corpus (data.sample_corpus).")

    def run_dir(self) -> Path:
        return Path(self.runs_root) / self.run_name


# Where a recipe may change the base config: the data it trains on, never the proxy or the evaluation.
RECIPE_FIELDS = ("data.", "tokenizer.", "train.data_mixture")


class ProxyConfig(Section):
    """The proxy model every recipe trains: one shape and one token budget, so only the data differs."""

    preset: Literal["tiny", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b", "llama-7b"] | None = Field(
        None, description="model.preset of every proxy (the base config's other model fields are dropped); empty: the base model section."
    )
    train_tokens: int = Field(
        0, ge=0, description="Training tokens per proxy; train.max_steps becomes tokens / tokens per step. 0: the base train.max_steps."
    )


class HeldoutConfig(Section):
    """The held-out text every proxy is scored on in bits per byte (eval.heldout_inputs of each run)."""

    inputs: list[str] = Field(
        default_factory=list,
        description="Held-out documents (.jsonl, .jsonl.gz, .txt; data.text_field), given once for the whole ablation.",
    )
    sample_corpus_docs: int = Field(
        200, ge=1, description="Without inputs and with data.sample_corpus: this many stdlib docstring documents outside every recipe's sample."
    )


class AblationConfig(Section):
    """Data-recipe ablation (`pretrain-pipeline ablate`): each recipe is the pipeline on the base config with a
    few data, tokenizer or mixture fields changed, a fixed proxy model and a fixed evaluation."""

    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Ablation name: runs go to <runs_root>/<name>/<recipe>/; empty = runtime.run_name."
    )
    recipes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Recipe name -> {dotted field: value} over the base config, fields under data., tokenizer. or "
        "train.data_mixture (mixture names are recipes of this ablation); {} is the base itself. The first recipe is the reference: "
        "its tokenizer is shared by every recipe that leaves tokenizer.* alone.",
    )
    proxy: ProxyConfig = Field(default_factory=ProxyConfig, description="The proxy model every recipe trains.")
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig, description="The held-out text scored in bits per byte.")
    lm_eval_tasks: list[str] | None = Field(
        None, description="lm-eval tasks every proxy is scored on (eval.lm_eval_include_path and limit apply); empty: eval.lm_eval_tasks."
    )
    seeds: int = Field(1, ge=1, le=16, description="Proxies per recipe, with train.seed, +1, +2, ...: the spread tells a real difference from noise.")
    parallel: int = Field(1, ge=1, description="Recipes whose stages run at the same time (data stages share one Ray; each training its own ranks).")

    @model_validator(mode="after")
    def _check_recipes(self) -> "AblationConfig":
        for recipe, overrides in self.recipes.items():
            if not RUN_NAME_RE.fullmatch(recipe) or ".." in recipe or ".seed" in recipe:
                raise ValueError(f"ablation.recipes: {recipe!r} is not a plain run name (no '/', '..' or '.seed')")
            for key in overrides:
                if not any(key.startswith(f) if f.endswith(".") else key == f for f in RECIPE_FIELDS):
                    raise ValueError(
                        f"ablation.recipes.{recipe}: {key!r} is not a recipe field; a recipe changes data.*, tokenizer.* or "
                        "train.data_mixture only (the proxy and the evaluation stay the same for every recipe)"
                    )
        return self


class PipelineConfig(Section):
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    ablation: AblationConfig = Field(
        default_factory=AblationConfig, description="Data-recipe ablation; used by `pretrain-pipeline ablate` only."
    )

    @model_validator(mode="after")
    def _consistent(self) -> "PipelineConfig":
        if not self.data.sample_corpus and not self.data.inputs:
            raise ValueError("data.inputs is empty and data.sample_corpus is false: nothing to read")
        if self.model.vocab_size and self.model.vocab_size < self.tokenizer.vocab_size:
            raise ValueError("model.vocab_size is smaller than tokenizer.vocab_size")
        return self

    def run_dir(self) -> Path:
        return self.runtime.run_dir()


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file and the field."""


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=20", "data.inputs=[a.jsonl]"]`` -> nested dict; values are parsed as YAML."""
    tree: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return tree


def merge_tree(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section (a nested key replaces only itself)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_tree(out[key], value)
        else:
            out[key] = value
    return out


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "<root>"
        # A check over a whole section names its fields itself; echoing the section would bury it.
        got = "" if isinstance(e.get("input"), dict) else f" (got {e.get('input')!r})"
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "<dict>") -> PipelineConfig:
    merged = merge_tree(raw or {}, parse_overrides(overrides or []))
    try:
        return PipelineConfig.model_validate(merged)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> PipelineConfig:
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    return build_config(raw, overrides, source)


def dump_config(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
