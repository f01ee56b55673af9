"""The run plan's FLOPs and memory against brute force: torch's FLOP counter on an independent
transformers Qwen3 and on the TTT op, megatron's real parameter counts, torch's memory tracker."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig
from ttt_train.runtime.distributed import ParallelConfig
from ttt_train.runtime.links import LinkConfig
from ttt_train.training import plan

SMALL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
             head_dim=24, vocab_size=250, make_vocab_size_divisible_by=128)
ACTIVATION_FACTOR = (0.6, 1.4)  # measured peak / estimate (measured: 0.65 to 1.2; module doc of plan)


def _count(fn, *, addmm_inplace: bool = False) -> int:
    """FLOPs torch's counter sees in `fn()` (forward and backward); `addmm_inplace` also counts
    `Tensor.addmm_` (the TTT op's in-place update accumulation, which the counter skips)."""
    def addmm_(self_shape, a_shape, b_shape, out_shape=None, **kwargs):  # self += a @ b: 2 m k n
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    mapping = {torch.ops.aten.addmm_: addmm_} if addmm_inplace else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("tied", [True, False])
def test_flops_equal_torch_count_of_hf_qwen3(tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model_cfg = ModelConfig(**SMALL, tie_embeddings=tied)
    padded = plan.padded_vocab(model_cfg)
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=padded, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, tie_word_embeddings=tied, attn_implementation="eager"))
    batch, seq = 2, 40
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq))

    def step():
        hf(input_ids=tokens, labels=tokens).loss.backward()

    # eager attention multiplies the whole masked score matrix: the "full" count
    expected = plan.flops_per_token(model_cfg, None, seq, attention="full") * batch * seq
    assert _count(step) == expected


@pytest.mark.parametrize("window", [None, 1, 7, 40, 100])
def test_causal_keys_equal_mask_count(window):
    seq = 40
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    if window is not None:
        allowed &= torch.ones(seq, seq, dtype=torch.bool).triu(-(window - 1))
    assert plan.attended_keys(seq, window) == pytest.approx(allowed.sum().item() / seq, rel=1e-12)
    assert plan.attended_keys(seq, window, "full") == seq


def test_ttt_flops_equal_torch_count_of_the_op():
    """The op's extra FLOPs over a plain down-projection are the method's 4 GEMM units per token,
    less what the first and last chunks skip (5 chunk-units of 4n: the last chunk's update, its
    V-part of dZ and dV, the state rewinds of the first and last chunk)."""
    from ttt_train.ops import LMAlignedTarget, inplace_ttt

    b, t, d, h, chunk = 2, 256, 16, 24, 16
    n = t // chunk
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(b, t, h, generator=g, requires_grad=True), torch.randn(b, t, d, generator=g, requires_grad=True)
    w = torch.randn(d, h, generator=g, requires_grad=True)
    ttt = _count(lambda: inplace_ttt(z, v, w, chunk_size=chunk, lr=0.1).square().sum().backward(),
                 addmm_inplace=True)
    plain = _count(lambda: torch.nn.functional.linear(z, w).square().sum().backward())
    model_cfg = ModelConfig(num_layers=1, hidden_size=d, ffn_hidden_size=h, num_attention_heads=2,
                            num_query_groups=2, vocab_size=8)
    ttt_cfg = TTTConfig(every=1, chunk_size=chunk, conv_size=5)
    nominal = plan.model_flops_breakdown(model_cfg, ttt_cfg, t)
    assert (ttt - plain) / (nominal["ttt_op"] * b * t) == pytest.approx(1 - 5 / (4 * n), rel=1e-12)

    target = LMAlignedTarget(d, kernel_size=5)
    x = torch.randn(b, t, d, generator=g, requires_grad=True)
    counted = _count(lambda: target(x, chunk).square().sum().backward())
    conv = 6 * 5 * d  # the chunked depthwise conv runs as elementwise products, which the counter skips
    assert counted == (nominal["ttt_target"] - conv) * b * t


def test_memory_terms_follow_their_formulas():
    model_cfg = ModelConfig(**SMALL)
    ttt_cfg = TTTConfig(every=1, chunk_size=8)
    kw = dict(micro_batch=2, seq_length=64)
    base = plan.estimate_memory(model_cfg, ttt_cfg, ParallelConfig(), **kw)
    count = base["parameter_count"]
    assert (base["parameters"], base["gradients"], base["optimizer"]) == (4 * count, 4 * count, 8 * count)
    bf16 = plan.estimate_memory(model_cfg, ttt_cfg, ParallelConfig(), dtype="bf16", **kw)
    assert (bf16["parameters"], bf16["gradients"], bf16["optimizer"]) == (2 * count, 4 * count, 12 * count)
    sharded = plan.estimate_memory(model_cfg, ttt_cfg, ParallelConfig(cp=2), distributed_optimizer=True, dp=4,
                                   dtype="bf16", **kw)
    assert sharded["optimizer"] == 12 * count / 8  # over dp x cp
    # micro-batch x layers saved [d, h] fp32 states, and the backward's buffers of one layer
    assert base["ttt_state"] == (2 * 2 + plan.TTT_BACKWARD_BUFFERS) * 64 * 96 * 4
    lean = [plan.estimate_memory(model_cfg, ttt_cfg, ParallelConfig(), recompute=r, **kw)["activations"]
            for r in (None, "selective", "full")]
    assert lean[0] > lean[1] > lean[2]
    pipe = plan.estimate_memory(model_cfg, ttt_cfg, ParallelConfig(pp=2), **kw)
    assert pipe["stage"] in (0, 1) and pipe["total"] < base["total"]
    assert base["total"] == sum(base[k] for k in ("parameters", "gradients", "optimizer", "activations",
                                                  "ttt_state", "logits"))


def test_bad_layouts_are_refused_by_name():
    model_cfg = ModelConfig(**SMALL)
    with pytest.raises(ValueError, match="parallel.pp=3 must divide model.num_layers=2"):
        plan.estimate_memory(model_cfg, None, ParallelConfig(pp=3), micro_batch=1, seq_length=64)
    with pytest.raises(ValueError, match="recompute must be one of"):
        plan.estimate_memory(model_cfg, None, ParallelConfig(), micro_batch=1, seq_length=64, recompute="some")
    with pytest.raises(ValueError, match="attention must be one of"):
        plan.flops_per_token(model_cfg, None, 64, attention="sparse")


def test_format_plan_shows_every_component():
    text = plan.format_plan(ModelConfig(**SMALL), TTTConfig(every=1, chunk_size=8), ParallelConfig(cp=2),
                            micro_batch=1, seq_length=64, dtype="bf16", recompute="selective",
                            distributed_optimizer=True, dp=2, tokens_per_step=4096)
    for word in ("parameters", "gradients", "optimizer", "activations", "ttt_state", "logits", "total",
                 "cp scan (parallel.cp_scan=auto -> ", "ring: rounds 2 fwd / 2 bwd", "log : rounds 2 fwd / 1 bwd",
                 "step compute: no estimate (set logging.peak_tflops)", "GFLOP", "ttt_op", "per step"):
        assert word in text, word
    assert "cp scan" not in plan.format_plan(ModelConfig(**SMALL), TTTConfig(every=1, chunk_size=8), ParallelConfig(),
                                             micro_batch=1, seq_length=64)


# ---- the context-parallel scan's cost ------------------------------------------------------------

QWEN3_4B = dict(num_layers=36, hidden_size=2560, ffn_hidden_size=9728, num_attention_heads=32, num_query_groups=8,
                head_dim=128, vocab_size=151936, tie_embeddings=True)


def test_megatron_rank_order_decides_which_cp_hops_cross_nodes():
    from megatron.core.parallel_state import RankGenerator

    from ttt_train.ops.cp_scan import megatron_cp_ranks

    for tp, cp, dp in ((4, 16, 1), (2, 2, 16), (1, 8, 2), (8, 4, 2)):
        groups = RankGenerator(tp=tp, ep=1, dp=dp, pp=1, cp=cp, order="tp-cp-ep-dp-pp").get_ranks("cp")
        ours = [megatron_cp_ranks(tp, cp, t, outer) for outer in range(dp) for t in range(tp)]
        assert sorted(map(tuple, groups)) == sorted(map(tuple, ours)), (tp, cp, dp)


def test_alpha_beta_by_hand():
    from ttt_train.ops.cp_scan import Link, pass_seconds, scan_traffic

    intra, inter = Link(1e-5, 1e11), Link(2e-5, 1e10)
    shape = (1, 100, 100)  # 40,000 bytes of fp32
    ring = scan_traffic(4, shape, algorithm="ring").forward  # 6 hops of 40,016 bytes (depth, key, state)
    assert pass_seconds(ring, [0, 0, 1, 1], intra, inter) == pytest.approx(4 * (1e-5 + 40016 / 1e11)
                                                                           + 2 * (2e-5 + 40016 / 1e10))
    log = scan_traffic(4, shape, algorithm="log", late=False).forward  # 2 rounds, 2 totals per message
    msg = 8 + 2 * (8 + 40000)
    assert pass_seconds(log, [0, 0, 1, 1], intra, inter) == pytest.approx((1e-5 + msg / 1e11) + (2e-5 + msg / 1e10))


def test_paper_stage2_scan_cost_and_warning():
    """Qwen3-4B, 128k, tp 4 x cp 16, 16 micro-batches of one sequence, full recompute, 6 TTT layers."""
    model_cfg, ttt_cfg = ModelConfig(**QWEN3_4B), TTTConfig(every=6, chunk_size=1024)
    parallel = ParallelConfig(tp=4, cp=16, sequence_parallel=True)
    cost = plan.scan_cost(model_cfg, ttt_cfg, parallel, micro_batch=1, recompute="full", num_microbatches=16)
    state = 2560 * 2432 * 4
    assert cost["state"] == (1, 2560, 2432) and cost["calls"] == (6 * 16 * 2, 6 * 16)
    assert cost["ring"]["rounds"] == (30, 30) and cost["log"]["rounds"] == (5, 4)
    assert cost["ring"]["sent"] == (2 * (16 + state), 2 * (8 + state))
    assert cost["log"]["sent"] == (8 * (16 + state), 4 * 8 + 8 * (8 + state))
    assert cost["crossing"] == 14 and cost["chosen"] == "log"  # 2 CP ranks per node: c -> c+1 crosses for odd c
    assert cost["log"]["step_s"] < cost["ring"]["step_s"] / 2
    text = plan.format_plan(model_cfg, ttt_cfg, parallel, micro_batch=1, seq_length=131072, dtype="bf16",
                            recompute="full", distributed_optimizer=True, dp=1, tokens_per_step=16 * 131072,
                            peak_tflops=989.0)
    assert "cp scan (parallel.cp_scan=auto -> log)" in text and "ring hops across nodes: 14 of 30" in text
    assert "WARNING: the cp scan is" in text  # 6.5% by the default links
    bf16 = plan.scan_cost(model_cfg, ttt_cfg, ParallelConfig(tp=4, cp=16, sequence_parallel=True, cp_scan_wire="bf16"),
                          micro_batch=1, recompute="full", num_microbatches=16)
    assert bf16["log"]["sent"] == (8 * (16 + state // 2), 4 * 8 + 8 * (8 + state // 2))
    ring_only = ParallelConfig(tp=4, cp=16, sequence_parallel=True, cp_scan="ring")
    fast = ParallelConfig(tp=4, cp=16, sequence_parallel=True, links=LinkConfig(inter_node_gb_per_s=400.0))
    half = ParallelConfig(tp=4, cp=16, sequence_parallel=True, cp_scan_wire="bf16")  # 3.3%
    for p, warned in ((ring_only, True), (fast, False), (half, False)):
        text = plan.format_plan(model_cfg, ttt_cfg, p, micro_batch=1, seq_length=131072, dtype="bf16",
                                recompute="full", dp=1, tokens_per_step=16 * 131072, peak_tflops=989.0)
        assert ("WARNING: the cp scan is" in text) == warned, text


# ---- against megatron (multi-process) ------------------------------------------------------------

def _measured_activation_peak(model, batch) -> int:
    """Peak bytes torch's memory tracker sees in one forward + backward, parameters and gradients excluded."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from ttt_train.training.step import model_inputs

    tracker = MemTracker()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tracker:
            out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                        **model_inputs(model, batch))
            out.sum().backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    return peak["Total"] - sum(v for k, v in peak.items() if str(k).split(".")[-1] in ("PARAM", "BUFFER", "GRAD"))


def megatron_counts(layouts: list[dict], seq: int, micro_batch: int) -> list[dict]:
    """Per layout: this rank's real parameter count, the plan's count, and the measured and
    estimated activation bytes for each recompute setting (selective only for the first layout;
    model with TTT in layers 0 and 2)."""
    from tests.support.parallel_cases import make_batch
    from ttt_train.models import build_gpt_model, load_model_config, to_transformer_config
    from ttt_train.runtime.distributed import initialize
    from ttt_train.training.step import split_for_context_parallel

    model_cfg = load_model_config("tiny")
    ttt_cfg = TTTConfig(every=2, chunk_size=8, lr=0.1)
    rows = []
    for layout in layouts:
        parallel = ParallelConfig(**layout)
        dp = initialize(parallel)
        from megatron.core import parallel_state as ps

        stage = ps.get_pipeline_model_parallel_rank()
        row = {"layout": layout, "stage": stage,
               "planned": plan.parameters_per_rank(model_cfg, ttt_cfg, parallel, stage)}
        for recompute in (None, "selective", "full") if not layout else (None, "full"):
            config = to_transformer_config(model_cfg, parallel, recompute=recompute)
            model = build_gpt_model(model_cfg, config, ttt=ttt_cfg)
            row["real"] = sum(p.numel() for p in model.parameters())
            if parallel.pp > 1:
                break
            batch = split_for_context_parallel(make_batch(0, micro_batch, seq, model_cfg.vocab_size, with_docs=True))
            est = plan.estimate_memory(model_cfg, ttt_cfg, parallel, micro_batch=micro_batch, seq_length=seq,
                                       recompute=recompute, dp=dp)
            row[recompute] = (_measured_activation_peak(model, batch),
                              est["activations"] + est["ttt_state"] + est["logits"])
        rows.append(row)
    return rows


@pytest.mark.slow
def test_parameters_and_activations_match_megatron():
    from ttt_train.runtime.local_ranks import run_local_ranks

    layouts = [{}, {"tp": 2, "sequence_parallel": True}, {"cp": 2}, {"pp": 2}]
    results = run_local_ranks(functools.partial(megatron_counts, layouts, 64, 4), 2, timeout=240,
                              env={"OMP_NUM_THREADS": "1"})
    for rank_rows in results:
        for row in rank_rows:
            assert row["real"] == row["planned"], row
            for recompute in (None, "selective", "full"):
                if recompute in row:
                    measured, estimated = row[recompute]
                    ratio = measured / estimated
                    assert ACTIVATION_FACTOR[0] <= ratio <= ACTIVATION_FACTOR[1], (row["layout"], recompute, ratio)
