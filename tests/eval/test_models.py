"""Model resolution: HF directories as given, ttt-train checkpoints exported once into the cache
(through ttt_train.models.hf.export_checkpoint, replaced here by a copy), labels from folder names."""

import json
import shutil

import pytest

import ttt_train.models.hf as hf
from ttt_train.eval.models import default_label, resolve_models


def fake_checkpoint(root, step=20):
    """A checkpoint root as save_checkpoint leaves it: iter_* folder (meta + shard files) and `latest`."""
    folder = root / f"iter_{step:07d}"
    folder.mkdir(parents=True)
    (folder / "ttt_meta.json").write_text(json.dumps({"step": step}))
    for name in ("metadata.json", ".metadata", "common.pt"):
        (folder / name).write_text("")
    (root / "latest").write_text(folder.name)
    return folder


def test_checkpoints_are_exported_once(tmp_path, plain_dir, monkeypatch):
    calls = []

    def export(source, out):
        calls.append((str(source), str(out)))
        shutil.copytree(plain_dir, out)
        return out

    monkeypatch.setattr(hf, "export_checkpoint", export)
    ttt_root = tmp_path / "runs" / "tiny_ttt" / "stages" / "2_long" / "checkpoints"
    base_iter = fake_checkpoint(tmp_path / "runs" / "tiny_base" / "checkpoints")
    fake_checkpoint(ttt_root)
    paths = [str(ttt_root), str(base_iter), str(plain_dir)]
    entries = resolve_models(paths, None, str(tmp_path / "cache"))
    assert [e.label for e in entries] == ["tiny_ttt", "tiny_base", plain_dir.name]
    assert [c[0] for c in calls] == [str(ttt_root / "iter_0000020"), str(base_iter)]
    assert all((e.hf_dir / "config.json").is_file() for e in entries) and entries[2].hf_dir == plain_dir
    assert resolve_models(paths, ["a", "b", "c"], str(tmp_path / "cache"))[0].hf_dir == entries[0].hf_dir
    assert len(calls) == 2  # cached

    def failing(source, out):  # an export whose verification fails leaves its folder behind
        shutil.copytree(plain_dir, out)
        raise RuntimeError("max abs logit difference above tolerance")

    fresh = fake_checkpoint(tmp_path / "runs" / "fresh" / "checkpoints").parent
    monkeypatch.setattr(hf, "export_checkpoint", failing)
    with pytest.raises(RuntimeError, match="tolerance"):
        resolve_models([str(fresh)], None, str(tmp_path / "cache"))
    monkeypatch.setattr(hf, "export_checkpoint", export)
    assert resolve_models([str(fresh)], None, str(tmp_path / "cache"))[0].hf_dir.is_dir()
    assert len(calls) == 3  # the unverified folder was not reused


def test_default_labels(tmp_path):
    assert default_label(tmp_path / "exports" / "qwen3_ttt") == "qwen3_ttt"
    fake_checkpoint(tmp_path / "exp" / "checkpoints")
    assert default_label(tmp_path / "exp" / "checkpoints" / "iter_0000020") == "exp"
