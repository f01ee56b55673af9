"""Exports read by transformers 4.57 (the official release's pin) give ttt-train's logits.

Baselines (a Qwen3 with rotary base 1e6, a Llama-3.1 with llama3 scaling, a Qwen3 with YaRN) and
In-Place TTT models (Qwen3 with YaRN, Llama-3.1) are imported, their TTT parameters moved off their
initialisation, exported under this environment (transformers 5.x, whose own reading the export's
verification checks), and then read by `tests/hf/compat_read.py` under the python of a second venv
holding transformers 4.57.x (`TTT_COMPAT_PYTHON`, set by `make test-compat`; the test is skipped
without it). That side sees the rotary settings at the top level of `config.json`, loads the
tokenizer and the config without remote code, without a prompt and without a model-type warning,
and its logits equal the megatron model's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.hf.test_convert_export import _train_like, assert_tokenizer_loads_without_remote_code
from tests.hf.test_convert_import import LLAMA31_ROPE, YARN_ROPE, make_hf_model
from ttt_train.runtime.local_ranks import run_local_ranks

COMPAT_PYTHON = os.environ.get("TTT_COMPAT_PYTHON")
pytestmark = [pytest.mark.compat, pytest.mark.skipif(
    not COMPAT_PYTHON, reason="needs TTT_COMPAT_PYTHON (a python with transformers 4.57): run `make test-compat`")]
READER = Path(__file__).with_name("compat_read.py")
TTT = dict(layers=[0, 2], chunk_size=8, lr=1.0)
CASES = {  # name -> (make_hf_model kwargs, TTT config or None)
    "qwen3_theta1e6": (dict(family="qwen3", tied=False, rope={"rope_type": "default", "rope_theta": 1e6}), None),
    "llama31": (dict(family="llama", tied=True, rope=LLAMA31_ROPE), None),
    "qwen3_yarn": (dict(family="qwen3", tied=False, rope=dict(YARN_ROPE, rope_theta=1e6)), None),
    "ttt_qwen3_yarn": (dict(family="qwen3", tied=False, rope=dict(YARN_ROPE, rope_theta=1e6)), TTT),
    "ttt_llama31": (dict(family="llama", tied=False, rope=LLAMA31_ROPE), dict(TTT, max_update_norm=0.05)),
}
PROMPTS = [[int(t) for t in torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n))]
           for n in (5, 19)]  # chunk 8: within the first chunk, and across two chunk edges


def _export_cases(root: str, cases: dict) -> dict:
    """Rank function: import each case (with TTT moved off its initialisation), export it (verified under
    this transformers), return the megatron model's float32 logits of PROMPTS per case."""
    from ttt_train.checkpoint import read_checkpoint_info, save_checkpoint
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models.hf import export_checkpoint, import_hf
    from ttt_train.models.hf.exporter import build_export_model
    from ttt_train.models.hf.verify import megatron_logits

    logits = {}
    for name, (_, ttt) in cases.items():
        ckpt = f"{root}/{name}/ckpt"
        import_hf(f"{root}/{name}/hf", ckpt, ttt=TTTConfig.from_dict(ttt) if ttt else None, verify=False,
                  progress=False)
        gpt = build_export_model(ckpt)[0]
        if ttt:
            _train_like(gpt, seed=len(logits))
            save_checkpoint(ckpt, 1, [gpt], manifest=read_checkpoint_info(ckpt)["manifest"])
        export_checkpoint(ckpt, f"{root}/{name}/out", verify=True, tolerance=1e-4)
        logits[name] = [megatron_logits([gpt], torch.tensor([p]))[0, :, :300] for p in PROMPTS]
    return logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from ttt_train.models.hf.exporter import write_tokenizer

    root = tmp_path_factory.mktemp("compat")
    for name, (kwargs, _) in CASES.items():
        write_tokenizer("byte", make_hf_model(root / name / "hf", **kwargs))
    (ours,) = run_local_ranks(_export_cases, 1, str(root), CASES, timeout=900)
    spec = {"prompts": PROMPTS, "folders": [{"name": n, "dir": str(root / n / "out"), "remote": CASES[n][1] is not None}
                                            for n in CASES]}
    (root / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([COMPAT_PYTHON, str(READER), str(root / "spec.json"), str(root / "read.pt")],
                          cwd=root, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return ours, torch.load(root / "read.pt", weights_only=False), done.stdout, root


def test_the_reader_runs_transformers_4(exported):
    _, theirs, _, _ = exported
    assert theirs["transformers"].startswith("4.57."), theirs["transformers"]
    import transformers

    assert transformers.__version__.split(".")[0] == "5", "the export side must run transformers 5"


@pytest.mark.parametrize("name", sorted(CASES))
def test_logits_under_transformers_4_equal_ttt_train(exported, name):
    ours, theirs, _, _ = exported
    read = theirs[name]
    expected = "InPlaceTTT" if CASES[name][1] else ""
    assert read["model_class"].startswith(expected) and read["model_class"].endswith("ForCausalLM")
    diff = max((a - b[:, :300]).abs().max().item() for a, b in zip(ours[name], read["logits"]))
    assert diff < 1e-4, f"{name}: transformers 4.57's logits differ from ttt-train's by {diff:.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformers_4_sees_the_exact_rotary_settings(exported, name):
    _, theirs, _, _ = exported
    rope = dict(CASES[name][0]["rope"])
    theta = rope.pop("rope_theta")
    for view in ("auto_config", "official_config", "model_config"):
        got = theirs[name][view]
        assert got["rope_theta"] == theta, (view, got)
        if rope["rope_type"] == "default":
            assert got["rope_scaling"] is None, (view, got)
        else:
            assert {k: got["rope_scaling"][k] for k in rope} == rope, (view, got)


def test_tokenizer_and_config_need_no_remote_code_and_log_no_warning(exported):
    _, theirs, stdout, _ = exported
    assert "Do you wish to run the custom code" not in stdout
    for name in CASES:
        read = theirs[name]
        assert read["tokenizer_ids"] == [97, 98, 99] and read["tokenizer_class"] == "PreTrainedTokenizerFast"
        assert not [m for m in read["config_log"] if "You are using a model of type" in m], read["config_log"]
        assert read["auto_config"]["cls"] in ("Qwen3Config", "LlamaConfig")


def test_official_style_config_carries_the_ttt_keys(exported):
    _, theirs, _, _ = exported
    keys = theirs["ttt_llama31"]["official_config"]["ttt"]
    assert keys["ttt_mode"] is True and keys["ttt_layers"] == [0, 2] and keys["ttt_chunk"] == 8
    assert keys["ttt_max_update_norm"] == 0.05 and keys["ttt_conv_size"] == 5


def test_this_side_reads_the_same_folders_alike(exported):
    """transformers 5 (this environment) on the same folders: the tokenizer loads without remote code,
    prompt or model-type warning, and the plain config sees the same rotary base."""
    from transformers import AutoConfig

    _, _, _, root = exported
    for name, (kwargs, _) in CASES.items():
        assert_tokenizer_loads_without_remote_code(root / name / "out")
        assert AutoConfig.from_pretrained(root / name / "out").rope_parameters["rope_theta"] == kwargs["rope"]["rope_theta"]
