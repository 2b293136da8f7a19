"""A tiny run directory in the exact layout data_prep produces (tokenizer + shards + manifest).

Used by the tests and bench/train to try the training stack without running data prep. The text is
drawn from a small seeded grammar, so it is learnable and the loss visibly falls within steps.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from pretrain_pipeline.artifacts import atomic_write_json, sha256_file

SUBJECTS = ["the cat", "a dog", "the model", "my friend", "the teacher", "a bird", "the river"]
VERBS = ["sees", "likes", "finds", "follows", "reads", "builds", "carries"]
OBJECTS = ["the ball", "a red book", "the old house", "some water", "the green tree", "a small boat"]
ENDINGS = ["today.", "again.", "in the morning.", "near the hill.", "with care.", "every day."]


def synthetic_documents(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = [
            f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}"
            for _ in range(rng.randint(2, 6))
        ]
        docs.append(" ".join(sentences))
    return docs


def train_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 320) -> Path:
    """SentencePiece BPE with the pipeline's special ids (unk=0, bos=1, eos=2, pad=3)."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(out_dir / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    return out_dir / "tokenizer.model"


def write_shard(path: Path, docs_ids: list[list[int]], docs_bytes: list[int], dtype: str) -> None:
    import pyarrow as pa

    values = pa.array(np.concatenate([np.asarray(d, dtype=dtype) for d in docs_ids]))
    offsets = pa.array(np.cumsum([0] + [len(d) for d in docs_ids]).astype(np.int32))
    table = pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(offsets, values),
            "n_bytes": pa.array(docs_bytes, type=pa.int64()),
        }
    )
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)


def make_synthetic_run(
    run_dir: str | Path,
    n_train_docs: int = 600,
    n_val_docs: int = 80,
    vocab_size: int = 320,
    train_shards: int = 2,
    seed: int = 0,
) -> Path:
    """Write ``run_dir/tokenizer/tokenizer.model`` and ``run_dir/shards/*``; return the manifest path."""
    import sentencepiece as spm

    run_dir = Path(run_dir)
    docs = synthetic_documents(n_train_docs + n_val_docs, seed)
    tok_path = train_tokenizer(run_dir / "tokenizer", docs, vocab_size)
    sp = spm.SentencePieceProcessor(model_file=str(tok_path))
    eos = sp.eos_id()
    shards_dir = run_dir / "shards"
    shards_dir.mkdir(parents=True, exist_ok=True)
    dtype = "uint16" if vocab_size <= 65535 else "uint32"
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    groups = [("train", docs[:n_train_docs], train_shards), ("val", docs[n_train_docs:], 1)]
    for split, split_docs, n_shards in groups:
        for s, part in enumerate(np.array_split(np.arange(len(split_docs)), n_shards)):
            texts = [split_docs[i] for i in part]
            ids = [sp.encode(t) + [eos] for t in texts]
            nbytes = [len(t.encode("utf-8")) for t in texts]
            name = f"{split}-{s:05d}.arrow"
            write_shard(shards_dir / name, ids, nbytes, dtype)
            splits[split].append(
                {
                    "file": name,
                    "tokens": int(sum(map(len, ids))),
                    "documents": len(ids),
                    "bytes": (shards_dir / name).stat().st_size,
                    "text_bytes": int(sum(nbytes)),
                    "sha256": sha256_file(shards_dir / name),
                }
            )
    manifest = {
        "format": "arrow-ipc-stream",
        "token_column": "input_ids",
        "dtype": dtype,
        "vocab_size": sp.get_piece_size(),
        "eos_id": eos,
        "bos_id": sp.bos_id(),
        "pad_id": sp.pad_id(),
        "tokenizer_sha256": sha256_file(tok_path),
        "tokenizer_path": "tokenizer/tokenizer.model",
        "splits": splits,
    }
    atomic_write_json(shards_dir / "manifest.json", manifest)
    return shards_dir / "manifest.json"


def synthetic_run_config(root: Path, train: dict, wandb_mode: str = "disabled"):
    """The config of the synthetic run at ``root`` (its tokenizer has 320 pieces): a 2-layer,
    64-wide GPT on 32-token windows, with ``train`` as the train section."""
    from pretrain_pipeline.config import build_config

    return build_config({
        "data": {"sample_corpus": True},
        "tokenizer": {"vocab_size": 320},
        "model": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32},
        "train": train,
        "tracking": {"wandb_mode": wandb_mode},
        "runtime": {"run_name": root.name, "runs_root": str(root.parent)},
    })
