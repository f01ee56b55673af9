"""Associative recall through megatron's ``TTTMLP`` inside a one-layer tiny GPT (one gloo rank), built
with ``ttt.target_init=next_token`` and fed as training feeds it (``model_inputs``: doc ids as
``padding_mask``, token embeddings as the block's ``context``), for both target sources.

Hand-set weights (``scenario.gated_mlp_keys``): embeddings of the init's scale (norm 0.16), the
attention's output projection zero (the MLP input is the RMS-normalised embedding), ``fc1`` making
``z`` an exactly orthogonal direction per used token id (``||z|| ~ 22``), ``fc2`` (``W_down``) left
at its random init (std 0.014). The MLP output at the query (a forward hook) is judged against every
token's embedding; every mutant of ``tests/mechanism/mutants.py`` is rejected.
"""

import pytest
import torch

from tests.mechanism import mutants, scenario
from ttt_train.runtime.local_ranks import run_local_ranks

TARGETS = ("input_embed", "hidden_states")
LR = 1.0
EMBED_NORM = 0.16  # ~ init std 0.02 * sqrt(hidden 64)


def _megatron_recall(targets, kinds) -> dict:
    """Rank function: per (target, mutant or None) the scenario's failures, and the real layer's cosines."""
    import ttt_train.layers.ttt_mlp as ttt_mlp
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize
    from ttt_train.training.step import model_inputs

    parallel = ParallelConfig()
    initialize(parallel)
    model_cfg = load_model_config("tiny", num_layers=1)
    config = to_transformer_config(model_cfg, parallel)
    tokens, doc_ids = scenario.batch()
    batch = dict(tokens=tokens, position_ids=torch.arange(scenario.SEQ).expand_as(tokens), doc_ids=doc_ids)
    results = {}
    for target in targets:
        torch.manual_seed(0)
        ttt = TTTConfig(layers=[0], chunk_size=scenario.CHUNK, lr=LR, target=target, target_init="next_token")
        model = build_gpt_model(model_cfg, config, ttt=ttt).eval()
        layer = model.decoder.layers[0]
        assert isinstance(layer.mlp, ttt_mlp.TTTMLP)
        vocab, d = model.embedding.word_embeddings.weight.shape
        embeddings, w_gate, w_up = scenario.gated_mlp_keys(vocab, d, model_cfg.ffn_hidden_size, embed_norm=EMBED_NORM)
        with torch.no_grad():
            model.embedding.word_embeddings.weight.copy_(embeddings)
            layer.self_attention.linear_proj.weight.zero_()
            layer.mlp.linear_fc1.weight.copy_(torch.cat([w_gate, w_up]))  # [gate; up] at TP 1
        seen = {}
        layer.mlp.register_forward_hook(lambda module, args, out, seen=seen: seen.update(out=out[0].transpose(0, 1)))
        for kind in kinds:
            with mutants.installed(kind, ops=[(ttt_mlp, "inplace_ttt")]), torch.no_grad():
                model(batch["tokens"], batch["position_ids"], None, **model_inputs(model, batch))
            results[target, kind] = scenario.failures(seen["out"], embeddings)
            if kind is None:
                results[target, "cosines"] = scenario.value_cosines(seen["out"], embeddings)
    return results


@pytest.fixture(scope="module")
def outcomes():
    (results,) = run_local_ranks(_megatron_recall, 1, TARGETS, [None, *mutants.REJECTED_BY], timeout=300)
    return results


@pytest.mark.parametrize("target", TARGETS)
def test_ttt_mlp_recalls_a_value_only_where_it_should(outcomes, target):
    assert outcomes[target, None] == {}
    cosines = outcomes[target, "cosines"]
    assert min(cosines[c.name] for c in scenario.CASES if c.expect is not None) > 0.95


@pytest.mark.parametrize("kind", mutants.REJECTED_BY)
@pytest.mark.parametrize("target", TARGETS)
def test_check_rejects_mutant_in_ttt_mlp(outcomes, target, kind):
    bad = outcomes[target, kind]
    assert mutants.REJECTED_BY[kind] <= bad.keys(), bad
