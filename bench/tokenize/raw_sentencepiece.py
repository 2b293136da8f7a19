"""The baseline of ``bench/tokenize/run.py``: what a user writes with SentencePiece alone.

    python bench/tokenize/raw_sentencepiece.py CLEAN_DIR OUT_DIR CORES SETTINGS_JSON

Reads the text of the clean Parquet parts, writes it to one text file (SentencePiece trains on
lines), trains with the given settings (the same ``trainer_settings`` the stage uses, so the same
vocabulary size, sample size and byte fallback) on ``CORES`` threads, then encodes every document
with ``encode(texts, num_threads=CORES)``. Prints one JSON line: phase times and token count.
Imports only pyarrow and sentencepiece, as such a script would.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import sentencepiece as spm


def main() -> None:
    clean, out, cores, settings = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    t0 = time.perf_counter()
    texts: list[str] = []
    for part in sorted(clean.glob("part-*.parquet")):
        texts += pq.read_table(part, columns=["text"]).column("text").to_pylist()
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(text + "\n")
    t1 = time.perf_counter()
    spm.set_random_generator_seed(settings.pop("seed"))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "raw"), num_threads=cores, minloglevel=2,
        **{k: v for k, v in settings.items() if v != []},
    )
    t2 = time.perf_counter()
    sp = spm.SentencePieceProcessor(model_file=str(out / "raw.model"))
    ids = sp.encode(texts, num_threads=cores)
    t3 = time.perf_counter()
    print(json.dumps({"read_write_s": t1 - t0, "train_s": t2 - t1, "encode_s": t3 - t2,
                      "tokens": sum(map(len, ids)), "documents": len(texts)}))


if __name__ == "__main__":
    main()
