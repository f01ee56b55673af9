"""Put the In-Place TTT modeling code into an exported HF directory and point ``auto_map`` at it.

``write_remote_code(out_dir, config)`` copies ``configuration_inplace_ttt.py`` and
``modeling_inplace_ttt.py`` (from :mod:`ttt_train.models.hf.remote_code`) into ``out_dir`` (atomically)
and sets ``auto_map`` and ``architectures`` on ``config`` (an ``InPlaceTTT*Config``), then writes
``out_dir/config.json``. ``AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)`` then
loads ``InPlaceTTTQwen3ForCausalLM`` / ``InPlaceTTTLlamaForCausalLM``. The ``model_type`` stays the base
model's, so ``AutoTokenizer`` / ``AutoConfig`` need no remote code (see ``configuration_inplace_ttt``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
REMOTE_FILES = ("configuration_inplace_ttt.py", "modeling_inplace_ttt.py")
CLASSES = {  # config class -> causal LM class
    "InPlaceTTTQwen3Config": "InPlaceTTTQwen3ForCausalLM",
    "InPlaceTTTLlamaConfig": "InPlaceTTTLlamaForCausalLM",
}


def auto_map(config) -> dict[str, str]:
    """The ``auto_map`` of ``config.json`` for an ``InPlaceTTTQwen3Config`` / ``InPlaceTTTLlamaConfig``."""
    name = type(config).__name__
    if name not in CLASSES:
        raise ValueError(f"{name} has no In-Place TTT modeling code; expected one of {sorted(CLASSES)}")
    return {"AutoConfig": f"configuration_inplace_ttt.{name}",
            "AutoModelForCausalLM": f"modeling_inplace_ttt.{CLASSES[name]}"}


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


def write_config_json(out_dir, config, extra: dict | None = None) -> Path:
    """Write ``out_dir/config.json`` (atomically): ``config``'s keys, then ``extra``'s over them."""
    values = dict(json.loads(config.to_json_string(use_diff=True)), **(extra or {}))
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    path = Path(out_dir) / "config.json"
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def write_remote_code(out_dir, config, extra: dict | None = None):
    """Copy the modeling files into ``out_dir``, set ``auto_map`` and ``architectures`` on ``config``
    (an ``InPlaceTTTQwen3Config`` / ``InPlaceTTTLlamaConfig``), write ``config.json`` (``extra``: keys
    written over the config's own); return ``config``."""
    amap = auto_map(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_FILES:
        _atomic_write(out / name, lambda tmp, name=name: shutil.copyfile(REMOTE_CODE_DIR / name, tmp))
    config.auto_map, config.architectures = amap, [CLASSES[type(config).__name__]]
    write_config_json(out, config, extra)
    return config
