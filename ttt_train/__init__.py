"""ttt-train: continual pretraining of LLMs with In-Place Test-Time Training on megatron-core."""

__version__ = "0.1.0"

from ttt_train.runtime import quiet as _quiet  # noqa: E402,F401  (expected-warning filters)
