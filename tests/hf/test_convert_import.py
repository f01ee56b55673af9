"""HF -> ttt-train import (and the round trip back): logits equal transformers' at TP=1, TP=2 and PP=2,
with TTT inserted; import -> export gives the original tensors; bad folders fail naming the problem.

Tiny random Qwen3 / Llama models are built and saved by the tests (nothing downloaded); each
conversion runs in local ranks (`run_local_ranks`), the comparison against transformers in the rank
that holds the logits (`ttt_train.models.hf.verify`).
"""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch

from ttt_train.runtime.local_ranks import LocalRanksError, run_local_ranks

FP32_TOL = 1e-4


def make_hf_model(folder, family: str = "qwen3", *, tied: bool = True, rope: dict | None = None, layers: int = 3,
                  seed: int = 0, **overrides):
    """Save a tiny random transformers Qwen3 (qk-norm, GQA, head_dim != hidden/heads) or Llama model;
    norm weights are randomised too, so a misplaced norm shows in the logits."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if family == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    values = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=24, tie_word_embeddings=tied,
                  max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
                  rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0})
    values.update(overrides)
    model = model_cls(config_cls(**values))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    model.save_pretrained(folder)
    return folder


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
             "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": True}


def _import_and_compare(hf_dir, out, layout: dict, ttt: dict | None = None) -> float | None:
    """Rank function: import at `layout`, return the max logit difference against transformers."""
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models.hf.importer import import_hf
    from ttt_train.runtime.distributed import ParallelConfig

    import_hf(hf_dir, out, parallel=ParallelConfig(**layout), ttt=TTTConfig.from_dict(ttt) if ttt else None,
              verify=False, progress=False)
    return _verify(hf_dir, out, layout, ttt)


def _verify(hf_dir, out, layout, ttt):
    """Build the model at `layout` from the checkpoint just written and compare with transformers."""
    from pathlib import Path

    from ttt_train.checkpoint import load_checkpoint
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.models.hf.importer import resolve_configs, verify_import
    from ttt_train.runtime.distributed import ParallelConfig, initialize

    model_cfg, ttt_cfg = resolve_configs(hf_dir, ttt=TTTConfig.from_dict(ttt) if ttt else None)
    parallel = ParallelConfig(**layout)
    initialize(parallel)
    chunks = [build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel), ttt=ttt_cfg)]
    load_checkpoint(out, chunks)
    return verify_import(Path(hf_dir), chunks, model_cfg, ttt_cfg, tolerance=FP32_TOL)


CASES = {"qwen3_tied": dict(family="qwen3", tied=True), "qwen3_untied": dict(family="qwen3", tied=False),
         "llama31": dict(family="llama", tied=False, rope=LLAMA31_ROPE)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_import_logits_equal_transformers_tp1(tmp_path, case):
    hf_dir = make_hf_model(tmp_path / "hf", **CASES[case])
    (diff,) = run_local_ranks(_import_and_compare, 1, str(hf_dir), str(tmp_path / "ckpt"), {})
    assert diff < FP32_TOL
    manifest = json.loads(next((tmp_path / "ckpt").glob("iter_*/ttt_meta.json")).read_text())["manifest"]
    assert manifest["model"]["tie_embeddings"] == CASES[case]["tied"]
    assert (tmp_path / "ckpt" / "model.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
@pytest.mark.parametrize("case", ["qwen3_tied", "llama31"])
def test_import_logits_equal_transformers_tp2_pp2(tmp_path, case, layout):
    hf_dir = make_hf_model(tmp_path / "hf", **CASES[case], layers=4)
    diffs = run_local_ranks(_import_and_compare, 2, str(hf_dir), str(tmp_path / "ckpt"), layout)
    assert diffs[0] == diffs[1] and diffs[0] < FP32_TOL


def test_fresh_ttt_keeps_the_base_model(tmp_path):
    """TTT inserted in layers 0 and 2 (chunk 8; prompts of 5 and 19 tokens cross chunk edges) starts
    as the base model: logits equal the plain HF model's."""
    hf_dir = make_hf_model(tmp_path / "hf", tied=False)
    ttt = dict(layers=[0, 2], chunk_size=8, lr=1.0)
    (diff,) = run_local_ranks(_import_and_compare, 1, str(hf_dir), str(tmp_path / "ckpt"), {}, ttt)
    assert diff < FP32_TOL
    manifest = json.loads(next((tmp_path / "ckpt").glob("iter_*/ttt_meta.json")).read_text())["manifest"]
    assert manifest["ttt"]["layers"] == [0, 2]


def _round_trip(hf_dir, ckpt, out):
    from ttt_train.models.hf import export_checkpoint, import_hf

    import_hf(hf_dir, ckpt, verify=True, tolerance=FP32_TOL, progress=False)
    export_checkpoint(ckpt, out, verify=True, tolerance=FP32_TOL, max_shard_size="100KB")


def test_round_trip_gives_identical_tensors_and_keeps_yarn(tmp_path):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from ttt_train.models.hf.exporter import write_tokenizer
    from ttt_train.models.hf.hf_files import SafetensorsFolder

    hf_dir = make_hf_model(tmp_path / "hf", tied=False, rope=YARN_ROPE)
    write_tokenizer("byte", hf_dir)
    run_local_ranks(_round_trip, 1, str(hf_dir), str(tmp_path / "ckpt"), str(tmp_path / "out"))
    manifest = json.loads(next((tmp_path / "ckpt").glob("iter_*/ttt_meta.json")).read_text())["manifest"]
    assert manifest["tokenizer"]["spec"] == str((tmp_path / "ckpt" / "tokenizer").resolve())
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("abc")["input_ids"] == [97, 98, 99]
    src, dst = SafetensorsFolder(hf_dir), SafetensorsFolder(tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded
    assert src.names() == dst.names()
    exported = dict(dst.iter_tensors(dst.names()))
    for name, tensor in src.iter_tensors(src.names()):
        assert torch.equal(tensor, exported[name]), name
    rope = AutoConfig.from_pretrained(tmp_path / "out").rope_parameters
    for key, value in YARN_ROPE.items():
        assert rope[key] == value, key
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())
    with safe_open(tmp_path / "out" / dst.file_of["lm_head.weight"], framework="pt") as f:
        assert f.get_slice("lm_head.weight").get_shape() == [300, 64]  # vocabulary padding removed


def _import_error(hf_dir, out, ttt=None, preset=None) -> str:
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import load_model_config
    from ttt_train.models.hf import import_hf

    try:
        import_hf(hf_dir, out, ttt=TTTConfig.from_dict(ttt) if ttt else None, verify=False, progress=False,
                  preset=load_model_config(preset) if preset else None)
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return "no error"


def _errors(folders: dict) -> dict:
    return {name: _import_error(*args) for name, args in folders.items()}


def test_bad_folders_fail_naming_the_problem(tmp_path):
    base = make_hf_model(tmp_path / "base")
    folders = {}
    (tmp_path / "empty").mkdir()
    folders["no_config"] = (str(tmp_path / "empty"), str(tmp_path / "o1"))
    qwen2 = shutil.copytree(base, tmp_path / "qwen2")
    cfg = json.loads((qwen2 / "config.json").read_text())
    (qwen2 / "config.json").write_text(json.dumps(dict(cfg, architectures=["Qwen2ForCausalLM"])))
    folders["qwen2"] = (str(qwen2), str(tmp_path / "o2"))
    gpt2 = shutil.copytree(base, tmp_path / "gpt2")
    (gpt2 / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    folders["gpt2"] = (str(gpt2), str(tmp_path / "o3"))
    shape = shutil.copytree(base, tmp_path / "shape")
    (shape / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=128)))
    folders["shape"] = (str(shape), str(tmp_path / "o4"))
    folders["preset"] = (str(base), str(tmp_path / "o5"), None, "tiny")
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[1]
    (sharded / lost).unlink()
    folders["missing_shard"] = (str(sharded), str(tmp_path / "o6"))
    errors = run_local_ranks(_errors, 1, folders)[0]
    assert "config.json: not found" in errors["no_config"]
    assert "Qwen2ForCausalLM is not supported" in errors["qwen2"] and "biases" in errors["qwen2"]
    assert "unsupported architecture ['GPT2LMHeadModel']" in errors["gpt2"]
    assert "down_proj.weight has shape [64, 96], the model expects [64, 128]" in errors["shape"]
    assert "preset 'tiny' does not match" in errors["preset"] and "model.num_layers: preset 4, config.json 3" in errors["preset"]
    assert lost in errors["missing_shard"] and "missing" in errors["missing_shard"]


def test_export_refuses_an_incomplete_checkpoint(tmp_path):
    folder = tmp_path / "ckpt" / "iter_0000005"
    folder.mkdir(parents=True)
    (folder / "common.pt").write_bytes(b"")
    with pytest.raises(LocalRanksError, match="not a complete ttt-train checkpoint"):
        run_local_ranks(functools.partial(_export, str(folder), str(tmp_path / "out")), 1)


def _export(ckpt, out):
    from ttt_train.models.hf import export_checkpoint

    export_checkpoint(ckpt, out)


def test_cli_import_then_export(tmp_path):
    from ttt_train.convert import main

    hf_dir = make_hf_model(tmp_path / "hf", family="llama", tied=True)
    args = ["import", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt"), "--tolerance", "1e-4"]
    assert run_local_ranks(main, 1, args) == [0]
    args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--tolerance=1e-4"]
    assert run_local_ranks(main, 1, args) == [0]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    args = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")]
    assert run_local_ranks(main, 1, args) == [2]  # the folder exists: refused
    assert run_local_ranks(main, 1, args + ["--force", "--no-verify"]) == [0]  # an earlier export: replaced
    assert run_local_ranks(main, 1, ["export", "--checkpoint", str(tmp_path / "ckpt"), "--out",
                                     str(tmp_path / "ckpt"), "--force"]) == [2]  # not an export: refused


def test_byte_tokenizer_exports_for_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from ttt_train.data.tokenizer import load_tokenizer
    from ttt_train.models.hf.exporter import write_tokenizer

    ids = write_tokenizer("byte", tmp_path)
    ours = load_tokenizer("byte")
    hf = AutoTokenizer.from_pretrained(tmp_path)
    text = "In-Place TTT: ünïcode ✓"
    assert hf(text, add_special_tokens=False)["input_ids"] == ours.encode(text)
    assert hf.decode(ours.encode(text)) == text
    assert ids == {"eos_token_id": ours.eod_id, "pad_token_id": ours.pad_id} and hf.eos_token_id == ours.eod_id


def _save_bf16_and_export(root):
    from ttt_train.checkpoint import build_manifest, save_checkpoint
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.models.hf import export_checkpoint
    from ttt_train.runtime.distributed import ParallelConfig, initialize

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny")
    gpt = build_gpt_model(model_cfg, to_transformer_config(model_cfg, parallel, dtype="bf16"))
    save_checkpoint(f"{root}/ckpt", 3, [gpt], manifest=build_manifest(model_cfg, None, parallel, dtype="bf16"))
    export_checkpoint(f"{root}/ckpt", f"{root}/out", tolerance=FP32_TOL)


def test_bf16_checkpoint_exports_bf16_safetensors(tmp_path):
    """A checkpoint trained in bf16 exports bf16 tensors; the verification runs both sides in float32."""
    from ttt_train.models.hf.hf_files import SafetensorsFolder

    run_local_ranks(_save_bf16_and_export, 1, str(tmp_path))
    out = SafetensorsFolder(tmp_path / "out")
    assert {t.dtype for _, t in out.iter_tensors(out.names())} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_export_name_check_names_what_is_missing_or_left_over():
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import load_model_config
    from ttt_train.models.hf.exporter import check_names, hf_config
    from ttt_train.models.hf.gpt_family import expected_hf_shapes, tensor_maps

    model_cfg, ttt = load_model_config("tiny"), TTTConfig(layers=[1], chunk_size=8)
    shapes = {name: shape for tm in tensor_maps(model_cfg, [1])
              for name, shape in zip(tm.hf, expected_hf_shapes(tm, model_cfg, ttt.conv_size))}
    config = hf_config(model_cfg, ttt)
    check_names(config, ttt, "qwen3", shapes)  # complete: passes
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.ttt_proj.weight'\]"):
        check_names(config, ttt, "qwen3", {k: v for k, v in shapes.items() if "ttt_proj" not in k})
    with pytest.raises(ValueError, match=r"wrong shape \[\('model.norm.weight', \(63,\), \(64,\)\)\]"):
        check_names(config, ttt, "qwen3", shapes | {"model.norm.weight": (63,)})
    with pytest.raises(ValueError, match=r"left over \['model.layers.1.mlp.ttt_conv.weight', 'model.layers.1.mlp.ttt_proj"):
        check_names(hf_config(model_cfg, None), None, "qwen3", shapes)


def _convert_output(args) -> tuple[int, str, str]:
    """Rank function: `convert.main(args)` with its exit code, stdout and stderr."""
    import contextlib
    import io

    from ttt_train.convert import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def test_cli_import_refuses_a_non_empty_out_and_force_replaces_only_an_import(tmp_path, capfd):
    """A second import into the same --out is refused (the first stays whole); --force replaces an earlier
    import (a stale ttt.yaml goes with it) but never a run's checkpoints (its `latest` is untouched);
    the summary names the TTT layers."""
    hf_dir, ckpt = make_hf_model(tmp_path / "hf", tied=False), tmp_path / "ckpt"
    base = ["import", "--hf", str(hf_dir), "--out", str(ckpt), "--no-verify", "--no-progress"]
    ttt = ["ttt=paper", "ttt.layers=[0,2]", "ttt.chunk_size=8"]

    def convert(args):  # an import, in a rank process
        return run_local_ranks(_convert_output, 1, args)[0]

    def refused(args):  # refused before any set-up: in this process
        from ttt_train.convert import main

        code = main(args)
        return code, capfd.readouterr().err

    def manifest_ttt():
        return json.loads(next(ckpt.glob("iter_*/ttt_meta.json")).read_text())["manifest"]["ttt"]

    code, out, _ = convert(base + ttt)
    assert code == 0 and "(In-Place TTT in layers [0, 2]: freshly initialised in layers [0, 2])" in out
    code, err = refused(base)
    assert code == 2 and f"--out {ckpt} exists and is not empty" in err and "--force" in err
    assert manifest_ttt()["layers"] == [0, 2] and (ckpt / "ttt.yaml").is_file()
    code, out, _ = convert(base + ["--force"])
    assert code == 0 and "(no In-Place TTT)" in out
    assert manifest_ttt() is None and not (ckpt / "ttt.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "hf"]  # no temporary folder left

    run = tmp_path / "run" / "checkpoints"  # what a training run leaves
    (run / "iter_0000500").mkdir(parents=True)
    (run / "latest").write_text("iter_0000500\n")
    code, err = refused(["import", "--hf", str(hf_dir), "--out", str(run), "--force"])
    assert code == 2 and "is not the output of an earlier convert import (it holds ['iter_0000500'])" in err
    assert (run / "latest").read_text() == "iter_0000500\n" and sorted(p.name for p in run.iterdir()) == [
        "iter_0000500", "latest"]


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capfd):
    """The CLI's refusals (the keys themselves: tests/test_config_compose.py) are one line on stderr, exit 2."""
    from ttt_train.convert import main

    out = str(tmp_path / "o")
    cases = {"ttt.every=3": "ttt.every given without a TTT preset: put ttt=paper (configs/ttt/) before it",
             "+ttt.every=3": "ttt.every given without a TTT preset",
             "ttt=paper ttt.evry=3": "unknown config key 'ttt.evry' (did you mean 'ttt.every'?)",
             "+foo=1": "unknown config key 'foo'",
             "--tp": "option --tp needs a value"}
    for args, message in cases.items():
        assert main(["import", "--hf", str(tmp_path), "--out", out, *args.split()]) == 2, args
        err = capfd.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
