"""The scan bench runs both algorithms on local ranks and prints one JSON object whose counts equal
the traffic model's (and whose model section extrapolates to larger CP sizes)."""

from __future__ import annotations

import pytest

from tests.support.cli import json_from_module


@pytest.mark.slow
def test_scan_bench_json_tiny():
    res = json_from_module("ttt_train.ops.cp_scan.bench", "--cp", "2", "4", "--d", "4", "--h", "4", "--repeats", "2",
                           "--warmup", "0", "--model-cp", "16", timeout=900)
    assert res["state"] == [1, 4, 4] and res["state_bytes"] == 64
    measured = {(m["cp"], m["algorithm"]): m for m in res["measured"]}
    assert set(measured) == {(2, "ring"), (2, "log"), (4, "ring"), (4, "log")}
    for m in measured.values():
        assert m["counted_equals_model"], m
        for direction in ("forward", "backward"):
            assert m[direction]["wall_ms"] > 0 and len(m[direction]["bytes_sent_per_rank"]) == m["cp"]
    assert (measured[(4, "ring")]["forward"]["rounds"], measured[(4, "log")]["forward"]["rounds"]) == (6, 3)
    assert (measured[(4, "ring")]["backward"]["rounds"], measured[(4, "log")]["backward"]["rounds"]) == (6, 2)
    # forward ring messages: depth, key, state = 8 + 8 + 64 bytes; a middle rank sends two
    assert measured[(4, "ring")]["forward"]["max_bytes_sent"] == 2 * 80
    model = {m["algorithm"]: m for m in res["model"]}
    assert model["ring"]["cp"] == 16 and model["ring"]["forward"]["rounds"] == 30
    assert (model["log"]["forward"]["rounds"], model["log"]["backward"]["rounds"]) == (5, 4)
