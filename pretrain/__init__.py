"""GPT pretraining: model, data loader, DeepSpeed engine, tracking, launcher, eval and export."""
