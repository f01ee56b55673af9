"""In-Place TTT for transformers' Qwen3 and Llama (self-contained: torch and transformers only).

The models are transformers' own ``Qwen3ForCausalLM`` / ``LlamaForCausalLM`` whose decoder layers listed in
``config.ttt_layers`` get an :class:`InPlaceTTTMLP`: the gated MLP whose down projection ``W_down``
``[d, h]`` is a fast weight updated chunk by chunk while a sequence is read (METHOD.md sections 2-5):

    Z = silu(H W_gate^T) * (H W_up^T)                          # [T, h]
    O_t = Z_t (W_down + S_{chunk(t)})^T,  S_i = sum_{j<i} clip(lr * V_j^T Z_j)
    V = conv_k(X) @ ttt_proj.weight                              # [T, d], X = MLP input or token embeddings

``conv_k`` is depthwise (``ttt_conv.weight`` ``[d, 1, k]``), zero padded by ``(k-1)/2`` inside each chunk;
``clip`` rescales one chunk's ``lr * dW`` to Frobenius norm ``ttt_max_update_norm`` when larger.
Each row's chunk grid starts at its first real token (``attention_mask``); padding never enters a state.
The state ``S`` is float32 (float64 for float64 weights) whatever the weight dtype.

With a cache (:class:`InPlaceTTTCache`, created by ``generate()`` and by ``forward(use_cache=True)``) each
TTT layer keeps per row ``S`` and the tokens of the current, incomplete chunk (their ``Z`` and target source);
tokens inside a chunk use the frozen ``S``, and a chunk's update is added when its last token arrives
(the convolution then sees the whole chunk), which is exactly when a full forward would first use it.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM, LlamaModel, Qwen3ForCausalLM, Qwen3Model
from transformers.modeling_utils import PreTrainedModel

from .configuration_inplace_ttt import InPlaceTTTLlamaConfig, InPlaceTTTQwen3Config, ttt_layer_indices

try:  # transformers 5: initialisers that leave tensors loaded from a checkpoint alone
    from transformers import initialization as _hf_init
except ImportError:  # transformers 4: `_init_weights` only ever sees modules whose weights were not loaded
    _hf_init = None

# The name under which the decoder's forward takes the cache: ``cache`` (transformers 5) or
# ``past_key_values`` (4.x); ``generate()`` keeps it in its model kwargs under the same name.
CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen3Model.forward).parameters else "past_key_values"


def _zeros_(tensor: torch.Tensor) -> torch.Tensor:
    if _hf_init is not None:
        return _hf_init.zeros_(tensor)
    return nn.init.zeros_(tensor)


def _copy_(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    if _hf_init is not None:
        return _hf_init.copy_(tensor, value)
    with torch.no_grad():
        return tensor.copy_(value)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the fast-weight state: float64 for float64 weights, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class InPlaceTTTCache(DynamicCache):
    """transformers' ``DynamicCache`` plus the In-Place TTT state of every TTT layer.

    ``ttt_pending``: per row, the number of tokens of its current incomplete chunk (None before the
    first forward). ``ttt_state[layer]``: ``{"delta": [B, d, h] float32 or None (= 0), "z": [B, C + 1, h],
    "x": [B, C + 1, d]}``: the sum ``S`` of the row's clipped updates and the pending tokens' ``Z`` and
    target source in slots ``0..pending-1`` (slot ``C`` is scratch). Beam search reorders it with the keys.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ttt_pending: list[int] | None = None
        self.ttt_state: dict[int, dict[str, torch.Tensor | None]] = {}

    def _map_ttt(self, fn, rows: list[int]) -> None:
        for st in self.ttt_state.values():
            for key, t in st.items():
                st[key] = fn(t) if t is not None else None
        if self.ttt_pending is not None:
            self.ttt_pending = [self.ttt_pending[i] for i in rows]

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        self._map_ttt(lambda t: t.index_select(0, beam_idx.to(t.device)), beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        rows = [i for i in range(len(self.ttt_pending or [])) for _ in range(repeats)]
        self._map_ttt(lambda t: t.repeat_interleave(repeats, dim=0), rows)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        self._map_ttt(lambda t: t[indices.to(t.device)], torch.as_tensor(indices).tolist())

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("InPlaceTTTCache cannot be cropped: fast-weight updates are not undone; "
                                      "use generation without assisted decoding / contrastive search")
        super().crop(tokens_to_remove)

    def reset(self):
        super().reset()
        self.ttt_pending, self.ttt_state = None, {}


class TTTStep:
    """The chunk bookkeeping of one forward call, shared by every TTT layer.

    The valid (non-padding) tokens of row ``b`` follow its ``p0[b]`` pending tokens on a "compact" axis
    of ``n_chunks * C`` slots whose chunk 0 is the row's current chunk; ``pos`` ``[B, L]`` is each input
    token's compact slot (padding: the scratch slot ``n_chunks * C``); ``complete`` ``[B, n_chunks]`` says
    which chunks are full (their updates are taken); ``pending`` is each row's new pending count.
    """

    def __init__(self, attention_mask, embeds: torch.Tensor, cache: InPlaceTTTCache | None, chunk: int):
        B, L = embeds.shape[:2]
        dev = embeds.device
        if attention_mask is None:
            valid = None
        elif isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 \
                and attention_mask.shape[0] == B and attention_mask.shape[1] >= L:
            valid = attention_mask[:, -L:].bool()
        else:
            shape = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"In-Place TTT needs a 2D attention_mask [batch, past + new] = [{B}, >= {L}] of "
                             f"1 (token) / 0 (padding), got {shape}")
        self.cache, self.embeds, self.C = cache, embeds, chunk
        p0 = cache.ttt_pending if cache is not None and cache.ttt_pending is not None else [0] * B
        if len(p0) != B:
            raise ValueError(f"the InPlaceTTTCache holds {len(p0)} rows but the input has {B}")
        counts = [L] * B if valid is None else valid.sum(1).tolist()
        total = [p + k for p, k in zip(p0, counts)]
        self.n_chunks = max(1, -(-max(total) // chunk))
        rank = torch.arange(L, device=dev).expand(B, L) if valid is None else valid.long().cumsum(1) - 1
        pos = torch.tensor(p0, device=dev).unsqueeze(1) + rank
        self.pos = pos if valid is None else torch.where(valid, pos, self.n_chunks * chunk)
        ends = [(c + 1) * chunk for c in range(self.n_chunks)]
        self.complete_rows = [[b for b in range(B) if total[b] >= e] for e in ends]  # per chunk
        self.complete = torch.tensor([[t >= e for e in ends] for t in total], device=dev)
        self.pending = [t % chunk for t in total]
        self.tail = torch.tensor([t - t % chunk for t in total], device=dev)

    def commit(self) -> None:
        """Record the new pending counts in the cache (after every layer ran)."""
        if self.cache is not None:
            self.cache.ttt_pending = self.pending


class TTTConv(nn.Conv1d):
    """Depthwise conv of the target (``weight`` ``[d, 1, k]``, no bias); initialised to zero."""

    def __init__(self, d: int, k: int):
        super().__init__(d, d, k, groups=d, bias=False)

    def init_ttt(self, std: float) -> None:
        _zeros_(self.weight)


class TTTProj(nn.Linear):
    """Target projection ``[d, d]``, applied as ``conv(X) @ weight``; initialised to zero but a diagonal
    ~ N(0, std^2) (METHOD.md section 3: ``V == 0`` at step 0 while gradient reaches the conv)."""

    def __init__(self, d: int):
        super().__init__(d, d, bias=False)

    def init_ttt(self, std: float) -> None:
        w = self.weight
        _copy_(w, torch.diag(torch.randn(w.shape[0], device=w.device, dtype=w.dtype) * std))


class InPlaceTTTMLP(nn.Module):
    """A gated MLP with an In-Place TTT down projection (module docstring); takes over ``mlp``'s
    ``gate_proj``, ``up_proj``, ``down_proj`` and ``act_fn`` and adds ``ttt_conv`` and ``ttt_proj``.

    ``forward(x)`` ``[B, L, d] -> [B, L, d]`` reads the call's :class:`TTTStep` from ``self.step``
    (set by the model around each forward).
    """

    def __init__(self, mlp: nn.Module, config, layer_idx: int):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn
        d, k = config.hidden_size, config.ttt_conv_size
        self.layer_idx, self.config = layer_idx, config
        self.ttt_conv = TTTConv(d, k)
        self.ttt_proj = TTTProj(d) if config.ttt_proj else None
        self.step: TTTStep | None = None

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """``V = conv_k(x) @ ttt_proj.weight`` of one chunk per row, zero padded at its edges:
        x ``[R, C, d]`` (state dtype) -> ``[R, C, d]``."""
        w = self.ttt_conv.weight.to(x.dtype)
        v = F.conv1d(x.transpose(1, 2), w, padding=w.shape[-1] // 2, groups=x.shape[-1]).transpose(1, 2)
        return v @ self.ttt_proj.weight.to(x.dtype) if self.ttt_proj is not None else v

    def update(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """One full chunk per row: ``clip(lr * V^T Z)`` ``[R, d, h]`` from z ``[R, C, h]``, x ``[R, C, d]``."""
        cfg = self.config
        u = torch.bmm(self.target(x).transpose(1, 2), z) * cfg.ttt_lr
        tau = cfg.ttt_max_update_norm
        if tau is not None:
            norm = torch.linalg.vector_norm(u, dim=(1, 2), keepdim=True)
            u = u * torch.where(norm > tau, tau / norm.clamp_min(torch.finfo(u.dtype).tiny), torch.ones_like(norm))
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = self.step
        if step is None:
            raise RuntimeError("InPlaceTTTMLP runs only inside its In-Place TTT model's forward (it needs the "
                               "attention mask, the cache and the token embeddings)")
        z = self.act_fn(self.gate_proj(x)) * self.up_proj(x)
        src = step.embeds.to(x.device) if self.config.ttt_target == "input_embed" else x  # device_map: any GPU
        st = None
        if step.cache is not None:
            st = step.cache.ttt_state.get(self.layer_idx)
            if st is None:
                B, C = z.shape[0], step.C
                st = step.cache.ttt_state[self.layer_idx] = {
                    "delta": None, "z": z.new_zeros(B, C + 1, z.shape[-1]), "x": src.new_zeros(B, C + 1, src.shape[-1])}
        sdt = state_dtype(z.dtype)
        if step.n_chunks > 1:
            return self._across_chunks(z, src, st, sdt).to(z.dtype)
        corr = self._within_chunk(z, src, st, sdt)
        out = self.down_proj(z)
        return out if corr is None else out + corr.to(out.dtype)

    def _within_chunk(self, z, src, st, sdt):
        """Every new token lies in the rows' current chunk: all use the frozen state; full chunks update it."""
        step, C = self.step, self.step.C
        if st is None:
            return None
        delta = st["delta"]
        corr = torch.bmm(z.to(sdt), delta.transpose(1, 2)) if delta is not None else None
        idx = step.pos.to(z.device).unsqueeze(-1)
        st["z"].scatter_(1, idx.expand(-1, -1, z.shape[-1]), z.to(st["z"].dtype))
        st["x"].scatter_(1, idx.expand(-1, -1, src.shape[-1]), src.to(st["x"].dtype))
        rows = step.complete_rows[0]
        if rows:
            r = torch.tensor(rows, device=z.device)
            u = self.update(st["z"][r, :C].to(sdt), st["x"][r, :C].to(sdt))
            if delta is None:
                delta = st["delta"] = u.new_zeros(z.shape[0], *u.shape[1:])
            delta.index_add_(0, r, u)
        return corr

    def _across_chunks(self, z, src, st, sdt):
        """General case: lay the pending and new tokens out on the compact chunk axis and walk its chunks
        (one GEMM pair per chunk, one ``[B, d, h]`` state); returns the whole down projection
        ``z (W_down + state)^T`` ``[B, L, d]`` in the state dtype."""
        step, C, n = self.step, self.step.C, self.step.n_chunks
        B, h, d = z.shape[0], z.shape[-1], src.shape[-1]
        zc, xc = z.new_zeros(B, n * C + 1, h, dtype=sdt), z.new_zeros(B, n * C + 1, d, dtype=sdt)
        if st is not None:
            zc[:, :C], xc[:, :C] = st["z"][:, :C], st["x"][:, :C]
        idx, complete = step.pos.to(z.device).unsqueeze(-1), step.complete.to(z.device)
        zc.scatter_(1, idx.expand(-1, -1, h), z.to(sdt))
        xc.scatter_(1, idx.expand(-1, -1, d), src.to(sdt))
        state = st["delta"] if st is not None else None
        weight = self.down_proj.weight.to(sdt)  # [d, h]
        outs = []
        for c in range(n):
            zi = zc[:, c * C:(c + 1) * C]
            outs.append(zi @ weight.t() if state is None else torch.bmm(zi, (weight + state).transpose(1, 2)))
            if step.complete_rows[c] and (c < n - 1 or st is not None):
                u = self.update(zi, xc[:, c * C:(c + 1) * C]).where(complete[:, c, None, None], 0.0)
                state = u if state is None else state + u
        outs.append(zc.new_zeros(B, 1, d))  # the scratch slot of padding tokens
        out = torch.cat(outs, 1).gather(1, idx.expand(-1, -1, d))
        if st is not None:
            keep = (step.tail.to(z.device).unsqueeze(1) + torch.arange(C + 1, device=z.device)).clamp_max(n * C).unsqueeze(-1)
            st["z"] = zc.gather(1, keep.expand(-1, -1, h)).to(st["z"].dtype)
            st["x"] = xc.gather(1, keep.expand(-1, -1, d)).to(st["x"].dtype)
            st["delta"] = state
        return out


class _InPlaceTTTModel:
    """Mixin for transformers' decoder-only ``*Model``: TTT MLPs in ``config.ttt_layers``, and a forward
    that hands each TTT layer the call's :class:`TTTStep` (attention mask, cache, token embeddings)."""

    supports_gradient_checkpointing = False

    def __init__(self, config):
        super().__init__(config)
        config.validate_ttt()
        for i in ttt_layer_indices(config):
            self.layers[i].mlp = InPlaceTTTMLP(self.layers[i].mlp, config, i)
        self.post_init()

    @property
    def ttt_mlps(self) -> list[InPlaceTTTMLP]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, InPlaceTTTMLP)]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (TTTConv, TTTProj)):
            module.init_ttt(self.config.initializer_range)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, cache=None, **kwargs):
        """The base model's forward; the cache may be passed as ``cache`` or ``past_key_values`` (either
        transformers major version's name)."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if len(self.ttt_mlps) == 0 or (input_ids is None) == (inputs_embeds is None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   inputs_embeds=inputs_embeds, use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = InPlaceTTTCache(config=self.config)
        if cache is not None and not isinstance(cache, InPlaceTTTCache):
            raise ValueError(f"In-Place TTT needs an InPlaceTTTCache (it carries the fast weights), got "
                             f"{type(cache).__name__}: pass cache=None or InPlaceTTTCache(config=model.config)")
        step = TTTStep(attention_mask, inputs_embeds, cache, self.config.ttt_chunk)
        mlps = self.ttt_mlps
        for mlp in mlps:
            mlp.step = step
        try:
            out = super().forward(attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds,
                                  use_cache=use_cache, **{CACHE_ARG: cache}, **kwargs)
        finally:
            for mlp in mlps:
                mlp.step = None
        step.commit()
        return out


class _InPlaceTTTForCausalLM:
    """Mixin for transformers' ``*ForCausalLM``: builds ``model_class`` as ``self.model`` and makes
    ``generate()`` use an :class:`InPlaceTTTCache`."""

    model_class: type
    supports_gradient_checkpointing = False

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # the base __init__ would build the plain *Model
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        given = model_kwargs.get(CACHE_ARG)
        out = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_ARG)
        if self.model.ttt_mlps and given is None and type(cache) is DynamicCache:  # made by generate(): ours instead
            model_kwargs[CACHE_ARG] = InPlaceTTTCache(config=self.config.get_text_config(decoder=True))
        return out


class InPlaceTTTQwen3Model(_InPlaceTTTModel, Qwen3Model):
    config_class = InPlaceTTTQwen3Config


class InPlaceTTTQwen3ForCausalLM(_InPlaceTTTForCausalLM, Qwen3ForCausalLM):
    config_class = InPlaceTTTQwen3Config
    model_class = InPlaceTTTQwen3Model


class InPlaceTTTLlamaModel(_InPlaceTTTModel, LlamaModel):
    config_class = InPlaceTTTLlamaConfig


class InPlaceTTTLlamaForCausalLM(_InPlaceTTTForCausalLM, LlamaForCausalLM):
    config_class = InPlaceTTTLlamaConfig
    model_class = InPlaceTTTLlamaModel


InPlaceTTTQwen3ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
InPlaceTTTLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
