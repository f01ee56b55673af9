"""Silence notices that are expected in this project's set-up (imported by `ttt_train/__init__.py`).

megatron-core 0.16.1 warns at import time that transformer-engine / Apex are absent (always true on
a CPU), and calls torch.distributed functions that torch 2.13 marks deprecated. Nothing else is
filtered. Importing this module imports no megatron code.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.\w+` is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")
