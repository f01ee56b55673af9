"""Memory-lean In-Place TTT down-projection: a custom autograd function over chunks.

Forward keeps one ``[d, h]`` state per sequence and never materialises per-chunk weights. It
saves the inputs and, per sequence, the state in force for the last chunk. Backward walks the
chunks backwards: it rewinds the state (``W^(i) = W^(i+1) - u_i``, recomputing ``u_i``), carries
``G`` (gradient w.r.t. the state after chunk ``i``: the suffix sum of later chunks' ``dO^T Z`` plus
the final state's gradient), and merges GEMMs that share an operand (METHOD.md section 7):
``[dO_i, V_i]^T Z_i -> [P_i; M_i]`` and ``[dO_i, V_i] [W^(i); A_i] -> dZ_i``, with ``A_i`` the
gradient w.r.t. ``M_i = V_i^T Z_i`` (``lr G_i`` without clipping). A document that ends inside the
sequence gets its end state back by re-summing its chunk updates, so extra memory stays
``O(d h)`` per sequence whatever the number of chunks.
"""

from __future__ import annotations

import torch

from .common import Chunk, TTTStats, check_inputs, chunk_plan, doc_starts, state_dtype


def _clip(m: torch.Tensor, g: torch.Tensor | None, lr: float, tau: float | None, group):
    """Scale ``us`` with ``u = us * m`` and coefficient ``k`` with ``dL/dm = us * (g - k * m)``.

    ``us = lr * min(1, tau / ||lr m||)``; ``k = <g, m> / ||m||^2`` where clipped, else 0. With
    ``group`` the squared norm and the inner product are summed over the group (``h`` sharded).
    Returns ``(us, k, ||m||^2)`` (the last a 0-dim tensor, over the group; None without ``tau``).
    """
    if tau is None:
        return lr, 0.0, None
    flat = m.reshape(-1)
    stats = torch.dot(flat, flat).reshape(1)
    if g is not None:
        stats = torch.cat([stats, torch.dot(g.reshape(-1), flat).reshape(1)])
    if group is not None:
        torch.distributed.all_reduce(stats, group=group)
    sq = stats[0]
    norm = abs(lr) * sq.sqrt()
    clipped = norm > tau
    one = torch.ones_like(sq)
    us = lr * torch.where(clipped, tau / torch.where(clipped, norm, one), one)
    k = torch.where(clipped, stats[1] / torch.where(clipped, sq, one), 0 * one) if g is not None else None
    return us, k, sq


def _add_update_(w: torch.Tensor, v: torch.Tensor, z: torch.Tensor, lr: float, tau: float | None, group,
                 sq_norms: list | None = None) -> None:
    """``w += clip(lr * v^T z)`` in place. With ``sq_norms`` appends ``||v^T z||_F^2`` (0-dim; over
    ``group`` when clipping, this rank's slice otherwise)."""
    if tau is None:
        if sq_norms is None:
            w.addmm_(v.T, z, alpha=lr)
            return
        m = v.T @ z
        w.add_(m, alpha=lr)
        sq_norms.append(torch.dot(m.reshape(-1), m.reshape(-1)))
        return
    m = v.T @ z
    us, _, sq = _clip(m, None, lr, tau, group)
    w.addcmul_(m, us)
    if sq_norms is not None:
        sq_norms.append(sq)


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``dst = a @ b`` (``dst`` may have a lower precision dtype)."""
    if dst.dtype == a.dtype:
        torch.matmul(a, b, out=dst)
    else:
        dst.copy_(a @ b)


class _Row:
    """One sequence: its inputs (converted to the state dtype chunk by chunk) and chunk plan."""

    def __init__(self, z, v, ws, w0, plan: list[Chunk], lr, tau, group, sq_norms: list | None = None):
        self.z, self.v, self.ws, self.w0, self.plan = z, v, ws, w0, plan
        self.lr, self.tau, self.group, self.sdt = lr, tau, group, ws.dtype
        self.sq_norms = sq_norms  # forward only: collects each update's squared norm

    def zs(self, lo, hi):
        return self.z[lo:hi].to(self.sdt)

    def vs(self, lo, hi):
        return self.v[lo:hi].to(self.sdt)

    def add_update_(self, w, ch: Chunk) -> None:
        """``w += clip(lr * V^T Z)`` of the chunk's last document."""
        _add_update_(w, self.vs(ch.last, ch.end), self.zs(ch.last, ch.end), self.lr, self.tau, self.group,
                     self.sq_norms)

    def forward(self, out: torch.Tensor, want_final: bool):
        """Write the outputs into ``out`` ``[T, d]``; return (state used by the last chunk, final
        state or None). The last chunk's update is computed only for the final state."""
        ws, n = self.ws, len(self.plan)
        w = self.w0.clone()
        for i, ch in enumerate(self.plan):
            if ch.reset:
                w = ws.clone()
            _mm_into(out[ch.start:ch.fresh], self.zs(ch.start, ch.fresh), w.T)
            if ch.fresh < ch.end:
                _mm_into(out[ch.fresh:ch.end], self.zs(ch.fresh, ch.end), ws.T)
            if i == n - 1 and not want_final:
                return w, None
            nxt = ws.clone() if ch.fresh < ch.end else (w.clone() if i == n - 1 else w)
            self.add_update_(nxt, ch)
            if i == n - 1:
                return w, nxt
            w = nxt

    def resum(self, i: int) -> torch.Tensor:
        """State used by chunk ``i``'s first document (not reset at ``i``), re-summed from its start
        weight with the same operations as the forward pass."""
        ch = self.plan[i]
        w = (self.w0 if ch.first_doc else self.ws).clone()
        for c in range(ch.doc_chunk, i):
            self.add_update_(w, self.plan[c])
        return w

    def backward(self, do: torch.Tensor, g_final, saved: torch.Tensor, dz: torch.Tensor, dv: torch.Tensor):
        """Fill ``dz`` ``[T, h]`` and ``dv`` ``[T, d]``; return the gradients (state dtype) of
        ``weight`` and of the first document's start weight."""
        plan, ws, lr, tau, n = self.plan, self.ws, self.lr, self.tau, len(self.plan)
        d = ws.shape[0]
        g = g_final  # gradient w.r.t. the state after chunk i (None: zero)
        after = None  # the state after chunk i, when known (chunk i + 1 not a reset)
        g_w = torch.zeros_like(ws)
        g_w0 = None
        wa = ws.new_empty(2 * d, ws.shape[1])  # [W^(i); A_i], the right operand of the merged dZ GEMM
        for i in reversed(range(n)):
            ch = plan[i]
            s, f, e = ch.start, ch.fresh, ch.end
            single = f == e
            rewind = 0 < i < n - 1 and single and not ch.reset and not plan[i + 1].reset
            need_m = rewind or (g is not None and tau is not None)
            # P = dO^T Z of the rows using the carried state; M = V^T Z of the last document
            y = None
            if single:
                zc, do_c = self.zs(s, e), do[s:e].to(self.sdt)
                if need_m:
                    y = torch.cat([do_c, self.vs(s, e)], dim=1)
                    pm = y.T @ zc
                    p, m = pm[:d], pm[d:]
                else:
                    p, m = do_c.T @ zc, None
            else:
                p = do[s:f].to(self.sdt).T @ self.zs(s, f)
                m = self.vs(ch.last, e).T @ self.zs(ch.last, e) if need_m else None
            us, k, _ = _clip(m, g, lr, tau, self.group) if m is not None else (lr, None, None)
            a_grad = None  # gradient w.r.t. M
            if g is not None:
                a_grad = wa[d:]
                if tau is None:
                    torch.mul(g, lr, out=a_grad)
                else:
                    torch.addcmul(g, m, k, value=-1, out=a_grad).mul_(us)
            if i == n - 1:
                w = saved
            elif i == 0:
                w = self.w0
            elif ch.reset:
                w = ws
            elif rewind:  # W^(i) = W^(i+1) - u_i, in place when W^(i+1) is already in the buffer
                w = wa[:d]
                if tau is None:
                    torch.sub(after, m, alpha=lr, out=w)
                else:
                    torch.addcmul(after, m, us, value=-1, out=w)
            else:
                w = self.resum(i)
            if single:
                if a_grad is not None:  # dZ = [dO, V] [W; A], dV = Z A^T
                    if not rewind:
                        w = wa[:d].copy_(w)
                    if y is None:
                        y = torch.cat([do_c, self.vs(s, e)], dim=1)
                    _mm_into(dz[s:e], y, wa)
                    _mm_into(dv[s:e], zc, a_grad.T)
                else:
                    _mm_into(dz[s:e], do_c, w)
                    dv[s:e].zero_()
                g_before = p if g is None else p.add_(g)
            else:
                self._backward_split(ch, do, w, a_grad, dz, dv, g_w)
                if g is not None:
                    g_w += g  # the state after a split chunk is weight + update
                g_before = p
            if i == 0:
                g_w0 = g_before
            elif ch.reset:
                g_w += g_before
                g_before = None
            g, after = g_before, (None if ch.reset else w)
        return g_w, g_w0

    def _backward_split(self, ch: Chunk, do, w, a_grad, dz, dv, g_w) -> None:
        """dz, dv and the fresh rows' weight gradient of a chunk holding several documents."""
        s, f, ls, e = ch.start, ch.fresh, ch.last, ch.end
        _mm_into(dz[s:f], do[s:f].to(self.sdt), w)
        do_f, z_f = do[f:e].to(self.sdt), self.zs(f, e)
        _mm_into(dz[f:e], do_f, self.ws)
        g_w.addmm_(do_f.T, z_f)
        dv[s:ls].zero_()
        if a_grad is None:
            dv[ls:e].zero_()
            return
        dz[ls:e] += self.vs(ls, e) @ a_grad
        _mm_into(dv[ls:e], self.zs(ls, e), a_grad.T)


class _InplaceTTTFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, v, weight, initial_state, plans, lr, tau, group, want_final, want_stats):
        sdt = state_dtype(z.dtype)
        B, T, _ = z.shape
        ws = weight.to(sdt)
        out = torch.empty(B, T, weight.shape[0], dtype=z.dtype, device=z.device)
        saved, finals = [], []
        sq_norms = [] if want_stats else None
        for b in range(B):
            w0 = initial_state[b].to(sdt) if initial_state is not None else ws
            last, final = _Row(z[b], v[b], ws, w0, plans[b], lr, tau, group, sq_norms).forward(out[b], want_final)
            saved.append(last)
            finals.append(final)
        saved = torch.stack(saved)
        ctx.save_for_backward(z, v, weight, initial_state, saved)
        ctx.plans, ctx.lr, ctx.tau, ctx.group = plans, lr, tau, group
        ctx.set_materialize_grads(False)
        final = torch.stack(finals) if want_final else None
        if not want_stats:
            return out, final, None, None
        norms = torch.stack(sq_norms) if sq_norms else ws.new_zeros(0)
        if tau is None and group is not None:  # clipping sums them over the group already
            torch.distributed.all_reduce(norms, group=group)
        norms = norms.sqrt_().mul_(abs(lr))
        last = saved.detach()
        ctx.mark_non_differentiable(norms, last)
        return out, final, norms, last

    @staticmethod
    def backward(ctx, d_out, d_final=None, *_stats):
        z, v, weight, initial_state, saved = ctx.saved_tensors
        sdt = state_dtype(z.dtype)
        B, T, _ = z.shape
        ws = weight.to(sdt)
        if d_out is None:
            d_out = torch.zeros(B, T, weight.shape[0], dtype=z.dtype, device=z.device)
        dz = torch.empty(z.shape, dtype=z.dtype, device=z.device)  # every row is written
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)  # rows with no used update: zeroed in the walk
        g_w = torch.zeros_like(ws)
        g_init = torch.empty_like(initial_state) if initial_state is not None else None
        for b in range(B):
            w0 = initial_state[b].to(sdt) if initial_state is not None else ws
            row = _Row(z[b], v[b], ws, w0, ctx.plans[b], ctx.lr, ctx.tau, ctx.group)
            g_final = d_final[b].to(sdt) if d_final is not None else None
            gw_b, gw0_b = row.backward(d_out[b], g_final, saved[b], dz[b], dv[b])
            g_w += gw_b
            if g_init is not None:
                g_init[b] = gw0_b
            else:
                g_w += gw0_b
        return dz, dv, g_w.to(weight.dtype), g_init, None, None, None, None, None, None


def inplace_ttt(z: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, *, chunk_size: int, lr: float,
                doc_ids: torch.Tensor | None = None, max_update_norm: float | None = None,
                initial_state: torch.Tensor | None = None, output_final_state: bool = False, norm_group=None,
                return_stats: bool = False):
    """In-Place TTT down-projection (METHOD.md sections 2-5), fast path.

    z ``[B, T, h]``, v ``[B, T, d]`` (targets), weight ``[d, h]`` (``W_down``) -> ``[B, T, d]`` in
    z's dtype. Chunk ``i`` (tokens ``[i C, (i+1) C)``; ``T`` need not be a multiple of ``C``) uses
    the fast weight of its document: its start weight (``initial_state`` ``[B, d, h]`` for the
    row's first document, default ``weight``; ``weight`` for every later document) plus
    ``clip(lr * V_j^T Z_j)`` of that document's tokens of each earlier chunk ``j``. ``doc_ids``
    ``[B, T]`` (non-decreasing ints) marks documents; ``max_update_norm`` clips each (chunk,
    document) update to that Frobenius norm; ``norm_group`` is the process group ``h`` is sharded
    over (tensor parallelism), over which clip norms are summed: one all-reduce per update, so every
    rank of the group must pass the same ``doc_ids``, ``T`` and ``chunk_size``. With ``output_final_state`` also
    returns the last document's fast weight after the last chunk, ``[B, d, h]`` float32 (float64
    for float64 inputs), differentiable. State and updates accumulate in float32 for half inputs.
    With ``return_stats`` also returns (last) a :class:`TTTStats` (detached, no host sync; one extra
    all-reduce over ``norm_group`` when it is set without clipping).
    """
    lr, tau = check_inputs(z, v, weight, chunk_size=chunk_size, lr=lr, doc_ids=doc_ids,
                           max_update_norm=max_update_norm, initial_state=initial_state)
    B, T, _ = z.shape
    plans = [chunk_plan(starts, T, chunk_size) for starts in doc_starts(doc_ids, B)]
    out, final, norms, last = _InplaceTTTFunction.apply(z, v, weight, initial_state, plans, lr, tau, norm_group,
                                                        bool(output_final_state), bool(return_stats))
    result = (out, final) if output_final_state else (out,)
    if return_stats:
        result += (TTTStats(norms, norms > tau if tau is not None else torch.zeros_like(norms, dtype=torch.bool),
                            last),)
    return result if len(result) > 1 else out
