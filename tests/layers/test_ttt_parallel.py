"""A model with In-Place TTT layers: TP=2 (with and without sequence parallelism) and PP=2 give the
loss, logits and every gradient (the TTT target's included) of TP=1, on packed batches with
document boundaries, with and without update clipping, for both target sources. The TP=1 weights
reach the other layouts through a dist_checkpoint, so the TTT parameters' sharded state dict is
exercised too."""

import pytest

from tests.support.parallel_cases import equivalence_case
from ttt_train.runtime.local_ranks import run_local_ranks

LAYOUTS = [dict(), dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2)]
CASES = {
    "hidden_states": dict(layers=[0, 2], chunk_size=8, lr=1.0, target="hidden_states"),
    "input_embed_clipped": dict(layers=[0, 1], chunk_size=8, lr=1.0, target="input_embed", max_update_norm=0.05),
}


def _merge(per_rank, layouts):
    merged = []
    for i, layout in enumerate(layouts):
        grads = {}
        for rank in per_rank:
            grads.update(rank[i]["grads"])
        losses = [r[i]["loss"] for r in per_rank if r[i]["loss"] is not None]
        logits = next((r[i]["logits"] for r in per_rank if r[i]["logits"] is not None), None)
        merged.append(dict(layout=layout, loss=losses[0], grads=grads, logits=logits))
    return merged


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    ttt = CASES[request.param]
    layouts = LAYOUTS if ttt["target"] == "hidden_states" else LAYOUTS[:3]  # input_embed: TTT on stage 0 only
    per_rank = run_local_ranks(equivalence_case, 2, layouts, str(tmp_path_factory.mktemp("ckpt")), "tiny", 32,
                               4, 2, 11, None, ttt, True, timeout=600)
    return _merge(per_rank, layouts)


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


@pytest.mark.slow
def test_ttt_layouts_match_tp1(case):
    ref = case[0]
    ttt_names = [n for n in ref["grads"] if "ttt_target" in n]
    assert ttt_names and all(ref["grads"][n].abs().max() > 0 for n in ttt_names)
    for other in case[1:]:
        assert abs(other["loss"] - ref["loss"]) <= 2e-6 * abs(ref["loss"]), other["layout"]
        assert set(other["grads"]) - {"output_layer.weight"} == set(ref["grads"]), other["layout"]
        for name, grad in ref["grads"].items():
            assert _rel_err(other["grads"][name], grad) < 2e-5, (other["layout"], name)
        if other["logits"] is not None:
            assert (other["logits"] - ref["logits"]).abs().max().item() < 2e-5, other["layout"]
