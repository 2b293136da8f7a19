"""pretrain-pipeline: raw corpus -> clean corpus -> tokenizer + Arrow shards -> GPT -> eval -> export."""

__version__ = "0.1.0"
