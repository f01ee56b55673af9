"""What differs on a GPU node is refused by the driver before compute, by name: a CP communication
type that transformer-engine cannot run, wandb logging without wandb installed. And no module of
ttt_train needs wandb to be imported."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_driver_refuses_a_cp_comm_type_te_cannot_run(tmp_path, monkeypatch, capsys):
    from tests.training import driver_helpers as h
    from ttt_train import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    overrides = h.tiny_overrides(tmp_path / "run", h.make_data(tmp_path / "data"))
    overrides += ["model.backend=te", "model.sliding_window=64", "parallel.cp_comm_type=p2p"]
    assert train.main(overrides) == train.EXIT_REFUSED
    assert ("stages.1: parallel.cp_comm_type=p2p: transformer-engine attends with a sliding window "
            "(model.sliding_window=64) under context parallelism only with a2a or all_gather") in capsys.readouterr().err


def test_driver_without_wandb_refuses_by_name_unless_disabled(tmp_path, monkeypatch, capsys):
    import importlib.util

    from tests.training import driver_helpers as h
    from ttt_train import train

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    monkeypatch.setenv("WORLD_SIZE", "2")
    overrides = h.tiny_overrides(tmp_path / "run", h.make_data(tmp_path / "data")) + ["logging.wandb.mode=offline"]
    assert train.main(overrides) == train.EXIT_REFUSED
    assert "logging.wandb.mode=offline: the wandb package is not installed" in capsys.readouterr().err


def test_every_module_imports_without_wandb():
    code = ("import importlib, pkgutil, sys; sys.modules['wandb'] = None; import ttt_train; "
            "[importlib.import_module(m.name) for m in pkgutil.walk_packages(ttt_train.__path__, 'ttt_train.')]")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
