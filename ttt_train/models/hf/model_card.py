"""The README.md of an exported HF folder: what it is, how to load it, and which keys only ttt-train reads.

`model_card(...)` returns the text; the exporter writes it beside `config.json`. For In-Place TTT
models it states the official release's keys and ttt-train's own (`ttt_conv_size`,
`ttt_max_update_norm`), and says so plainly when their values differ from what the official code
assumes (conv 5, no clip): that code would then compute another model.
"""

from __future__ import annotations

import json

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig
from ttt_train.models.hf.hf_config import (
    TTT_ONLY_OURS,
    legacy_rope_keys,
    official_differences,
    ttt_config_keys,
)

OFFICIAL_KEYS = ("ttt_mode", "ttt_layers", "ttt_lr", "ttt_chunk", "ttt_proj", "ttt_target")


def _rope_line(model: ModelConfig) -> str:
    rope = legacy_rope_keys(model)
    scaling = rope["rope_scaling"]
    if scaling is None:
        return f"rotary base {rope['rope_theta']!r}, plain RoPE"
    fields = ", ".join(f"{k} {v}" for k, v in scaling.items() if k != "rope_type")
    return f"rotary base {rope['rope_theta']!r}, {scaling['rope_type']} scaling ({fields})"


def official_mismatch_note(ttt: TTTConfig) -> str | None:
    """One sentence naming the ttt-train-only keys whose values the official code does not assume (None: none)."""
    diffs = official_differences(ttt)
    if not diffs:
        return None
    said = ", ".join(f"`{k}` = {ours} (the official code assumes {'no clip' if theirs is None else theirs})"
                     for k, (ours, theirs) in diffs.items())
    return (f"This model was trained with {said}. Only ttt-train's modeling code (shipped here) reads these "
            "keys: the official In-Place TTT release's code ignores them and so computes a different model "
            "from these weights.")


def model_card(model: ModelConfig, ttt: TTTConfig | None, *, family: str, source: str, dtype: str,
               max_position_embeddings: int) -> str:
    """Markdown text of the export's README.md."""
    base = {"qwen3": "Qwen3", "llama": "Llama"}[family]
    lines = [f"# {model.name}: {'In-Place TTT ' if ttt is not None else ''}{base} exported by ttt-train", "",
             f"Exported from the ttt-train checkpoint `{source}` ({dtype} safetensors; {model.num_layers} layers, "
             f"hidden size {model.hidden_size}; {_rope_line(model)}; trained context "
             f"{max_position_embeddings} tokens).", ""]
    if ttt is None:
        lines += ["A plain transformers model (`" + base + "ForCausalLM`):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(DIR)", "tokenizer = AutoTokenizer.from_pretrained(DIR)",
                  "```", ""]
    else:
        layers = ttt.layer_indices(model.num_layers)
        lines += [f"In-Place TTT runs in the MLPs of layers {layers} (chunk {ttt.chunk_size}, inner lr {ttt.lr:g}, "
                  f"target `{ttt.target}`{', target projection' if ttt.use_proj else ''}). Its modeling code is "
                  "in this folder (`modeling_inplace_ttt.py`, torch and transformers only):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)",
                  "tokenizer = AutoTokenizer.from_pretrained(DIR)   # no remote code needed", "```", "",
                  f"`trust_remote_code=True` is required for the model: `config.json` keeps the base `model_type` "
                  f"(`{family}`, as the official release writes it), so without it transformers builds a plain "
                  f"`{base}ForCausalLM`, reports the `mlp.ttt_conv` / `mlp.ttt_proj` tensors as unused and runs "
                  "**without** In-Place TTT. Generation (`model.generate`) carries the fast weights in its cache.", "",
                  "## In-Place TTT keys of config.json", "", "| key | value | read by |", "|---|---|---|"]
        values = ttt_config_keys(ttt, model.num_layers)
        for key in OFFICIAL_KEYS:
            lines.append(f"| `{key}` | `{json.dumps(values[key])}` | the official release and ttt-train |")
        for key, theirs in TTT_ONLY_OURS.items():
            assumed = "no clip" if theirs is None else theirs
            lines.append(f"| `{key}` | `{json.dumps(values[key])}` | ttt-train only (the official code assumes {assumed}) |")
        lines.append("")
        note = official_mismatch_note(ttt)
        if note:
            lines += [f"**{note}**", ""]
    lines += ["## transformers versions", "",
              "Reads identically on transformers 4.57 and 5.x: `config.json` holds the rotary settings both as "
              "transformers 5's `rope_parameters` and as the top-level `rope_theta` / `rope_scaling` that 4.x "
              "reads (the official release pins 4.57.3)" + (", and the modeling code runs on both" if ttt else "")
              + ".", ""]
    return "\n".join(lines)
