"""Export of In-Place TTT models: after the TTT parameters moved away from their initialisation, the
exported folder under `AutoModelForCausalLM(..., trust_remote_code=True)` gives the ttt-train model's
logits (both target sources, with and without clipping, prompts of 5 and 19 tokens for chunk 8:
not multiples of the chunk); without `trust_remote_code` transformers builds the plain base model. Such a
folder rewritten as the official release writes it (base architecture + `ttt_*` keys, a listed layer
the model lacks) imports with its TTT weights in ttt-train's orientation (the logits check says so).
"""

from __future__ import annotations

import json

import torch

from tests.hf.test_convert_import import make_hf_model
from ttt_train.runtime.local_ranks import run_local_ranks

CASES = {"hidden_states": dict(target="hidden_states"), "input_embed": dict(target="input_embed"),
         "hidden_states_clip": dict(target="hidden_states", max_update_norm=0.05),
         "input_embed_clip": dict(target="input_embed", max_update_norm=0.05)}


def _train_like(model, seed: int) -> None:
    """Move every TTT parameter off its initialisation (a full, non-symmetric W_target, so a missing
    transpose shows), as a few optimizer steps would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".ttt_target." in name:
                param.copy_(torch.randn(param.shape, generator=g) * (0.5 if "conv" in name else 0.2))


def _export_ttt_models(hf_dir, root, cases: dict) -> dict:
    """Rank function: for each TTT case import, change the TTT parameters, save, export with verification."""
    from ttt_train.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.models.hf import export_checkpoint, import_hf
    from ttt_train.runtime.distributed import ParallelConfig

    diffs = {}
    for name, values in cases.items():
        ttt = TTTConfig.from_dict(dict(layers=[0, 2], chunk_size=8, lr=1.0, **values))
        ckpt = f"{root}/{name}/ckpt"
        import_hf(hf_dir, ckpt, ttt=ttt, verify=False, progress=False)
        info = read_checkpoint_info(ckpt)
        model_cfg = info["manifest"]["model"]
        from ttt_train.models import ModelConfig

        model_cfg = ModelConfig.from_dict(model_cfg)
        gpt = build_gpt_model(model_cfg, to_transformer_config(model_cfg, ParallelConfig()), ttt=ttt)
        load_checkpoint(ckpt, [gpt])
        _train_like(gpt, seed=len(diffs))
        save_checkpoint(ckpt, 1, [gpt], manifest=info["manifest"])
        export_checkpoint(ckpt, f"{root}/{name}/hf", verify=True, tolerance=1e-4)
        diffs[name] = True
    return diffs


def _as_official_release(folder) -> None:
    """Rewrite an export's config.json as the official release writes it: the base architecture with
    its six `ttt_*` keys (no conv size, no clip), listing a layer (7) the 3-layer model lacks."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key in ("auto_map", "ttt_conv_size", "ttt_max_update_norm", "rope_parameters"):
        cfg.pop(key)
    cfg.update(architectures=["Qwen3ForCausalLM"], ttt_layers=cfg["ttt_layers"] + [7])
    path.write_text(json.dumps(cfg))


def _import_official(hf_dir, out):
    """Rank function: import with the TTT config taken from the folder, verified against the
    project's HF modeling code run on the same folder; return the manifest's TTT config."""
    from ttt_train.checkpoint import read_checkpoint_info
    from ttt_train.models.hf import import_hf

    import_hf(hf_dir, out, verify=True, tolerance=1e-4, progress=False)
    return read_checkpoint_info(out)["manifest"]["ttt"]


def assert_tokenizer_loads_without_remote_code(folder) -> None:
    """`AutoTokenizer.from_pretrained(folder)`: no remote code, no prompt (stdin closed: a prompt would fail),
    no "You are using a model of type ..." warning."""
    import logging
    import os
    import sys

    from transformers import AutoTokenizer

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger, stdin = logging.getLogger("transformers"), sys.stdin
    logger.addHandler(handler)
    try:
        with open(os.devnull) as sys.stdin:
            ids = AutoTokenizer.from_pretrained(folder)("abc", add_special_tokens=False)["input_ids"]
    finally:
        sys.stdin = stdin
        logger.removeHandler(handler)
    assert ids == [97, 98, 99]
    assert not [r.getMessage() for r in records if "You are using a model of type" in r.getMessage()]


def test_ttt_export_runs_in_place_ttt_under_transformers(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from ttt_train.models.hf.exporter import write_tokenizer

    hf_dir = make_hf_model(tmp_path / "base", tied=False)
    write_tokenizer("byte", hf_dir)
    (done,) = run_local_ranks(_export_ttt_models, 1, str(hf_dir), str(tmp_path), CASES, timeout=900)
    assert sorted(done) == sorted(CASES)
    out = tmp_path / "input_embed_clip" / "hf"
    config = json.loads((out / "config.json").read_text())
    assert config["ttt_mode"] is True and config["ttt_layers"] == [0, 2] and config["ttt_target"] == "input_embed"
    assert config["ttt_max_update_norm"] == 0.05 and config["ttt_chunk"] == 8 and config["ttt_conv_size"] == 5
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("InPlaceTTTQwen3ForCausalLM")
    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == "InPlaceTTTQwen3Config"
    assert config["model_type"] == "qwen3"  # the base type: tokenizer and plain config need no remote code
    assert type(AutoModelForCausalLM.from_pretrained(out)).__name__ == "Qwen3ForCausalLM"  # no TTT without it

    assert_tokenizer_loads_without_remote_code(out)
    readme = (out / "README.md").read_text()
    assert "trained with `ttt_max_update_norm` = 0.05 (the official code assumes no clip)" in readme
    assert "trained with" not in (tmp_path / "hidden_states" / "hf" / "README.md").read_text()

    official = tmp_path / "hidden_states" / "hf"
    _as_official_release(official)
    (ttt,) = run_local_ranks(_import_official, 1, str(official), str(tmp_path / "official_ckpt"))
    assert ttt["layers"] == [0, 2] and ttt["chunk_size"] == 8 and ttt["target"] == "hidden_states"


def test_keys_only_ttt_train_reads_are_named_and_warned_about(caplog):
    """A conv size or a clip the official code does not assume: the export warns and its README says so."""
    import logging

    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import load_model_config
    from ttt_train.models.hf.exporter import warn_official_differences
    from ttt_train.models.hf.model_card import model_card

    model_cfg = load_model_config("tiny")
    odd = TTTConfig(layers=[1], chunk_size=8, conv_size=3, max_update_norm=0.5)
    with caplog.at_level(logging.WARNING):
        warn_official_differences(odd)
    assert "ttt_conv_size=3, ttt_max_update_norm=0.5" in caplog.text and "assumes ttt_conv_size=5" in caplog.text
    card = model_card(model_cfg, odd, family="qwen3", source="ckpt", dtype="bf16", max_position_embeddings=256)
    assert "`ttt_conv_size` = 3 (the official code assumes 5)" in card and "computes a different model" in card
    assert "| `ttt_conv_size` | `3` | ttt-train only (the official code assumes 5) |" in card
    caplog.clear()
    plain = TTTConfig(layers=[1], chunk_size=8)
    with caplog.at_level(logging.WARNING):
        warn_official_differences(plain)
    assert caplog.text == ""
    card = model_card(model_cfg, plain, family="qwen3", source="ckpt", dtype="bf16", max_position_embeddings=256)
    assert "trained with" not in card and "| `ttt_max_update_norm` | `null` |" in card
