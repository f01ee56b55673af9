"""Shared pytest set-up: quiet megatron's CPU warnings, offline wandb, one-process distributed fixture."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
