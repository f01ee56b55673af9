"""ttt-train: continual pretraining of LLMs with In-Place Test-Time Training on megatron-core."""

__version__ = "0.1.0"
