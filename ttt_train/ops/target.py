"""The LM-aligned TTT target ``V = Conv1D_k(X) W_target^T`` (METHOD.md section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .inplace_ttt.common import check_doc_ids


def chunked_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, chunk_size: int,
                           doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise "same" convolution (``F.conv1d`` cross-correlation, zero padding ``(k-1)/2``) applied
    to each chunk of ``chunk_size`` tokens separately and never across a change of ``doc_ids``.

    x ``[B, T, d]``, weight ``[d, 1, k]`` (k odd), doc_ids ``[B, T]`` or None -> ``[B, T, d]``:
    ``y_t = sum_j weight[:, 0, j + p] * x_{t+j}`` over ``|j| <= p`` with ``t + j`` in ``t``'s chunk
    and document.
    """
    B, T, d = x.shape
    k = weight.shape[-1]
    p = k // 2
    pos = torch.arange(T, device=x.device)
    xp = F.pad(x, (0, 0, p, p))
    docs = F.pad(doc_ids, (p, p), value=-1) if doc_ids is not None else None
    y = x * weight[:, 0, p]
    for j in range(-p, p + 1):
        if j == 0:
            continue
        src = pos + j
        keep = (src >= 0) & (src < T) & (src.div(chunk_size, rounding_mode="floor") == pos // chunk_size)
        if docs is not None:
            keep = keep & (docs[:, p + j:p + j + T] == doc_ids)
        y = y + xp[:, p + j:p + j + T] * (keep.to(x.dtype).unsqueeze(-1) * weight[:, 0, j + p])
    return y


class LMAlignedTarget(nn.Module):
    """``V = conv(X) @ proj.weight^T``: ``[B, T, d] -> [B, T, d]``.

    ``conv.weight`` ``[d, 1, k]`` is a depthwise kernel (k odd, no bias) applied per chunk with zero
    "same" padding inside the chunk and never across a document boundary (:func:`chunked_depthwise_conv`);
    ``proj.weight`` ``[d, d]`` is an ``nn.Linear(d, d, bias=False)`` weight (``use_proj=False`` drops
    it). The official release computes ``conv(X) @ ttt_proj.weight``: its ``mlp.ttt_proj.weight``
    is our ``proj.weight`` transposed (its ``mlp.ttt_conv.weight`` is our ``conv.weight`` as is).
    Init (:meth:`reset_parameters`), by ``init``:
    - ``dropin`` (the paper's, for continual training): conv zero, proj zero but a diagonal
      ~ N(0, init_std^2), so ``V == 0`` at step 0 (the model computes what the base model computes)
      while gradient still reaches the conv;
    - ``next_token`` (from scratch): the conv's tap for token ``t+1`` is 1 (others 0) and proj is
      ``init_scale`` times the identity, so ``V_t`` is the next token's source vector from step 0:
      no saddle at ``V = 0`` for the outer optimiser to leave;
    - ``next_token_difference`` (from scratch): taps +1 at ``t+1`` and -1 at ``t``, so
      ``V_t = init_scale * (x_{t+1} - x_t)``: the change that turns token t's vector into the next
      one's, whose sum over a chunk telescopes, so what all keys share (a common component of Z)
      retrieves almost nothing.
    """

    INITS = ("dropin", "next_token", "next_token_difference")

    def __init__(self, hidden_size: int, kernel_size: int = 5, use_proj: bool = True, init_std: float = 0.02,
                 device=None, dtype=None, init: str = "dropin", init_scale: float = 1.0):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (same padding), got {kernel_size}")
        if init not in self.INITS:
            raise ValueError(f"init must be one of {list(self.INITS)}, got {init!r}")
        if init.startswith("next_token") and kernel_size < 3:
            raise ValueError(f"init=next_token needs a conv kernel of at least 3 (a tap for t+1), got {kernel_size}")
        self.hidden_size, self.kernel_size, self.init_std = hidden_size, kernel_size, init_std
        self.init, self.init_scale = init, float(init_scale)
        kw = {"device": device, "dtype": dtype}
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=False, **kw)
        self.proj = nn.Linear(hidden_size, hidden_size, bias=False, **kw) if use_proj else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv.weight.zero_()
        centre = self.kernel_size // 2
        if self.init != "dropin":
            self.conv.weight[:, 0, centre + 1] = 1.0
        if self.init == "next_token_difference":
            self.conv.weight[:, 0, centre] = -1.0
        if self.proj is not None:
            self.proj.weight.zero_()
            if self.init != "dropin":
                self.proj.weight.diagonal().fill_(self.init_scale)
            else:
                self.proj.weight.diagonal().normal_(0.0, self.init_std)

    def forward(self, x: torch.Tensor, chunk_size: int, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got shape {list(x.shape)}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if doc_ids is not None:
            check_doc_ids(doc_ids, x.shape[0], x.shape[1], x.device)
        y = chunked_depthwise_conv(x, self.conv.weight, chunk_size, doc_ids)
        return self.proj(y) if self.proj is not None else y

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, kernel_size={self.kernel_size}, use_proj={self.proj is not None}, "
                f"init={self.init}")
