"""Training: model wrapping (DDP), optimizer, the train step, checkpoints."""
