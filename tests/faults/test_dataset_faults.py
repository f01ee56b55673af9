"""A corrupted or changed dataset is refused at start with the file named: a truncated .bin (also
without its .meta.json, issue 23), an .idx of another dataset, a .bin replaced by other tokens of
the same size, and data changed under a run that resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy
import pytest

from data_tools import inspect_dataset, synthetic
from ttt_train.data import indexed
from ttt_train.data.errors import DataError

pytestmark = pytest.mark.timeout(600)


def _dataset(folder: Path, name: str = "ds", num: int = 24, seed: int = 0) -> str:
    prefix = str(folder / name)
    assert synthetic.main(["passkey", "--num", str(num), "--length", "128", "--seed", str(seed),
                           "--output-prefix", prefix]) == 0
    return prefix


def _inspect_error(prefix: str, capsys) -> str:
    capsys.readouterr()
    assert inspect_dataset.main([prefix]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_truncated_bin_without_sidecar_is_refused_by_inspect_and_by_training(tmp_path, capsys):
    from ttt_train.data.datasets import DataConfig, build_datasets

    prefix = _dataset(tmp_path)
    Path(prefix + ".meta.json").unlink()
    size = Path(prefix + ".bin").stat().st_size
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(size // 2)
    expected = f"{prefix}.bin has {size // 2} bytes but {prefix}.idx describes {size} (24 sequences, {size // 2}"
    assert expected in _inspect_error(prefix, capsys)
    assert "the .bin is truncated" in _inspect_error(prefix, capsys)
    cfg = DataConfig.from_dict({"blend": [prefix], "seq_length": 64, "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(DataError, match=expected.replace("(", r"\(")):
        build_datasets(cfg, num_samples=(8, 0, 0))


def test_an_index_of_another_dataset_is_refused(tmp_path, capsys):
    prefix = _dataset(tmp_path)
    other = _dataset(tmp_path, "other", num=30, seed=7)
    Path(prefix + ".meta.json").unlink()
    shutil.copy(other + ".idx", prefix + ".idx")
    assert f"{prefix}.bin has {Path(prefix + '.bin').stat().st_size} bytes but {prefix}.idx describes " \
        f"{Path(other + '.bin').stat().st_size}" in _inspect_error(prefix, capsys)
    Path(prefix + ".idx").write_bytes(b"garbage")
    assert f"{prefix}.idx is not a readable megatron index" in _inspect_error(prefix, capsys)


def test_tokens_replaced_under_the_same_index_are_found(tmp_path):
    """The sidecar records a sample of the .bin's content: tokens shifted by one in a .bin of the
    same size are refused by it; without the sidecar the dataset's identity still changes."""
    from ttt_train.data.tokenizer import load_tokenizer

    prefix = _dataset(tmp_path)
    identity = indexed.dataset_identity(prefix)
    tokens = numpy.fromfile(prefix + ".bin", dtype=numpy.uint16)
    numpy.roll(tokens, 1).tofile(prefix + ".bin")
    with pytest.raises(DataError, match=rf"{prefix}.bin does not hold the tokens {prefix}.meta.json describes"):
        indexed.check_against_tokenizer(prefix, load_tokenizer("byte"))
    Path(prefix + ".meta.json").unlink()
    assert indexed.dataset_identity(prefix) != identity


def _swap_first_two_documents(prefix: str) -> None:
    """Other tokens, same sizes, same index, every document still ending with EOD."""
    dataset = indexed.open_dataset(prefix)
    (a, b), (la, lb) = dataset.index.sequence_pointers[:2] // 2, dataset.sequence_lengths[:2]
    assert la == lb
    tokens = numpy.fromfile(prefix + ".bin", dtype=numpy.uint16)
    tokens[a:a + la], tokens[b:b + lb] = tokens[b:b + lb].copy(), tokens[a:a + la].copy()
    del dataset
    tokens.tofile(prefix + ".bin")


@pytest.mark.slow
def test_a_resume_on_changed_data_is_refused_naming_the_dataset(tmp_path):
    """A run (one rank) stopped at step 2 of 4; its dataset is then rebuilt in place with two
    documents swapped (same sizes, same index, a consistent sidecar): the resume refuses, naming it."""
    from tests.training import driver_scenarios as sc
    from ttt_train.runtime.local_ranks import run_local_ranks

    prefix = _dataset(tmp_path, num=60)
    run_dir = tmp_path / "run"
    args = ["experiment=tiny_ttt", f"run.dir={run_dir}", f"data.blend=[{{path:'{prefix}',weight:1.0}}]",
            f"data.cache_dir={tmp_path / 'cache'}", "model.max_position_embeddings=128",
            "stages=[{name:ctx1k,tokens:1024,seq_length:128,yarn:null}]", "checkpoint.every_steps=2",
            "checkpoint.keep_last=3", "logging.interval=1", "logging.wandb.mode=disabled", "run.world_size=1",
            "training.global_batch_size=2", "training.micro_batch_size=2"]
    assert run_local_ranks(sc.run_driver, 1, args, timeout=300) == [0]
    # as if stopped after step 2
    (run_dir / "stages" / "0_ctx1k" / "checkpoints" / "latest").write_text("iter_0000002\n")
    _swap_first_two_documents(prefix)
    indexed.write_sidecar(prefix, json.loads(Path(prefix + ".meta.json").read_text()))  # as a rebuild would
    ((code, err),) = run_local_ranks(sc.run_driver_captured, 1, args, timeout=300)
    assert code == 1, err  # one line, no traceback; status.json says why
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    changed = f"data: dataset {prefix} (.bin/.idx) changed since the checkpoint was saved"
    assert line.startswith("error: checkpoint ") and changed in line and "Traceback" not in err, err
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "failed" and changed in status["error"]
