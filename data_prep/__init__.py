"""Raw corpus -> clean Parquet -> SentencePiece tokenizer -> Arrow token shards.

Stages (each ``(cfg: PipelineConfig, paths: RunPaths, force=False) -> result`` and skipped when its
``_SUCCESS.json`` fingerprint is current): ``data_prep.clean.clean_corpus``,
``data_prep.tokenizer.train_tokenizer``, ``data_prep.shards.write_shards``. Only
``data_prep.ray_runtime`` talks to Ray: it starts or joins it and runs the stages' units of work on it
(``ray_runner``; ``LocalRunner`` runs them in process). Shards are read with
``data_prep.shards.read_shard_tokens``.
Importing this package does not import Ray.
"""
