"""The In-Place TTT MLP as a megatron-core module, and the transformer layer that feeds it.

`TTTMLP` is megatron's gated `MLP` (column-parallel fc1 = [W_gate; W_up], row-parallel fc2 = W_down)
whose down-projection runs as In-Place TTT: `linear_fc2.weight` is the fast weights' initial value,
updated chunk by chunk towards the LM-aligned target `V = Conv1D(X) W_target^T`
(`ttt_train.ops`). Tensor parallelism (METHOD.md 6b): each rank updates its own `[d, h/tp]` slice
of W_down from its own columns of Z; the target is computed on every rank from the full-sequence
source and its gradient is summed over the TP group (`copy_to_tensor_model_parallel_region`); the
clipping norm spans the group; the partial outputs are reduced like a row-parallel fc2 output
(all-reduce, or reduce-scatter along the sequence with sequence parallelism).

Per-token document ids travel from `GPTModel.forward(..., padding_mask=doc_ids)` down to each MLP
(megatron-core 0.16.1 routes `padding_mask` through every layer, pipeline stage and activation
recompute; dense models use it for nothing else). The `input_embed` source travels as the
transformer block's `context` argument (unused by self-attention-only GPT layers), which
`TTTTransformerLayer` hands to its MLP; `ttt_train.training.step.forward_step` supplies both.

Collectives, each entered by every rank of its group whatever the documents: over TP, the target's
gradient all-reduce, the sequence gathers (source, doc ids) and the output reduction under SP, the
clip-norm all-reduces (one per update, forward and backward: their number follows the chunk plan,
so TP ranks must see the same doc ids, as they see the same micro-batch) and, while `record_stats`
is on (the driver turns it on for the steps it logs, on every rank alike), one all-reduce of the
statistics per forward; over CP, the prefix scan, forward and (the correction being added on every
rank, masked) backward.
"""

from __future__ import annotations

import logging
import os

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.ops import LMAlignedTarget, inplace_ttt
from ttt_train.ops.cp_scan import (
    ScanStats,
    choose_algorithm,
    cp_exclusive_scan,
    links_of,
    validate_cp_alignment,
)
from ttt_train.runtime import megatron_compat
from ttt_train.runtime.links import LinkConfig


class _KnownMLPFilter(logging.Filter):
    """megatron's TransformerLayer logs "Unknown MLP type" for any MLP class but its own; TTTMLP is a
    subclass of megatron's MLP that resolves its TP group the same way, so that notice is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger(TransformerLayer.__module__).addFilter(_KnownMLPFilter())


class TTTTransformerLayer(TransformerLayer):
    """A megatron `TransformerLayer` that passes the block's `context` (the token embeddings, when
    the TTT target source is `input_embed`) to its MLP before running the usual forward."""

    def forward(self, *args, **kwargs):
        self.mlp.target_source = kwargs.get("context")
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.mlp.target_source = None


class ReplicatedTarget(LMAlignedTarget):
    """`LMAlignedTarget` with megatron's checkpoint interface: its parameters are replicated over
    tensor-parallel ranks (every rank computes the same target)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix, {},
                                                   sharded_offsets, tp_group=ps.get_tensor_model_parallel_group(),
                                                   dp_cp_group=metadata["dp_cp_group"])


class TTTMLP(MLP):
    """Gated MLP with an In-Place TTT down-projection. Input/output `[s, b, d]` (s local under SP).

    Extra parameters: `ttt_target.conv.weight` `[d, 1, k]` and `ttt_target.proj.weight` `[d, d]`,
    replicated over tensor-parallel ranks.
    """

    def __init__(self, config, submodules, ttt: TTTConfig, tp_group=None, pg_collection=None,
                 is_mtp_layer: bool = False, name: str | None = None):
        """Built by megatron's `TransformerLayer` from a `ModuleSpec` (`params={"ttt": ...}`); what
        else the layer passes depends on the megatron-core release (`megatron_compat.mlp_init_kwargs`)."""
        if not config.gated_linear_unit or config.add_bias_linear:
            raise ValueError("In-Place TTT needs a gated MLP without biases (gated_linear_unit=True, "
                             "add_bias_linear=False), as in Qwen3 and Llama-3.1")
        megatron_compat.check_mlp_chunking(config, "In-Place TTT")
        super().__init__(config, submodules, ffn_hidden_size=config.ffn_hidden_size,
                         **megatron_compat.mlp_init_kwargs(tp_group=tp_group, pg_collection=pg_collection, name=name))
        self.ttt = ttt
        self.ttt_lr = float(ttt.lr)
        self.target_source = None
        self.layer_number = None
        self.scan_stats: ScanStats | None = None  # counts of the last context-parallel scan (its backward's too, once run)
        self.record_stats = True  # accumulate statistics in forward (see ttt_stats); the driver sets it per step
        self._stats = None  # the accumulator of ttt_stats(), [STATS_FIELDS] float64, or None
        with torch.random.fork_rng(devices=[]):  # leaves the base model's initialisation untouched
            self.ttt_target = ReplicatedTarget(config.hidden_size, kernel_size=ttt.conv_size, use_proj=ttt.use_proj,
                                                init_std=config.init_method_std, dtype=config.params_dtype,
                                                device=self.linear_fc2.weight.device, init=ttt.target_init,
                                                init_scale=ttt.target_init_scale)
        for param in self.ttt_target.parameters():
            param.sequence_parallel = False

    def set_layer_number(self, layer_number: int) -> None:
        """Called by TransformerLayer (1-based global number); seeds the target's random diagonal
        from it, so every TP rank and every run draws the same initial W_target."""
        self.layer_number = layer_number
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1_000_003 * layer_number + 17)
            self.ttt_target.reset_parameters()

    def _full_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """`[s_local, b, d]` -> `[s, b, d]`: gather along the sequence under sequence parallelism.
        The backward keeps only this rank's slice (the gradient is already summed over TP)."""
        if self.config.sequence_parallel:
            return tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        return x

    def _doc_ids(self, padding_mask: torch.Tensor | None, seq: int) -> torch.Tensor | None:
        """Document ids `[b, s]` for the full sequence this rank's MLP sees."""
        if padding_mask is None:
            return None
        doc_ids = padding_mask.long()
        if doc_ids.shape[1] != seq:  # sequence-parallel scattered by GPTModel
            doc_ids = tensor_parallel.gather_from_sequence_parallel_region(
                doc_ids.t().contiguous(), tensor_parallel_output_grad=False).t()
        if doc_ids.shape[1] != seq:
            raise ValueError(f"TTT layer {self.layer_number}: doc_ids cover {doc_ids.shape[1]} tokens, "
                             f"the sequence has {seq}")
        return doc_ids

    def forward(self, hidden_states, per_token_scale=None, padding_mask=None, **kwargs):
        """hidden_states `[s, b, d]` (the pre-MLP norm output) -> (output `[s, b, d]`, None)."""
        intermediate, _ = self.linear_fc1(hidden_states)
        gate, up = torch.chunk(intermediate, 2, dim=-1)
        z = self.config.activation_func(gate) * up  # [S, b, h/tp]
        seq = z.shape[0]
        if self.ttt.target == "input_embed":
            if self.target_source is None:
                raise RuntimeError(f"TTT layer {self.layer_number} has target=input_embed but received no "
                                   "token embeddings; call the model through ttt_train.training.step.forward_step")
            source = self._full_sequence(self.target_source)
        else:
            source = self._full_sequence(hidden_states)
        doc_ids = self._doc_ids(padding_mask, seq)
        v = self.ttt_target(source.transpose(0, 1), self.ttt.chunk_size, doc_ids)  # [b, S, d]
        v = tensor_parallel.copy_to_tensor_model_parallel_region(v)
        tp_group = self.tp_group  # resolved by megatron's MLP (pg_collection.tp or parallel_state)
        out = self._ttt_down_projection(z.transpose(0, 1), v, doc_ids,
                                        tp_group if tp_group.size() > 1 else None)  # [b, S, d] partial
        out = out.transpose(0, 1).contiguous()
        if self.config.sequence_parallel:
            out = tensor_parallel.reduce_scatter_to_sequence_parallel_region(out)
        else:
            out = tensor_parallel.reduce_from_tensor_model_parallel_region(out)
        return out, None

    def ttt_stats(self) -> dict[str, torch.Tensor]:
        """Statistics of the forwards recorded since `reset_stats()` on this rank, detached float32 0-dim
        tensors (`summarize_ttt_stats`); `ttt_train.training.metrics.gather_ttt_stats` reduces them over
        data- and context-parallel ranks. Identical on the ranks of a TP group; under CP each rank
        covers its own shards. Reading them costs no collective; `.item()` syncs the host.
        """
        if self._stats is None:
            raise RuntimeError(f"TTT layer {self.layer_number}: ttt_stats() before any recorded forward")
        return summarize_ttt_stats(self._stats)

    def stats_accumulator(self) -> torch.Tensor:
        """The raw accumulator `[STATS_FIELDS]` float64 (zeros before any recorded forward)."""
        if self._stats is None:
            return torch.zeros(len(STATS_FIELDS), dtype=torch.float64, device=self.linear_fc2.weight.device)
        return self._stats

    def reset_stats(self) -> None:
        self._stats = None

    @torch.no_grad()
    def _record_stats(self, norms, clipped, delta, v, norm_group) -> None:
        """Add one forward to the accumulator: update norms `[U]` and their clipping, each row's state change
        `delta` `[B, d, h/tp]` relative to W_down (squared norms summed over TP: one small all-reduce,
        entered by every TP rank), and the target rows' norms. Sums and maxima only: a forward recorded
        twice (activation recompute) leaves every mean and maximum unchanged."""
        weight = self.linear_fc2.weight.detach()
        sq = torch.cat([delta.square().sum((1, 2)), weight.float().square().sum().reshape(1).to(delta.dtype)])
        if norm_group is not None:
            torch.distributed.all_reduce(sq, group=norm_group)
        rel = sq[:-1].sqrt() / sq[-1].sqrt().clamp_min(1e-30)
        target = v.detach().float().norm(dim=-1)
        count = norms.new_tensor
        values = torch.stack([x.double().reshape(()) for x in (
            norms.sum(), count(norms.numel()), torch.cat([norms, norms.new_zeros(1)]).max(), clipped.sum(),
            rel.sum(), count(rel.numel()), rel.max(), target.sum(), count(target.numel()), target.max())])
        self._stats = values if self._stats is None else merge_ttt_stats(self._stats, values)

    def _ttt_down_projection(self, z, v, doc_ids, norm_group):
        """z `[b, S, h/tp]`, v `[b, S, d]` -> this rank's partial output `[b, S, d]`."""
        kwargs = dict(chunk_size=self.ttt.chunk_size, lr=self.ttt_lr, max_update_norm=self.ttt.max_update_norm,
                      norm_group=norm_group, return_stats=self.record_stats)
        cp_group = ps.get_context_parallel_group()
        if cp_group.size() > 1:
            return self._context_parallel_ttt(z, v.to(z.dtype), doc_ids, cp_group, kwargs)
        weight = self.linear_fc2.weight
        out = inplace_ttt(z, v.to(z.dtype), weight, doc_ids=doc_ids, **kwargs)
        if self.record_stats:
            out, stats = out
            delta = stats.last_state - weight.detach().to(stats.last_state.dtype)
            self._record_stats(stats.update_norms, stats.clipped, delta, v, norm_group)
        return out

    def _scan_settings(self, cp_group, state: torch.Tensor) -> tuple[str, torch.dtype]:
        """(algorithm, wire dtype) of the CP scan: `parallel.cp_scan` and `parallel.cp_scan_wire`. "auto":
        the faster by the alpha-beta model (`parallel.links`) for this state and this CP group's
        placement (nodes of `LOCAL_WORLD_SIZE` consecutive global ranks under torchrun, else
        `links.gpus_per_node`): the same answer on every rank of the group."""
        wire = torch.bfloat16 if getattr(self.config, "ttt_cp_scan_wire", "fp32") == "bf16" else state.dtype
        choice = getattr(self.config, "ttt_cp_scan", "auto")
        if choice != "auto":
            return choice, wire
        links = getattr(self.config, "ttt_cp_links", None) or LinkConfig()
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", links.gpus_per_node))
        nodes = tuple(r // per_node for r in torch.distributed.get_process_group_ranks(cp_group))
        return choose_algorithm(len(nodes), tuple(state.shape), wire, nodes, *links_of(links)), wire

    def _context_parallel_ttt(self, z, v, doc_ids, cp_group, kwargs):
        """In-Place TTT on this rank's two load-balanced shards (METHOD.md section 6).

        Each shard first runs from `weight` alone: its output and its own update sum (final state
        minus weight: the updates of its last document) need nothing from other ranks. The sums go
        through the distributed exclusive scan (`parallel.cp_scan`: ring or log, see
        `_scan_settings`), and the second shard's run overlaps the scan's first messages (its sum
        is first needed on the ring's return pass, in the log scan's second round). A shard whose first
        token continues the document its received prefix P ends in then adds `Z P^T` on that
        document's tokens: exactly the run from initial state `weight + P`, since updates add up
        and clipping acts per chunk.
        """
        cp = cp_group.size()
        seq = z.shape[1]
        validate_cp_alignment(seq * cp, cp, self.ttt.chunk_size)
        if doc_ids is None:
            doc_ids = torch.zeros(z.shape[0], seq, dtype=torch.long, device=z.device)
        shards = (slice(0, seq // 2), slice(seq // 2, seq))
        weight = self.linear_fc2.weight

        stats = []

        def run(shard):
            out, final, *shard_stats = inplace_ttt(z[:, shard], v[:, shard], weight, doc_ids=doc_ids[:, shard],
                                                   output_final_state=True, **kwargs)
            stats.extend(shard_stats)
            return out, final - weight.to(final.dtype)

        out_first, sum_first = run(shards[0])

        def while_waiting():
            out_second, sum_second = run(shards[1])
            return out_second, [sum_second]

        keys = torch.stack([doc_ids[:, shard][:, -1] for shard in shards])
        self.scan_stats = ScanStats()
        algorithm, wire = self._scan_settings(cp_group, sum_first)
        prefix_keys, prefix_sums, out_second = cp_exclusive_scan(
            keys, [sum_first, None], group=cp_group, layout="load_balanced", while_waiting=while_waiting,
            algorithm=algorithm, stats=self.scan_stats, wire_dtype=wire)
        outputs = []
        for i, (shard, out) in enumerate(zip(shards, (out_first, out_second))):
            docs = doc_ids[:, shard]
            continues = (docs == docs[:, :1]) & (prefix_keys[i] == docs[:, 0])[:, None]  # [B, L]
            # Added unconditionally (masked), never `if continues.any()`: the scan's backward is a
            # collective, so its output must reach every rank's graph whatever the documents are.
            correction = torch.bmm(z[:, shard].to(prefix_sums.dtype), prefix_sums[i].transpose(1, 2))
            outputs.append(out + (continues.unsqueeze(-1) * correction).to(out.dtype))
        if self.record_stats:
            self._record_cp_stats(stats, continues, prefix_sums[1], weight, seq, v, kwargs["norm_group"])
        return torch.cat(outputs, dim=1)

    def _record_cp_stats(self, stats, continues, prefix_sum, weight, seq, v, norm_group) -> None:
        """`_record_stats` of a context-parallel forward: the state the second shard's last chunk reads
        (`continues` `[B, L]`: the second shard's tokens continuing the received prefix `prefix_sum`)."""
        last = stats[1].last_state
        gate = continues[:, (seq // 2 - 1) // self.ttt.chunk_size * self.ttt.chunk_size].to(last.dtype)
        delta = last - weight.detach().to(last.dtype) + gate[:, None, None] * prefix_sum.detach()
        self._record_stats(torch.cat([s.update_norms for s in stats]), torch.cat([s.clipped for s in stats]), delta,
                           v, norm_group)


STATS_FIELDS = ("norm_sum", "norm_count", "norm_max", "clipped_count", "rel_sum", "rel_count", "rel_max",
                "target_sum", "target_count", "target_max")
"""The accumulator of `TTTMLP.ttt_stats`: sums and counts, and maxima (`STATS_MAX`), over recorded forwards."""
STATS_MAX = torch.tensor([name.endswith("_max") for name in STATS_FIELDS])


def merge_ttt_stats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two accumulators `[..., STATS_FIELDS]` as one: sums added, maxima the larger."""
    return torch.where(STATS_MAX.to(a.device), torch.maximum(a, b), a + b)


def summarize_ttt_stats(acc: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics of an accumulator, float32 0-dim tensors:

    - `update_norm_mean`, `update_norm_max`: `||lr V_i^T Z_i||_F` before clipping, of the whole matrix
      (over TP), over the (chunk, last document) updates of every recorded forward;
    - `clipped_fraction`: the fraction of those updates that were clipped (0 without clipping);
    - `fast_weight_rel_change` (mean over rows of all forwards) and `fast_weight_rel_change_max`:
      `||W_end - W_down||_F / ||W_down||_F`, with `W_end` the fast weight the last chunk (of this
      rank's last shard under CP, prefix included) applies to its first document;
    - `target_norm`, `target_norm_max`: mean and largest L2 norm of the target rows `v_t`.
    """
    f = dict(zip(STATS_FIELDS, acc.float().unbind(-1)))
    return {"update_norm_mean": f["norm_sum"] / f["norm_count"].clamp_min(1), "update_norm_max": f["norm_max"],
            "clipped_fraction": f["clipped_count"] / f["norm_count"].clamp_min(1),
            "fast_weight_rel_change": f["rel_sum"] / f["rel_count"].clamp_min(1),
            "fast_weight_rel_change_max": f["rel_max"],
            "target_norm": f["target_sum"] / f["target_count"].clamp_min(1), "target_norm_max": f["target_max"]}
