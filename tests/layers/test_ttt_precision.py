"""A TTT model (both target sources, documents, clipping that clips) in bf16 and under activation
recompute (selective, full) against its reference run: the same weights in fp32 without recompute.
Recompute must give the reference's loss and gradients to float32 round-off; bf16 to bf16 accuracy.
"""

from functools import partial

import pytest

from tests.support.parallel_cases import clipped_fractions, equivalence_case, merge_ranks, rel_err
from ttt_train.runtime.local_ranks import run_local_ranks

TTT = {"hidden_states": dict(layers=[0, 2], chunk_size=8, lr=1.0, target="hidden_states", max_update_norm=0.06),
       "input_embed": dict(layers=[0, 2], chunk_size=8, lr=1.0, target="input_embed", max_update_norm=1.2e-3)}
# selective recompute touches core attention only, whatever the target: once is enough
LAYOUTS = {"hidden_states": [dict(), dict(recompute="selective"), dict(recompute="full"), dict(dtype="bf16")],
           "input_embed": [dict(), dict(recompute="full"), dict(dtype="bf16")]}


@pytest.mark.slow
@pytest.mark.parametrize("target", sorted(TTT))
def test_bf16_and_recompute_match_the_fp32_run(tmp_path, target):
    case = partial(equivalence_case, seed=11, ttt=TTT[target], with_docs=True)
    layouts = LAYOUTS[target]
    results = merge_ranks(run_local_ranks(case, 1, layouts, str(tmp_path), timeout=300), layouts)
    ref = results[0]
    for result in results:
        fractions = clipped_fractions(result["ttt_stats"])
        assert fractions and 0 < sum(fractions) / len(fractions) < 1, (result["layout"], fractions)
    for other in results[1:]:
        bf16 = other["layout"].get("dtype") == "bf16"
        loss_tol, grad_tol = (1e-2, 0.1) if bf16 else (1e-6, 1e-5)
        assert abs(other["loss"] - ref["loss"]) <= loss_tol * abs(ref["loss"]), (other["layout"], other["loss"])
        assert set(other["grads"]) == set(ref["grads"]), other["layout"]
        errors = {name: rel_err(other["grads"][name], grad) for name, grad in ref["grads"].items()}
        assert max(errors.values()) < grad_tol, (other["layout"], sorted(errors.items(), key=lambda x: -x[1])[:3])
        assert (other["logits"] - ref["logits"]).abs().max().item() < (5e-2 if bf16 else 1e-5), other["layout"]
