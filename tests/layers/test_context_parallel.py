"""Context parallelism of the whole tiny TTT model (local spec, gathered-K/V attention, distributed
prefix scan of the fast-weight updates): CP=2, CP=4 and CP=2 x TP=2 (with and without sequence parallelism) give the loss and every gradient
of CP=1 on the same packed batch with document boundaries, with update clipping that really clips (a
part of the updates, per `TTTMLP.ttt_stats()`). Misaligned shards are refused."""

from functools import partial

import pytest
import torch

from tests.support.parallel_cases import clipped_fractions, equivalence_case, merge_ranks, rel_err
from ttt_train.runtime.local_ranks import LocalRanksError, run_local_ranks

# update norms lie around 0.06 with the hidden_states target and 1e-3 with input_embed (small embeddings)
TTT = dict(layers=[0, 2], chunk_size=8, lr=1.0, target="hidden_states", max_update_norm=0.06)
TTT_EMBED = dict(TTT, target="input_embed", max_update_norm=1.2e-3)


def _check(case):
    ref = case[0]
    assert any("ttt_target" in n for n in ref["grads"])
    for result in case:
        fractions = clipped_fractions(result["ttt_stats"])
        assert fractions and 0.1 < sum(fractions) / len(fractions) < 0.9, (result["layout"], result["ttt_stats"])
    for other in case[1:]:
        assert abs(other["loss"] - ref["loss"]) <= 2e-6 * abs(ref["loss"]), (other["layout"], other["loss"], ref["loss"])
        assert set(other["grads"]) == set(ref["grads"]), other["layout"]
        for name, grad in ref["grads"].items():
            assert rel_err(other["grads"][name], grad) < 2e-5, (other["layout"], name)


@pytest.mark.slow
def test_cp2_matches_cp1(tmp_path):
    layouts = [dict(), dict(cp=2)]
    case = partial(equivalence_case, seq=64, seed=3, ttt=TTT, with_docs=True)
    per_rank = run_local_ranks(case, 2, layouts, str(tmp_path), timeout=600)
    _check(merge_ranks(per_rank, layouts))


@pytest.mark.slow
def test_cp4_and_cp2_tp2_sp_match_cp1(tmp_path):
    layouts = [dict(), dict(cp=4), dict(cp=2, tp=2), dict(cp=2, tp=2, sequence_parallel=True)]
    case = partial(equivalence_case, seq=64, seed=3, model_overrides=dict(sliding_window=24),
                   ttt=TTT_EMBED, with_docs=True)
    per_rank = run_local_ranks(case, 4, layouts, str(tmp_path), timeout=900)
    _check(merge_ranks(per_rank, layouts))


@pytest.mark.slow
def test_misaligned_chunks_are_refused(tmp_path):
    bad = dict(TTT, chunk_size=12)  # shard length 64 / (2*2) = 16 is not a multiple of 12
    with pytest.raises(LocalRanksError, match=r"(?s)chunk_size.*12.*16|16.*chunk_size"):
        run_local_ranks(partial(equivalence_case, seq=64, ttt=bad, with_docs=True), 2, [dict(cp=2)], str(tmp_path),
                        timeout=300)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("seq", [13, 16])
def test_sdpa_core_attention_equals_megatrons_without_cp(seq, window):
    """Without CP the local spec's core attention (torch SDPA) equals megatron's unfused
    DotProductAttention, odd lengths included, with and without a sliding window."""
    out_sdpa, out_megatron = run_local_ranks(_core_attention_pair, 1, seq, window)[0]
    torch.testing.assert_close(out_sdpa, out_megatron, rtol=1e-5, atol=1e-6)


def _core_attention_pair(seq, window):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from ttt_train.layers.cp_attention import GatherKVAttention
    from ttt_train.models import load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize

    parallel = ParallelConfig()
    initialize(parallel)
    config = to_transformer_config(load_model_config("tiny", sliding_window=window), parallel)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(seq, 2, config.num_attention_heads, config.kv_channels, generator=g)
    k, v = (torch.randn(seq, 2, config.num_query_groups, config.kv_channels, generator=g) for _ in range(2))
    args = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return GatherKVAttention(**args)(q, k, v, None), DotProductAttention(**args)(q, k, v, None)
