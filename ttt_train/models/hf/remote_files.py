"""Put the In-Place TTT modeling code into an exported HF directory and point ``auto_map`` at it.

``write_remote_code(out_dir, config)`` copies ``configuration_inplace_ttt.py`` and
``modeling_inplace_ttt.py`` (from :mod:`ttt_train.models.hf.remote_code`) into ``out_dir`` (atomically)
and sets ``auto_map`` and ``architectures`` on ``config`` (an ``InPlaceTTT*Config``), then writes
``out_dir/config.json``. ``AutoModelForCausalLM.from_pretrained(out_dir,
trust_remote_code=True)`` then loads ``InPlaceTTTQwen3ForCausalLM`` / ``InPlaceTTTLlamaForCausalLM``;
without ``trust_remote_code`` transformers refuses the unknown ``model_type``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
REMOTE_FILES = ("configuration_inplace_ttt.py", "modeling_inplace_ttt.py")
CLASSES = {  # model_type -> (config class, causal LM class)
    "inplace_ttt_qwen3": ("InPlaceTTTQwen3Config", "InPlaceTTTQwen3ForCausalLM"),
    "inplace_ttt_llama": ("InPlaceTTTLlamaConfig", "InPlaceTTTLlamaForCausalLM"),
}


def auto_map(model_type: str) -> dict[str, str]:
    """The ``auto_map`` of ``config.json`` for ``model_type`` (``inplace_ttt_qwen3`` or ``inplace_ttt_llama``)."""
    if model_type not in CLASSES:
        raise ValueError(f"model_type {model_type!r} has no In-Place TTT modeling code; expected one of {sorted(CLASSES)}")
    cfg_cls, lm_cls = CLASSES[model_type]
    return {"AutoConfig": f"configuration_inplace_ttt.{cfg_cls}",
            "AutoModelForCausalLM": f"modeling_inplace_ttt.{lm_cls}"}


def _atomic_write(path: Path, fill) -> None:
    """Write ``path`` through a temporary file in its folder (``fill(tmp_path)``) and an atomic rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_remote_code(out_dir, config):
    """Copy the modeling files into ``out_dir``, set ``auto_map`` and ``architectures`` on ``config``
    (an ``InPlaceTTTQwen3Config`` / ``InPlaceTTTLlamaConfig``), write ``config.json``; return ``config``."""
    amap = auto_map(getattr(config, "model_type", None))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_FILES:
        _atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(REMOTE_CODE_DIR / name, tmp))
    config.auto_map, config.architectures = amap, [CLASSES[config.model_type][1]]
    text = config.to_json_string(use_diff=True)
    _atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    return config
