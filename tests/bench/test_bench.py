"""`python -m ttt_train.bench` runs at a tiny size and writes a JSON with every field and a plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_tiny_writes_every_field(tmp_path):
    overrides = ["model.overrides.num_layers=7", "model.overrides.hidden_size=64", "model.overrides.ffn_hidden_size=128",
                 "model.overrides.head_dim=16", "ttt.chunk_size=16", "prefill.lengths=[32,64]",
                 "train_step.lengths=[32,64]", "decode.batch_sizes=[1,2]", "decode.prompt_length=8",
                 "decode.new_tokens=4", "repeats=1", "warmup=0", "threads=1", f"out={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "ttt_train.bench", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert printed == saved
    assert (tmp_path / "bench.png").stat().st_size > 0
    assert saved["ttt_layers"] == [0, 6]
    for section, key, values in (("prefill", "length", [32, 64]), ("train_step", "length", [32, 64]),
                                 ("decode", "batch", [1, 2])):
        rows = saved[section]
        assert [row[key] for row in rows] == values
        for row in rows:
            assert row["base_tokens_per_s"] > 0 and row["ttt_tokens_per_s"] > 0
            assert row["tokens_per_s_ratio"] == pytest.approx(row["ttt_tokens_per_s"] / row["base_tokens_per_s"],
                                                              rel=1e-3)
            if section != "decode":
                assert row["base_peak_mib"] > 0 and row["ttt_peak_mib"] > 0
    assert set(saved["targets"]) == {"train_tokens_per_s", "train_peak_memory", "prefill_tokens_per_s",
                                     "prefill_peak_memory", "decode_tokens_per_s"}
    assert saved["targets"]["decode_tokens_per_s"]["batch"] == 2
    assert saved["prefill_oom_at"] is None and saved["train_step_oom_at"] is None


def test_sweep_stops_at_the_first_length_that_does_not_fit():
    from ttt_train.bench import _sweep

    def measure(n):
        if n >= 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"length": n}

    assert _sweep([1, 2, 4, 8], measure) == ([{"length": 1}, {"length": 2}], 4)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        _sweep([1], lambda n: (_ for _ in ()).throw(RuntimeError("shape mismatch")))


def test_targets_are_read_at_the_longest_length():
    from ttt_train.bench import target_checks

    result = {"prefill": [{"length": 8, "tokens_per_s_ratio": 0.5, "peak_memory_ratio": 2.0},
                          {"length": 16, "tokens_per_s_ratio": 0.95, "peak_memory_ratio": 1.2}]}
    checks = target_checks(result)
    assert checks["prefill_tokens_per_s"] == {"ratio": 0.95, "target": ">= 0.93", "met": True, "length": 16}
    assert checks["prefill_peak_memory"]["met"] is False
    assert set(checks) == {"prefill_tokens_per_s", "prefill_peak_memory"}
