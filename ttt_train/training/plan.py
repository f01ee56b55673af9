"""Sizing a run before queueing it: training FLOPs per token and a per-rank memory estimate.

Pure arithmetic on the config dataclasses (no megatron import), for the driver's `run.dry_run=true`
plan and its TFLOP/s and MFU logs.

FLOPs (`model_flops_breakdown`, `flops_per_token`) count every matrix product of a training step
(forward + backward = 3x forward: the backward computes the input and the weight gradient) at
2 FLOPs per multiply-add: QKV and output projections, attention scores and values over the keys a
query attends to (causal, within the sliding window), the gated MLP, the logits, and In-Place TTT
(METHOD.md section 7): per TTT layer 4 more `T x d x h` GEMMs for the memory-lean op (1 forward:
the chunk updates `V_i^T Z_i`; 3 backward: re-summing the state, `lr V_i G_i` into dZ and
`dV_i = lr Z_i G_i^T`) plus the target's depthwise convolution and `d x d` projection.
Not counted: norms, rotary, softmax, activations, the loss, the optimizer, the target recomputed
redundantly on each tensor-parallel rank, and activation recompute (these are model FLOPs, the
usual MFU numerator; full recompute adds one more forward of every layer on the hardware).

Memory (`estimate_memory`) is in bytes per rank, for the pipeline stage that needs the most; the
formulas are written next to each term. Against torch's memory tracker on CPU (tiny models; TP 1/2,
SP, CP 2, recompute none/selective/full, TTT on/off, micro-batch 1/4) the measured forward+backward
peak is 0.65 to 1.2 times the estimated activations + TTT state + logits (0.56 when a CP shard holds
a single TTT chunk, whose backward needs fewer buffers than counted); the test allows 0.6 to 1.4.
The attention terms follow the configured backend: "te" is flash attention (the GPU path);
"local" is megatron's unfused attention at cp 1 and GatherKVAttention (SDPA) at cp > 1, which keep
score matrices of `[heads, s_q, s_k]` (as measured on CPU; impractical at long context).

Context-parallel scan (`scan_cost`): per TTT layer and micro-batch, one scan call per forward
(two with full recompute, which reruns the layer) and one backward, each the messages of
`ttt_train.ops.cp_scan.scan_traffic` (rounds and bytes as the ranks count them) timed by the
alpha-beta model of `parallel.links` on megatron's rank order (`ops.cp_scan.cost`), for the ring
and the log scan; beside it the step's compute at `ASSUMED_MFU` of `logging.peak_tflops`, and a
warning when the chosen scan exceeds `SCAN_WARN_FRACTION` of it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ttt_train.ops.cp_scan import choose_algorithm, links_of, megatron_cp_ranks, scan_seconds, scan_traffic

if TYPE_CHECKING:  # ttt_train.models imports megatron (seconds); the plan needs only the dataclasses' fields
    from ttt_train.layers.ttt_config import TTTConfig
    from ttt_train.models.config import ModelConfig
    from ttt_train.runtime.distributed import ParallelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # as ttt_train.models.config.DTYPES
ATTENTION_COUNTS = ("causal", "full")
RECOMPUTE = (None, "selective", "full")
FP32 = 4  # bytes: main gradients, Adam moments, master weights, the TTT state, the softmax of the loss
GIB = 1024 ** 3
MIB = 1024 ** 2
ASSUMED_MFU = 0.4  # model FLOPs utilisation the plan's compute estimate assumes (of logging.peak_tflops)
SCAN_WARN_FRACTION = 0.05  # warn when the CP scan's estimated time exceeds this fraction of the step's compute


def _ttt_layers(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None) -> list[int]:
    return ttt_cfg.layer_indices(model_cfg.num_layers) if ttt_cfg is not None else []


def padded_vocab(model_cfg: ModelConfig) -> int:
    """Vocabulary rounded up to `make_vocab_size_divisible_by` (as `models.builder.padded_vocab_size`)."""
    multiple = model_cfg.make_vocab_size_divisible_by
    return -(-model_cfg.vocab_size // multiple) * multiple


def attended_keys(seq_length: int, sliding_window: int | None, attention: str = "causal") -> float:
    """Mean number of keys a query attends to: `mean_t min(t, window)` for t = 1..T ("causal"), or
    T ("full": what a kernel that computes the whole masked score matrix does)."""
    if attention not in ATTENTION_COUNTS:
        raise ValueError(f"attention must be one of {ATTENTION_COUNTS}, got {attention!r}")
    t = seq_length
    if attention == "full":
        return float(t)
    w = min(sliding_window or t, t)
    return (w * (w + 1) / 2 + (t - w) * w) / t


def model_flops_breakdown(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, seq_length: int, *,
                          attention: str = "causal") -> dict[str, float]:
    """Training FLOPs (forward + backward) per token by component, summed over all layers:
    `attention_linear` (QKV + output projection), `attention_core` (scores and values), `mlp`,
    `logits`, `ttt_op` (the 4 extra GEMM units of In-Place TTT), `ttt_target` (conv + projection)."""
    m = model_cfg.validate()
    d, h, layers, hd = m.hidden_size, m.ffn_hidden_size, m.num_layers, m.kv_channels
    q_width, kv_width = m.num_attention_heads * hd, m.num_query_groups * hd
    keys = attended_keys(seq_length, m.sliding_window, attention)
    n_ttt = len(_ttt_layers(m, ttt_cfg))
    train = 3 * 2  # (forward + 2 backward GEMMs) x 2 FLOPs per multiply-add
    target = 0.0
    if n_ttt:
        target = train * n_ttt * (ttt_cfg.conv_size * d + (d * d if ttt_cfg.use_proj else 0))
    return {
        "attention_linear": train * layers * d * (2 * q_width + 2 * kv_width),
        "attention_core": train * layers * 2 * q_width * keys,
        "mlp": train * layers * 3 * d * h,
        "logits": train * d * padded_vocab(m),
        "ttt_op": 2 * 4 * n_ttt * d * h,
        "ttt_target": target,
    }


def flops_per_token(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, seq_length: int, *,
                    attention: str = "causal") -> float:
    """Training FLOPs (forward + backward) per token, In-Place TTT included (see the module doc)."""
    return sum(model_flops_breakdown(model_cfg, ttt_cfg, seq_length, attention=attention).values())


def stage_layers(model_cfg: ModelConfig, pp: int, stage: int) -> range:
    """Global indices of the layers pipeline stage `stage` builds (megatron's even split)."""
    if model_cfg.num_layers % pp:
        raise ValueError(f"parallel.pp={pp} must divide model.num_layers={model_cfg.num_layers}")
    per = model_cfg.num_layers // pp
    return range(stage * per, (stage + 1) * per)


def parameters_per_rank(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, parallel: ParallelConfig,
                        stage: int = 0) -> int:
    """Parameters a rank of pipeline stage `stage` holds (tensor-parallel shards, replicated norms
    and TTT targets, the word embeddings on the first stage, the output layer (or, tied, a copy of
    the embeddings when pp > 1) and final norm on the last)."""
    m, tp, pp = model_cfg, parallel.tp, parallel.pp
    d, h, hd = m.hidden_size, m.ffn_hidden_size, m.kv_channels
    q_width, kv_width = m.num_attention_heads * hd, m.num_query_groups * hd
    layer = (2 * d  # input and pre-MLP norms
             + d * (q_width + 2 * kv_width) // tp + q_width * d // tp  # QKV, output projection
             + (2 * hd if m.qk_layernorm else 0)
             + 3 * d * h // tp)  # fc1 = [gate; up], fc2
    ttt_extra = 0
    if ttt_cfg is not None:
        ttt_extra = ttt_cfg.conv_size * d + (d * d if ttt_cfg.use_proj else 0)
    here = stage_layers(m, pp, stage)
    ttt_here = sum(i in here for i in _ttt_layers(m, ttt_cfg))
    count = len(here) * layer + ttt_here * ttt_extra
    embedding = padded_vocab(m) * d // tp
    if stage == 0:
        count += embedding
    if stage == pp - 1:
        count += d + (embedding if (not m.tie_embeddings or pp > 1) else 0)
    return count


# fp32 [d, h/tp] buffers the TTT op's backward holds for the layer being back-propagated, one
# sequence at a time: [W; A] and [P; M] (2 each), the carried G, the rewound or re-summed state and
# the weight gradients of the row and of the batch (measured: 8-9).
TTT_BACKWARD_BUFFERS = 8
# ... and per sequence under context parallelism: both shards' final states, update sums and their
# gradients, the scan's messages both ways, the received prefix sums and their gradients (measured: ~10).
TTT_CP_BUFFERS_PER_SEQUENCE = 10


def _activation_terms(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, parallel: ParallelConfig, *,
                      micro_batch: int, seq_length: int, act_bytes: int) -> dict:
    """Bytes of one micro-batch on one rank: kept for the backward pass per layer (`layer`,
    `ttt_layer`; `core`: the core attention's internals, which any recompute drops; `checkpoint`:
    a layer's input under full recompute), TTT states per TTT layer (`state`), transient
    buffers of the one layer being back-propagated (`workspace`, `ttt_workspace`), `logits`,
    `final_norm`."""
    m, tp, cp = model_cfg, parallel.tp, parallel.cp
    d, hd, a = m.hidden_size, m.kv_channels, act_bytes
    t = micro_batch * seq_length // cp  # tokens of this rank
    d_sp = d // tp if parallel.sequence_parallel and tp > 1 else d  # d-wide tensors between TP regions
    q, kv, h = m.num_attention_heads * hd // tp, m.num_query_groups * hd // tp, m.ffn_hidden_size // tp
    heads = m.num_attention_heads // tp
    # the core attention's internals beyond its inputs and output
    scores = micro_batch * heads * (seq_length // cp) * seq_length * (a + (FP32 if a < FP32 else 0))
    if m.backend == "te":  # flash attention: the fp32 log-sum-exp per query
        core, core_workspace = t * heads * FP32, 0
    elif cp == 1:  # megatron's unfused attention: the softmax output [b, heads, s, s] (fp32 and its
        core, core_workspace = scores, 4 * scores  # cast under bf16); its backward holds ~4 of them
    else:  # GatherKVAttention: SDPA with a mask over the keys and values gathered from the CP group
        core, core_workspace = scores + (cp - 1) * t * 2 * kv * a, 0
    layer = t * a * (4 * d_sp  # two norm inputs, the QKV and fc1 inputs
                     + ((q + kv) if m.qk_layernorm else 0)  # q/k norm inputs
                     + (q + 2 * kv)  # rotated q, k and v
                     + q  # attention output (output projection input)
                     + 4 * h)  # [gate; up], silu(gate), Z
    ttt_layer = layer
    if ttt_cfg is not None:
        # target over this rank's whole sequence (gathered under SP): its source copy padded for the
        # conv, the k-1 shifted masked kernels, the conv output, and V kept by the TTT op
        gathered = t * d if d_sp != d else 0
        ttt_layer += t * d * a * (ttt_cfg.conv_size + 2) + gathered * a
    state = d * h * FP32  # one fast-weight state
    # saved per sequence and TTT layer: the state of the last chunk (each shard's, and the two
    # received prefix sums kept for the correction, under context parallelism)
    saved_states = micro_batch * state * (1 if cp == 1 else 4)
    cp_buffers = TTT_CP_BUFFERS_PER_SEQUENCE * micro_batch if cp > 1 else 0
    return {"layer": layer, "ttt_layer": ttt_layer, "core": core, "checkpoint": t * d_sp * a, "state": saved_states,
            "workspace": core_workspace + 3 * t * h * a,  # + the MLP's gradients [gate; up] and Z
            "ttt_workspace": state * (TTT_BACKWARD_BUFFERS + cp_buffers),
            "logits": t * padded_vocab(m) // tp * (FP32 + a), "final_norm": 2 * t * d_sp * a}


def estimate_memory(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, parallel: ParallelConfig, *,
                    micro_batch: int, seq_length: int, dtype: str = "fp32", recompute: str | None = None,
                    distributed_optimizer: bool = False, dp: int = 1) -> dict:
    """Bytes per rank by component, for the pipeline stage with the largest total.

    - parameters: count x dtype bytes. gradients: count x 4 (megatron DDP's fp32 `main_grad` buffers).
    - optimizer: Adam's two fp32 moments, plus an fp32 master copy under bf16; divided by dp x cp
      with the distributed optimizer (it shards over the data- and context-parallel group).
    - activations: what the layers keep for the backward pass, per micro-batch in flight (1F1B:
      stage r holds pp - r micro-batches); `recompute`: None keeps everything, "selective" drops the
      core attention's internals, "full" keeps each layer's input plus one layer's full set; plus
      the transient buffers of the layer being back-propagated (its attention's and MLP's gradients).
    - ttt_state: the TTT op's saved fast-weight states (one fp32 `[d, h/tp]` per sequence and TTT
      layer, four under context parallelism; only the layer being recomputed under full recompute)
      and the fp32 buffers of the TTT layer being back-propagated.
    - logits (last stage): the fp32 softmax the vocab-parallel loss keeps and the logits' gradient.
    - total: the sum of the above.
    Also `stage` (the pipeline stage described) and `parameter_count`. The scan's traffic: `scan_cost`.
    """
    m = model_cfg.validate()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if seq_length % (2 * parallel.cp if parallel.cp > 1 else 1):
        raise ValueError(f"seq_length={seq_length} must divide into 2 * parallel.cp = {2 * parallel.cp} shards")
    a = torch.empty((), dtype=DTYPES[dtype]).element_size()
    terms = _activation_terms(m, ttt_cfg, parallel, micro_batch=micro_batch, seq_length=seq_length, act_bytes=a)
    ttt_all = _ttt_layers(m, ttt_cfg)
    shard = dp * parallel.cp if distributed_optimizer else 1
    pp = parallel.pp
    best = None
    for stage in range(pp):
        count = parameters_per_rank(m, ttt_cfg, parallel, stage)
        here = stage_layers(m, pp, stage)
        n_ttt = sum(i in here for i in ttt_all)
        n_plain = len(here) - n_ttt
        in_flight = pp - stage
        if recompute == "full":  # layer inputs, and one layer recomputed in full for its backward
            largest = terms["ttt_layer"] if n_ttt else terms["layer"]
            activations = in_flight * len(here) * terms["checkpoint"] + largest + terms["core"]
            ttt_state = terms["state"] if n_ttt else 0
        else:
            core = len(here) * terms["core"] if recompute is None else 0  # selective recomputes it
            activations = in_flight * (n_plain * terms["layer"] + n_ttt * terms["ttt_layer"] + core)
            ttt_state = in_flight * n_ttt * terms["state"]
        ttt_state += terms["ttt_workspace"] if n_ttt else 0
        last = stage == pp - 1
        activations += terms["workspace"] + (terms["final_norm"] if last else 0)
        out = {
            "parameters": count * a,
            "gradients": count * FP32,
            "optimizer": math.ceil(count * (2 + (a < FP32)) * FP32 / shard),
            "activations": activations,
            "ttt_state": ttt_state,
            "logits": terms["logits"] if last else 0,
        }
        out["total"] = sum(out.values())
        out.update(stage=stage, parameter_count=count)
        if best is None or out["total"] > best["total"]:
            best = out
    return best


def scan_cost(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, parallel: ParallelConfig, *, micro_batch: int,
              recompute: str | None = None, num_microbatches: int = 1) -> dict | None:
    """The context-parallel scan of one step on a rank of the pipeline stage with the most TTT layers
    (None without CP or TTT). For "ring" and "log": `rounds` and `sent` / `received` (the most bytes
    one rank moves) of one call (forward, backward), `call_s` (forward, backward) and `step_s`
    estimated; `chosen`: the algorithm `parallel.cp_scan` runs ("auto" resolved as at run time);
    `calls`: (forward, backward) calls per step; `state`: the scan's fp32 state shape (sent in
    `parallel.cp_scan_wire`); `crossing`: CP hops of the ring crossing nodes. The slowest TP rank's
    CP group (megatron's order) is modelled."""
    m = model_cfg.validate()
    n_ttt = max((sum(i in stage_layers(m, parallel.pp, s) for i in _ttt_layers(m, ttt_cfg))
                 for s in range(parallel.pp)), default=0)
    if parallel.cp == 1 or n_ttt == 0:
        return None
    cp, links = parallel.cp, parallel.links
    shape = (micro_batch, m.hidden_size, m.ffn_hidden_size // parallel.tp)
    wire = torch.bfloat16 if parallel.cp_scan_wire == "bf16" else torch.float32  # the TTT state is fp32
    intra, inter = links_of(links)
    forwards = 2 if recompute == "full" else 1
    calls = (n_ttt * num_microbatches * forwards, n_ttt * num_microbatches)
    groups = [tuple(g // links.gpus_per_node for g in megatron_cp_ranks(parallel.tp, cp, t)) for t in range(parallel.tp)]
    out = {"state": shape, "calls": calls, "layers": n_ttt, "forwards_per_layer": forwards}
    for algorithm in ("ring", "log"):
        traffic = scan_traffic(cp, shape, algorithm=algorithm, dtype=wire)
        call = max((scan_seconds(traffic, nodes, intra, inter) for nodes in groups), key=sum)
        out[algorithm] = {"rounds": (traffic.forward.rounds, traffic.backward.rounds),
                          "sent": (traffic.forward.max_bytes_sent, traffic.backward.max_bytes_sent),
                          "received": (traffic.forward.max_bytes_received, traffic.backward.max_bytes_received),
                          "call_s": call, "step_s": calls[0] * call[0] + calls[1] * call[1]}
    worst = max(groups, key=lambda nodes: sum(nodes[c] != nodes[c + 1] for c in range(cp - 1)))
    out["crossing"] = 2 * sum(worst[c] != worst[c + 1] for c in range(cp - 1))
    out["chosen"] = parallel.cp_scan if parallel.cp_scan != "auto" else choose_algorithm(
        cp, shape, wire, worst, intra, inter)
    return out


def step_compute_seconds(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, seq_length: int, tokens_per_step: int,
                         world: int, peak_tflops: float, recompute: str | None = None) -> float:
    """Estimated compute seconds of one step: model FLOPs (+ one forward under full recompute) per rank
    at `ASSUMED_MFU` of `peak_tflops`."""
    flops = flops_per_token(model_cfg, ttt_cfg, seq_length) * tokens_per_step * (4 / 3 if recompute == "full" else 1)
    return flops / world / (peak_tflops * 1e12 * ASSUMED_MFU)


def _format_scan(cost: dict, parallel: ParallelConfig, compute_s: float | None, peak_tflops: float | None) -> list[str]:
    b, d, h = cost["state"]
    links = parallel.links
    wire = parallel.cp_scan_wire
    lines = [f"cp scan (parallel.cp_scan={parallel.cp_scan} -> {cost['chosen']}): state {b} x {d} x {h} fp32, sent "
             f"as {wire} ({b * d * h * (FP32 if wire == 'fp32' else 2) / MIB:.1f} MiB), {cost['layers']} TTT layers x {cost['calls'][1] // cost['layers']} "
             f"micro-batches x ({cost['forwards_per_layer']} forward + 1 backward) calls per step",
             f"  links: {links.gpus_per_node} GPUs per node, intra {links.intra_node_latency_us:g} us "
             f"{links.intra_node_gb_per_s:g} GB/s, inter {links.inter_node_latency_us:g} us "
             f"{links.inter_node_gb_per_s:g} GB/s (parallel.links); ring hops across nodes: {cost['crossing']} of "
             f"{2 * (parallel.cp - 1)}"]
    for algorithm in ("ring", "log"):
        c = cost[algorithm]
        lines.append(f"  {algorithm:<4}: rounds {c['rounds'][0]} fwd / {c['rounds'][1]} bwd, sent per rank "
                     f"{c['sent'][0] / MIB:.1f} / {c['sent'][1] / MIB:.1f} MiB per call, est. "
                     f"{c['call_s'][0] * 1e3:.2f} / {c['call_s'][1] * 1e3:.2f} ms per call, "
                     f"{c['step_s']:.3f} s per step" + ("  <- runs" if algorithm == cost["chosen"] else ""))
    if compute_s is None:
        lines.append("  step compute: no estimate (set logging.peak_tflops)")
        return lines
    share = cost[cost["chosen"]]["step_s"] / compute_s
    lines.append(f"  step compute est. {compute_s:.3f} s per rank ({100 * ASSUMED_MFU:.0f}% of logging.peak_tflops="
                 f"{peak_tflops:g}); the scan ({cost['chosen']}) adds {100 * share:.1f}%")
    if share > SCAN_WARN_FRACTION:
        other = "log" if cost["chosen"] == "ring" else "ring"
        lines.append(f"  WARNING: the cp scan is {100 * share:.1f}% of the step's compute (> "
                     f"{100 * SCAN_WARN_FRACTION:.0f}%); {other}: {100 * cost[other]['step_s'] / compute_s:.1f}%. "
                     f"Fewer CP ranks (more TP or DP), faster links than parallel.links"
                     + (", or parallel.cp_scan_wire=bf16 (half the bytes)" if wire == "fp32" else "") + " shrink it")
    return lines


def format_plan(model_cfg: ModelConfig, ttt_cfg: TTTConfig | None, parallel: ParallelConfig, *,
                micro_batch: int, seq_length: int, dtype: str = "fp32", recompute: str | None = None,
                distributed_optimizer: bool = False, dp: int = 1, tokens_per_step: int | None = None,
                peak_tflops: float | None = None) -> str:
    """Human-readable memory, FLOPs and CP scan tables for one stage of a run (the dry-run plan)."""
    mem = estimate_memory(model_cfg, ttt_cfg, parallel, micro_batch=micro_batch, seq_length=seq_length,
                          dtype=dtype, recompute=recompute, distributed_optimizer=distributed_optimizer, dp=dp)
    flops = model_flops_breakdown(model_cfg, ttt_cfg, seq_length)
    total_flops = sum(flops.values())
    lines = [f"memory per rank (pipeline stage {mem['stage']}, {mem['parameter_count']:,} parameters, {dtype}, "
             f"micro-batch {micro_batch} x {seq_length} tokens, recompute {recompute}, "
             f"{'distributed' if distributed_optimizer else 'replicated'} optimizer over dp={dp})"]
    for key in ("parameters", "gradients", "optimizer", "activations", "ttt_state", "logits", "total"):
        lines.append(f"  {key:<22}{mem[key] / GIB:>10.3f} GiB")
    lines.append(f"training FLOPs per token: {total_flops / 1e9:.3f} GFLOP "
                 f"(TTT {100 * (flops['ttt_op'] + flops['ttt_target']) / total_flops:.1f}%)")
    for key, value in flops.items():
        lines.append(f"  {key:<22}{value / 1e9:>10.3f} GFLOP  {100 * value / total_flops:5.1f}%")
    if tokens_per_step:
        lines.append(f"  per step ({tokens_per_step:,} tokens): {total_flops * tokens_per_step / 1e15:.3f} PFLOP")
    micro_per_step = max(tokens_per_step // (seq_length * micro_batch * dp), 1) if tokens_per_step else 1
    cost = scan_cost(model_cfg, ttt_cfg, parallel, micro_batch=micro_batch, recompute=recompute,
                     num_microbatches=micro_per_step)
    if cost is not None:
        compute = None
        if peak_tflops and tokens_per_step:
            world = parallel.tp * parallel.pp * parallel.cp * dp
            compute = step_compute_seconds(model_cfg, ttt_cfg, seq_length, tokens_per_step, world, peak_tflops,
                                           recompute)
        lines += _format_scan(cost, parallel, compute, peak_tflops)
    return "\n".join(lines)
