"""The associative-recall scenario every mechanism test runs, and its check.

With a target that makes ``V_t`` the next token's vector (conv tap for ``t+1``, identity projection)
and keys ``z`` that give every token id its own near-orthogonal direction, the update of a chunk
holding ``key value`` is ``lr * v_value z_key^T`` (plus cross-talk), so a later chunk of the same
document reading ``key`` outputs ``W_down z_key + lr * ||z_key||^2 v_value``: the value's direction
once ``lr ||z||^2 ||v||`` outweighs ``||W_down z||`` and the cross-talk. Each row of the batch is one
:class:`Case` (``SEQ`` tokens, chunk ``CHUNK``): the rows that must recall, and the rows where an
In-Place TTT layer done right must not (the same chunk, another document, before the pair was read,
a pair split by a chunk edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 8
SEQ = 32
KEY, VALUE, DECOY = 1, 2, 3
FILLER = range(4, 60)  # filler token ids: never the key, its value or the decoy
RECALL_COS = 0.75  # recalled: cosine with the value's embedding at least this ...
RECALL_MARGIN = 0.25  # ... and at least this above the cosine with every other token's embedding
ABSENT_COS = 0.5  # not recalled: cosine with the value's embedding below this


@dataclass(frozen=True)
class Case:
    """One row: ``KEY`` at ``query``, ``placed`` (position -> token) over random filler, a second
    document from ``doc_start`` (None: one document). ``expect`` is the token the layer's output at
    ``query`` must point at, or None when it must not point at ``VALUE``; ``why`` says why."""

    name: str
    placed: dict[int, int]
    query: int
    expect: int | None
    why: str
    doc_start: int | None = None


CASES = (
    Case("recall_far", {2: KEY, 3: VALUE}, 28, VALUE, "pair in chunk 0, key again in chunk 3"),
    Case("recall_next_chunk", {17: KEY, 18: VALUE}, 24, VALUE, "pair in chunk 2, key first in chunk 3"),
    Case("second_document", {2: KEY, 3: DECOY, 14: KEY, 15: VALUE}, 28, VALUE,
         "the second document's pair, not the first's (DECOY)", doc_start=13),
    Case("same_chunk", {17: KEY, 18: VALUE}, 23, None, "pair and key in chunk 2: its update is not applied yet"),
    Case("before_pair", {7: KEY, 9: KEY, 10: VALUE}, 7, None, "key read in chunk 0, the pair only in chunk 1"),
    Case("other_document_at_edge", {2: KEY, 3: VALUE}, 28, None, "pair in document 0, key in document 1 "
         "(starting on a chunk edge)", doc_start=16),
    Case("other_document_in_chunk", {9: KEY, 10: VALUE}, 20, None, "pair in document 0, key in document 1 "
         "(starting inside the pair's chunk)", doc_start=13),
    Case("split_by_chunk_edge", {7: KEY, 8: VALUE}, 28, None, "the target's conv never crosses a chunk edge"),
)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens``, ``doc_ids`` ``[len(CASES), SEQ]`` int64: one row per case."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor(list(FILLER))[torch.randint(len(FILLER), (len(CASES), SEQ), generator=g)]
    doc_ids = torch.zeros(len(CASES), SEQ, dtype=torch.long)
    for row, case in enumerate(CASES):
        for pos, tok in {**case.placed, case.query: KEY}.items():
            tokens[row, pos] = tok
        if case.doc_start is not None:
            doc_ids[row, case.doc_start:] = 1
    return tokens, doc_ids


def cosines(out: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine of one output ``[d]`` with every token's embedding ``[V, d]`` -> ``[V]`` (0 for a zero output)."""
    out, emb = out.double(), embeddings.double()
    return emb @ out / (emb.norm(dim=1) * out.norm()).clamp_min(1e-300)


def failures(outputs: torch.Tensor, embeddings: torch.Tensor, rows=None) -> dict[str, str]:
    """The cases whose rows of ``outputs`` ``[len(CASES), SEQ, d]`` (the layer's output) break their
    expectation, as case name -> what was seen. ``rows`` restricts the check to some case names."""
    bad = {}
    for row, case in enumerate(CASES):
        if rows is not None and case.name not in rows:
            continue
        cos = cosines(outputs[row, case.query], embeddings)
        if case.expect is None:
            if cos[VALUE] >= ABSENT_COS:
                bad[case.name] = f"cos(out, value) = {cos[VALUE]:.3f} >= {ABSENT_COS} ({case.why})"
            continue
        others = cos.clone()
        others[case.expect] = -2.0
        best = int(others.argmax())
        if cos[case.expect] < RECALL_COS or cos[case.expect] - others[best] < RECALL_MARGIN:
            bad[case.name] = (f"cos(out, token {case.expect}) = {cos[case.expect]:.3f}, best other token "
                              f"{best} at {others[best]:.3f} ({case.why})")
    return bad


def value_cosines(outputs: torch.Tensor, embeddings: torch.Tensor) -> dict[str, float]:
    """Per case, the cosine of the query's output with the value's embedding (for reports)."""
    return {case.name: float(cosines(outputs[row, case.query], embeddings)[VALUE]) for row, case in enumerate(CASES)}


def gated_mlp_keys(vocab: int, d: int, h: int, *, embed_norm: float, beta: float = 0.25, gate: float = 3.0,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hand-set token embeddings ``[vocab, d]`` and gated-MLP weights ``W_gate``, ``W_up`` ``[h, d]`` that
    make ``z = silu(H W_gate^T) * (H W_up^T)`` of an RMS-normalised embedding ``H = sqrt(d) e / ||e||``
    a distinct direction per token id, exactly orthogonal for ids ``< d - 1``.

    Every embedding has norm ``embed_norm`` and first coordinate ``beta * embed_norm``; the rest is a row
    of a random orthogonal matrix (ids ``< d - 1``) or a random unit vector. ``W_gate`` reads only the
    first coordinate (pre-activation ``gate`` for every token, so ``silu(gate)`` is a common factor);
    ``W_up`` maps the rest into ``h`` by orthonormal columns. Then ``||z|| = silu(gate) sqrt(d (1 - beta^2))``.
    """
    g = torch.Generator().manual_seed(seed)
    rest = torch.randn(vocab, d - 1, generator=g, dtype=torch.float64)
    rest = rest / rest.norm(dim=1, keepdim=True)
    rest[:d - 1] = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=g, dtype=torch.float64))[0]
    embeddings = torch.cat([torch.full((vocab, 1), beta, dtype=torch.float64), (1 - beta ** 2) ** 0.5 * rest], 1)
    w_gate = torch.zeros(h, d, dtype=torch.float64)
    w_gate[:, 0] = gate / (beta * d ** 0.5)
    w_up = torch.zeros(h, d, dtype=torch.float64)
    w_up[:, 1:] = torch.linalg.qr(torch.randn(h, d - 1, generator=g, dtype=torch.float64))[0]
    return embed_norm * embeddings, w_gate, w_up
