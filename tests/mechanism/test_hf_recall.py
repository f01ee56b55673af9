"""Associative recall through the exported HF model: the self-contained modeling code that
``write_remote_code`` puts beside the weights, loaded with ``trust_remote_code=True`` (offline), in a
one-layer Qwen3 whose TTT layer has the hand-set weights of the megatron test (embeddings of norm 0.16,
attention output zero, ``gate_proj``/``up_proj`` giving each used token id an orthogonal ``z``,
``ttt_conv`` tap for ``t+1``, ``ttt_proj`` the identity, ``down_proj`` at its random init).

The HF model knows no document ids: a document is a row (left-padded; its chunk grid starts at its
first token), so each scenario row is split into its documents, all run as one batch, and the MLP's
output (a forward hook) is put back in place. Checked in one full forward and through incremental
decoding with the cache (a 5-token prefill, an 11-token piece across two chunk edges, then one token at
a time). Mutants of the exported code (its classes patched after loading): the update's sign, the conv
tap (kernel rolled to ``t`` or flipped to ``t-1``), rows sharing one state (the analogue of a missing
document reset), a chunk's update applied to its own chunk in the full forward (the source of
``_across_chunks`` with apply and update swapped) and in decoding (``_within_chunk`` applying the state
after its update).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import textwrap
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.mechanism import scenario
from ttt_train.models.hf.remote_code.configuration_inplace_ttt import InPlaceTTTQwen3Config
from ttt_train.models.hf.remote_code.modeling_inplace_ttt import InPlaceTTTQwen3ForCausalLM
from ttt_train.models.hf.remote_files import write_remote_code

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
LR = 1.0
EMBED_NORM = 0.16
TARGETS = ("input_embed", "hidden_states")
DECODE_PIECES = (5, 11)  # then one token at a time
RECALLS = {"recall_far", "recall_next_chunk", "second_document"}
# mutant -> {mode: cases it must fail}. Row sharing shows in `other_document_at_edge` only: the other
# rows' documents query in their own first chunk, where no state is applied at all.
REJECTED_BY = {
    "sign": {"full": RECALLS, "decode": RECALLS},
    "tap_t": {"full": RECALLS, "decode": RECALLS},
    "tap_prev": {"full": RECALLS, "decode": RECALLS},
    "rows_share_state": {"full": {"other_document_at_edge"}, "decode": {"other_document_at_edge"}},
    "own_chunk_forward": {"full": {"same_chunk"}},
    "own_chunk_decode": {"decode": {"same_chunk"}},
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported folder (weights + remote code + config.json) and its token embeddings ``[vocab, d]``."""
    out = tmp_path_factory.mktemp("mechanism_hf")
    config = InPlaceTTTQwen3Config(**SHAPE, ttt_mode=True, ttt_layers=[0], ttt_chunk=scenario.CHUNK, ttt_lr=LR,
                                   ttt_target="input_embed")
    torch.manual_seed(0)
    model = InPlaceTTTQwen3ForCausalLM(config)
    d, h = SHAPE["hidden_size"], SHAPE["intermediate_size"]
    embeddings, w_gate, w_up = scenario.gated_mlp_keys(SHAPE["vocab_size"], d, h, embed_norm=EMBED_NORM)
    layer = model.model.layers[0]
    mlp = layer.mlp
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embeddings)
        layer.self_attn.o_proj.weight.zero_()
        mlp.gate_proj.weight.copy_(w_gate)
        mlp.up_proj.weight.copy_(w_up)
        mlp.ttt_conv.weight.zero_()
        mlp.ttt_conv.weight[:, 0, config.ttt_conv_size // 2 + 1] = 1.0  # tap for token t+1
        mlp.ttt_proj.weight.copy_(torch.eye(d))
    model.save_pretrained(out)
    (out / "config.json").unlink()
    write_remote_code(out, config)
    return out, embeddings.float()


def _load(folder, target: str):
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, ttt_target=target).eval()
    assert type(model) is not InPlaceTTTQwen3ForCausalLM  # the folder's own copy of the code
    return model


def _documents():
    """The scenario's tokens and each of its documents as ``(row, start, end)``."""
    tokens, doc_ids = scenario.batch()
    docs = []
    for row in range(len(scenario.CASES)):
        ids = doc_ids[row].tolist()
        bounds = [0] + [t for t in range(1, scenario.SEQ) if ids[t] != ids[t - 1]] + [scenario.SEQ]
        docs += [(row, a, b) for a, b in zip(bounds, bounds[1:])]
    return tokens, docs


def mlp_outputs(model, mode: str) -> torch.Tensor:
    """The TTT MLP's output on the scenario, ``[len(CASES), SEQ, d]``: every document one left-padded
    row, in one forward (``full``) or in pieces through the cache (``decode``)."""
    tokens, docs = _documents()
    T = scenario.SEQ
    ids = torch.zeros(len(docs), T, dtype=torch.long)
    mask = torch.zeros(len(docs), T, dtype=torch.long)
    for i, (row, a, b) in enumerate(docs):
        ids[i, T - (b - a):], mask[i, T - (b - a):] = tokens[row, a:b], 1
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    seen = []
    hook = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        with torch.no_grad():
            if mode == "full":
                model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
            else:
                cache = importlib.import_module(type(model).__module__).InPlaceTTTCache(config=model.config)
                cuts = [0, *torch.tensor(DECODE_PIECES).cumsum(0).tolist(), *range(sum(DECODE_PIECES) + 1, T + 1)]
                for s, e in zip(cuts, cuts[1:]):
                    model(ids[:, s:e], attention_mask=mask[:, :e], position_ids=pos[:, s:e], cache=cache,
                          use_cache=True)
    finally:
        hook.remove()
    out = torch.cat(seen, dim=1)
    back = torch.zeros(len(scenario.CASES), T, out.shape[-1])
    for i, (row, a, b) in enumerate(docs):
        back[row, a:b] = out[i, T - (b - a):]
    return back


def _source_mutant(cls, name: str, move: str, after: str):
    """``cls.name`` recompiled from its source with the line holding ``move`` put after the line holding
    ``after`` (the exported code is the mutated one); fails loudly when the code no longer has them."""
    lines = textwrap.dedent(inspect.getsource(getattr(cls, name))).splitlines()
    found = [[i for i, line in enumerate(lines) if key in line] for key in (move, after)]
    assert all(len(f) == 1 for f in found), f"mutation site gone from {cls.__name__}.{name}: update {__file__}"
    (i,), (j,) = found
    lines.insert(j, lines.pop(i))
    namespace = {}
    exec(compile("\n".join(lines), f"<mutant of {cls.__name__}.{name}>", "exec"),
         vars(inspect.getmodule(cls)), namespace)
    return namespace[name]


def _broken_methods(cls, kind: str | None) -> dict:
    """The methods of the exported MLP class ``cls`` that the mutant ``kind`` replaces, by name."""
    real_update, real_target, real_within = cls.update, cls.target, cls._within_chunk

    def shifted_kernel(self, x):  # the conv tap moved: kernel rolled (tap t) or flipped (tap t-1)
        conv = self.ttt_conv.weight
        kept = conv.data
        conv.data = kept.roll(-1, dims=-1) if kind == "tap_t" else kept.flip(-1)
        try:
            return real_target(self, x)
        finally:
            conv.data = kept

    def within_after_update(self, z, src, st, sdt):  # decoding applies the state its own chunk updated
        real_within(self, z, src, st, sdt)
        delta = st["delta"] if st is not None else None
        return None if delta is None else torch.bmm(z.to(sdt), delta.transpose(1, 2))

    if kind is None:
        return {}
    if kind == "sign":
        return {"update": lambda self, z, x: -real_update(self, z, x)}
    if kind in ("tap_t", "tap_prev"):
        return {"target": shifted_kernel}
    if kind == "rows_share_state":
        return {"update": lambda self, z, x: real_update(self, z, x).sum(0, keepdim=True).expand(len(z), -1, -1)}
    if kind == "own_chunk_forward":
        return {"_across_chunks": _source_mutant(cls, "_across_chunks", move="outs.append(zi @",
                                                 after="state = u if state is None")}
    if kind == "own_chunk_decode":
        return {"_within_chunk": within_after_update}
    raise ValueError(f"unknown mutant {kind!r}; known: {sorted(REJECTED_BY)}")


@contextlib.contextmanager
def installed(model, kind: str | None):
    """The mutant ``kind`` (see ``REJECTED_BY``; None: none) patched into ``model``'s MLP class."""
    cls = type(model.model.layers[0].mlp)
    with contextlib.ExitStack() as stack:
        for name, fn in _broken_methods(cls, kind).items():
            stack.enter_context(mock.patch.object(cls, name, fn))
        yield


@pytest.fixture(scope="module", params=TARGETS)
def loaded(request, exported):
    folder, embeddings = exported
    return _load(folder, request.param), embeddings


@pytest.mark.parametrize("mode", ["full", "decode"])
def test_exported_model_recalls_a_value_only_where_it_should(loaded, mode):
    model, embeddings = loaded
    assert scenario.failures(mlp_outputs(model, mode), embeddings) == {}


def test_decoding_equals_the_full_forward(loaded):
    model, _ = loaded
    full = mlp_outputs(model, "full")
    torch.testing.assert_close(mlp_outputs(model, "decode"), full, rtol=0, atol=1e-6 * full.abs().max().item())


@pytest.mark.parametrize("kind, mode", [(k, m) for k, modes in REJECTED_BY.items() for m in modes])
def test_check_rejects_mutant_of_exported_code(loaded, kind, mode):
    model, embeddings = loaded
    with installed(model, kind):
        bad = scenario.failures(mlp_outputs(model, mode), embeddings)
    assert REJECTED_BY[kind][mode] <= bad.keys(), bad
