"""A model with In-Place TTT layers: TP=2 (with and without sequence parallelism) and PP=2 give the
loss, logits and every gradient (the TTT target's included) of TP=1, on packed batches with document
boundaries, with and without update clipping (which really clips: a part of the updates on every
layout, per `TTTMLP.ttt_stats()`, which TP ranks agree on), for both target sources (input_embed
under PP=2 too). The TP=1 weights reach the other layouts through a dist_checkpoint, so the TTT
parameters' sharded state dict is exercised too."""

from functools import partial

import pytest

from tests.support.parallel_cases import clipped_fractions, equivalence_case, merge_ranks, rel_err
from ttt_train.runtime.local_ranks import run_local_ranks

LAYOUTS = [dict(), dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2)]
CASES = {
    "hidden_states": dict(layers=[0, 2], chunk_size=8, lr=1.0, target="hidden_states"),
    # update norms of this case lie around 1e-3 (small embeddings): a good part of the updates clip.
    # Layers 0 and 1 sit on the first of two pipeline stages, which holds the embeddings (PP=2 runs).
    "input_embed_clipped": dict(layers=[0, 1], chunk_size=8, lr=1.0, target="input_embed", max_update_norm=1.2e-3),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    ttt = CASES[request.param]
    case = partial(equivalence_case, seed=11, ttt=ttt, with_docs=True)
    per_rank = run_local_ranks(case, 2, LAYOUTS, str(tmp_path_factory.mktemp("ckpt")), timeout=600)
    return [dict(result, name=request.param) for result in merge_ranks(per_rank, LAYOUTS)]


@pytest.mark.slow
def test_ttt_layouts_match_tp1(case):
    ref = case[0]
    ttt_names = [n for n in ref["grads"] if "ttt_target" in n]
    assert ttt_names and all(ref["grads"][n].abs().max() > 0 for n in ttt_names)
    for other in case[1:]:
        assert abs(other["loss"] - ref["loss"]) <= 2e-6 * abs(ref["loss"]), other["layout"]
        assert set(other["grads"]) - {"output_layer.weight"} == set(ref["grads"]), other["layout"]
        for name, grad in ref["grads"].items():
            assert rel_err(other["grads"][name], grad) < 2e-5, (other["layout"], name)
        if other["logits"] is not None:
            assert (other["logits"] - ref["logits"]).abs().max().item() < 2e-5, other["layout"]


@pytest.mark.slow
def test_clipping_really_clips_and_tp_ranks_agree_on_stats(case):
    for result in case:
        fractions = clipped_fractions(result["ttt_stats"])
        if "max_update_norm" in CASES[case_name(case)]:
            assert fractions and 0.1 < sum(fractions) / len(fractions) < 0.9, (result["layout"], result["ttt_stats"])
        else:
            assert fractions and max(fractions) == 0, result["layout"]
        if result["layout"].get("tp") == 2:
            first, second = result["ttt_stats"]
            assert first.keys() == second.keys() and all(
                first[k][s] == pytest.approx(second[k][s], rel=1e-5) for k in first for s in first[k]), result["layout"]


def case_name(case) -> str:
    return case[0]["name"]
