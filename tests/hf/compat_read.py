"""Read exported HF folders as a user of another transformers version does (run by that version's python).

    python tests/hf/compat_read.py SPEC.json RESULT.pt

Imports only torch and transformers (never ttt_train): SPEC lists `{"name", "dir", "remote"}` folders
and the `prompts` (token id lists). For each folder, with stdin closed (a trust-remote-code prompt
would fail, and its text shows in stdout), it loads the tokenizer and the config without remote code,
the base config class as the official release's code does, and the causal LM (with
`trust_remote_code=True` for a TTT folder); RESULT holds the transformers version, the rotary settings
each config sees, the model class, the float32 logits of every prompt and the warnings logged.
"""

from __future__ import annotations

import json
import logging
import sys

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen3Config

BASE_CONFIGS = {"qwen3": Qwen3Config, "llama": LlamaConfig}


class Captured(logging.Handler):
    """Every record logged under the `transformers` logger."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def rope_view(config) -> dict:
    """The rotary settings as this transformers version's config object holds them."""
    params = getattr(config, "rope_parameters", None)
    return {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None),
            "rope_parameters": dict(params) if isinstance(params, dict) else params}


def read(folder: str, remote: bool, prompts: list[list[int]], log: Captured) -> dict:
    out: dict = {}
    start = len(log.messages)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out["tokenizer_class"] = type(tokenizer).__name__
    out["tokenizer_ids"] = tokenizer("abc", add_special_tokens=False)["input_ids"]
    plain = AutoConfig.from_pretrained(folder)
    out["auto_config"] = dict(rope_view(plain), cls=type(plain).__name__)
    official = BASE_CONFIGS[plain.model_type].from_pretrained(folder)  # the official release's way
    out["official_config"] = dict(rope_view(official), ttt={k: v for k, v in official.to_dict().items()
                                                            if k.startswith("ttt_")})
    out["config_log"] = log.messages[start:]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32).eval()
    out["model_class"] = type(model).__name__
    out["model_config"] = rope_view(model.config)
    with torch.no_grad():
        out["logits"] = [model(input_ids=torch.tensor([p])).logits[0].float() for p in prompts]
    out["log"] = log.messages[start:]
    return out


def main(spec_path: str, result_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    log = Captured()
    logging.getLogger("transformers").addHandler(log)
    transformers.logging.set_verbosity_warning()
    results = {"transformers": transformers.__version__}
    for entry in spec["folders"]:
        results[entry["name"]] = read(entry["dir"], entry["remote"], spec["prompts"], log)
    torch.save(results, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
