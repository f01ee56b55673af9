"""Silence megatron-core's import-time notices about missing GPU extras (expected on a CPU).

Importing this module installs the filters and then imports the megatron modules that every
rank needs, so that a forkserver that preloads it hands warm, quiet processes to its children.
"""

import warnings

warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed")
warnings.filterwarnings("ignore", message=r".*full scope is deprecated")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\.checkpoint")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.core\.dist_checkpointing")

try:
    import megatron.core.models.gpt.gpt_model  # noqa: F401,E402
    import megatron.core.optimizer  # noqa: F401,E402
    import megatron.core.pipeline_parallel  # noqa: F401,E402
except ImportError:  # ops-only use without megatron
    pass
