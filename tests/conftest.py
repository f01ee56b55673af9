"""Shared pytest set-up: offline wandb and HF, quiet tokenizers, and trust_remote_code modules kept out
of the user's ~/.cache (a per-session temporary folder)."""

import os
import tempfile

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="ttt-train-hf-modules-"))
