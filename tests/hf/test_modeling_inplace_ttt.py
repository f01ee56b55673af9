"""The self-contained HF In-Place TTT modeling code against plain transformers and a float64 per-chunk loop.

The reference runs transformers' own Qwen3/Llama with the TTT layers' MLP outputs replaced (forward hooks)
by an obviously-correct loop: per row, per chunk, apply then update, target conv per token inside the chunk.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassError
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from ttt_train.models.hf.remote_code.configuration_inplace_ttt import (
    InPlaceTTTLlamaConfig,
    InPlaceTTTQwen3Config,
)
from ttt_train.models.hf.remote_code.modeling_inplace_ttt import (
    CACHE_ARG,
    InPlaceTTTCache,
    InPlaceTTTLlamaForCausalLM,
    InPlaceTTTQwen3ForCausalLM,
)
from ttt_train.models.hf.remote_files import write_remote_code

# `make test-compat` also runs the tests marked `compat` under transformers 4.57: every forward, cache and
# loading path once; beam search, left padding and the op comparison only here (they add time, not paths).

SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
FAMILIES = {"qwen3": (InPlaceTTTQwen3Config, InPlaceTTTQwen3ForCausalLM, Qwen3Config, Qwen3ForCausalLM),
            "llama": (InPlaceTTTLlamaConfig, InPlaceTTTLlamaForCausalLM, LlamaConfig, LlamaForCausalLM)}
CHUNK = 4


def ttt_model(family="qwen3", *, randomize=True, dtype=torch.float32, seed=0, **ttt):
    """A tiny TTT model (layers 0 and 2, chunk 4) with random non-zero target parameters and an inner lr
    that moves the logits by ~0.1 (the token embeddings, std 0.02, need a larger one than the MLP input)."""
    cfg_cls, lm_cls = FAMILIES[family][:2]
    lr = 100.0 if ttt.get("ttt_target") == "input_embed" else 2.0
    keys = dict(ttt_mode=True, ttt_layers=[0, 2], ttt_chunk=CHUNK, ttt_lr=lr, ttt_target="hidden_states")
    torch.manual_seed(seed)
    model = lm_cls(cfg_cls(**SHAPE, **{**keys, **ttt}))
    if randomize:
        with torch.no_grad():
            for mlp in model.model.ttt_mlps:
                mlp.ttt_conv.weight.normal_(0, 0.5)
                mlp.ttt_proj.weight.normal_(0, 0.5)
    return model.to(dtype).eval()


def plain_copy(model, family="qwen3"):
    """transformers' own model with the TTT model's base weights (every non-TTT tensor, strictly)."""
    plain_cfg_cls, plain_cls = FAMILIES[family][2:]
    plain = plain_cls(plain_cfg_cls(**SHAPE)).to(model.dtype).eval()
    state = {k: v for k, v in model.state_dict().items() if ".ttt_" not in k}
    plain.load_state_dict(state, strict=True)
    return plain


def ref_ttt_mlp(mlp, x, src, cfg):
    """Float64 per-chunk loop for one row: x, src ``[T, d]`` -> ``[T, d]`` (METHOD.md sections 2-3)."""
    f64 = {n: p.detach().double() for n, p in mlp.named_parameters()}
    x, src = x.double(), src.double()
    z = F.silu(x @ f64["gate_proj.weight"].T) * (x @ f64["up_proj.weight"].T)
    w = f64["down_proj.weight"].clone()
    conv, proj = f64["ttt_conv.weight"], f64.get("ttt_proj.weight")
    k, p, C = conv.shape[-1], conv.shape[-1] // 2, cfg.ttt_chunk
    out = []
    for c0 in range(0, x.shape[0], C):
        zc, sc = z[c0:c0 + C], src[c0:c0 + C]
        out.append(zc @ w.T)
        v = torch.zeros_like(sc)
        for t in range(len(sc)):
            for j in range(k):
                if 0 <= t + j - p < len(sc):
                    v[t] += conv[:, 0, j] * sc[t + j - p]
        if proj is not None:
            v = v @ proj
        u = cfg.ttt_lr * v.T @ zc
        tau = cfg.ttt_max_update_norm
        if tau is not None and u.norm() > tau:
            u = u * (tau / u.norm())
        w = w + u
    return torch.cat(out)


def reference_logits(model, ids, family="qwen3"):
    """Float64 logits ``[T, V]`` of one unpadded row: plain transformers + hooked reference TTT MLPs."""
    cfg = model.config
    plain = plain_copy(model, family).double()
    ttt_mlps = {m.layer_idx: m for m in model.model.ttt_mlps}
    seen = {}
    plain.model.embed_tokens.register_forward_hook(lambda mod, a, out: seen.update(embeds=out))
    for i, mlp in ttt_mlps.items():
        def hook(mod, args, out, mlp=mlp):
            x = args[0][0]
            src = seen["embeds"][0] if cfg.ttt_target == "input_embed" else x
            return ref_ttt_mlp(mlp, x, src, cfg).unsqueeze(0)
        plain.model.layers[i].mlp.register_forward_hook(hook)
    with torch.no_grad():
        return plain(ids.unsqueeze(0), use_cache=False).logits[0]


def left_pad(rows, pad_id=0):
    """Left-padded ids, attention mask and position ids for a list of 1-D id tensors."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask, (mask.cumsum(1) - 1).clamp_min(0)


@pytest.mark.compat
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_fresh_ttt_model_equals_plain_transformers(family):
    model = ttt_model(family, randomize=False)  # conv zero: V = 0 whatever ttt_proj's random diagonal
    assert model.model.ttt_mlps[0].ttt_proj.weight.diagonal().abs().min() > 0
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, plain_copy(model, family)(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.compat
@pytest.mark.parametrize("family,target,tau", [("qwen3", "hidden_states", None), ("qwen3", "input_embed", 0.5),
                                               ("llama", "input_embed", None), ("llama", "hidden_states", 0.5)])
def test_full_forward_equals_float64_reference(family, target, tau):
    model = ttt_model(family, dtype=torch.float64, ttt_target=target, ttt_max_update_norm=tau)
    ids = torch.randint(0, SHAPE["vocab_size"], (11,))  # 3 chunks, the last one partial
    with torch.no_grad():
        got = model(ids.unsqueeze(0)).logits[0]
        model.config.ttt_max_update_norm = None
        free = model(ids.unsqueeze(0)).logits[0]
        model.config.ttt_max_update_norm = tau
        base = plain_copy(model, family)(ids.unsqueeze(0)).logits[0]
    torch.testing.assert_close(got, reference_logits(model, ids, family), rtol=0, atol=1e-10)
    assert (got - base)[CHUNK:].abs().max() > 1e-2  # TTT changes every token after the first chunk ...
    torch.testing.assert_close(got[:CHUNK], base[:CHUNK], rtol=0, atol=1e-12)  # ... and none of the first
    if tau is not None:
        assert (got - free).abs().max() > 1e-3  # the clip is active


def test_ttt_mlp_equals_ttt_train_op_in_release_orientation():
    """Pins the contract's tensor orientation: ``mlp.ttt_proj.weight`` is ttt-train's ``proj.weight``
    transposed, ``mlp.ttt_conv.weight`` is its ``conv.weight`` as is (ttt-train's own reference op)."""
    from ttt_train.ops.inplace_ttt import inplace_ttt_reference
    from ttt_train.ops.target import LMAlignedTarget

    model = ttt_model(dtype=torch.float64, ttt_max_update_norm=0.5)
    mlp, cfg = model.model.ttt_mlps[0], model.config
    seen = {}
    mlp.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(torch.randint(0, SHAPE["vocab_size"], (2, 11)))
        target = LMAlignedTarget(SHAPE["hidden_size"], cfg.ttt_conv_size, dtype=torch.float64)
        target.conv.weight.copy_(mlp.ttt_conv.weight)
        target.proj.weight.copy_(mlp.ttt_proj.weight.T)
        x = seen["x"]
        z = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        want = inplace_ttt_reference(z, target(x, CHUNK), mlp.down_proj.weight, chunk_size=CHUNK, lr=cfg.ttt_lr,
                                     max_update_norm=cfg.ttt_max_update_norm)
    torch.testing.assert_close(seen["out"], want, rtol=0, atol=1e-12)


@pytest.mark.compat
def test_cache_in_pieces_equals_full_forward():
    """Prefill and decode in arbitrary pieces (within a chunk, across several, ending on a boundary)."""
    model = ttt_model(ttt_target="input_embed", ttt_max_update_norm=2.0)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 23))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache, outs, s = InPlaceTTTCache(config=model.config), [], 0
        for n in (3, 6, 3, 1, 1, 9):
            outs.append(model(ids[:, s:s + n], **{CACHE_ARG: cache}, use_cache=True).logits)
            s += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=2e-5)
    assert cache.ttt_pending == [23 % CHUNK] * 2


def greedy_check(model, ids, mask=None, new=13, **gen):
    """Generate greedily; every step's logits equal the full forward's (hence the argmax too)."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, min_new_tokens=new,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, **gen)
    seq, steps = out.sequences, torch.stack(out.logits, 1)
    full_mask = None if mask is None else torch.cat([mask, torch.ones_like(seq[:, ids.shape[1]:])], 1)
    pos = None if mask is None else (full_mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(seq, attention_mask=full_mask, position_ids=pos, use_cache=False).logits[:, ids.shape[1] - 1:-1]
    torch.testing.assert_close(steps, full, rtol=0, atol=2e-5)
    assert torch.equal(seq[:, ids.shape[1]:], full.argmax(-1))
    return seq[:, ids.shape[1]:], steps


@pytest.mark.compat
@pytest.mark.parametrize("prompt,prefill", [(5, None), (10, None), (10, 3)])
def test_generate_equals_full_forward_argmax(prompt, prefill):
    """13 new tokens after a 5- or 10-token prompt cross >= 3 chunk boundaries (10: multi-chunk prefill,
    in one forward or in pieces of 3 tokens with transformers' ``prefill_chunk_size``)."""
    model = ttt_model(family="llama" if prompt == 10 else "qwen3", ttt_target="input_embed")
    greedy_check(model, torch.randint(1, SHAPE["vocab_size"], (1, prompt)), prefill_chunk_size=prefill)  # 0: pad


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the TTT state with the keys and values (no cache: full forwards every step)."""
    model = ttt_model(ttt_max_update_norm=2.0)
    ids = torch.randint(1, SHAPE["vocab_size"], (2, 6))
    kw = dict(max_new_tokens=9, min_new_tokens=9, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw))


def test_left_padded_batch_equals_rows_alone():
    model = ttt_model(ttt_max_update_norm=2.0)
    rows = [torch.randint(1, SHAPE["vocab_size"], (n,)) for n in (11, 6, 9)]
    ids, mask, pos = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        for b, r in enumerate(rows):
            torch.testing.assert_close(batch[b, -len(r):], model(r.unsqueeze(0)).logits[0], rtol=0, atol=2e-5)
    tokens, logits = greedy_check(model, ids, mask, new=9)  # every row crosses >= 2 chunk boundaries
    for b, r in enumerate(rows):
        alone_tokens, alone_logits = greedy_check(model, r.unsqueeze(0), new=9)
        assert torch.equal(tokens[b], alone_tokens[0])
        torch.testing.assert_close(logits[b], alone_logits[0], rtol=0, atol=2e-5)


@pytest.mark.compat
def test_state_is_float32_under_bf16_weights():
    model = ttt_model(dtype=torch.bfloat16)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10))
    cache = InPlaceTTTCache(config=model.config)
    with torch.no_grad():
        got = model(ids, **{CACHE_ARG: cache}, use_cache=True).logits
        want = ttt_model(dtype=torch.float32)(ids).logits
    states = [cache.ttt_state[m.layer_idx]["delta"] for m in model.model.ttt_mlps]
    assert all(s.dtype == torch.float32 and s.abs().sum() > 0 for s in states)
    assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() < 0.1


@pytest.mark.compat
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_round_trip_and_remote_code_loading(family, tmp_path):
    model = ttt_model(family, ttt_target="input_embed")
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 10))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", trust_remote_code=True).eval()
    assert type(loaded).__name__ == type(model).__name__ and type(loaded) is not type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)

    # the exporter's way: its own safetensors, then write_remote_code(out_dir, config) writes code + config.json
    out = tmp_path / "export"
    model.save_pretrained(out, safe_serialization=True)
    (out / "config.json").unlink()
    config = FAMILIES[family][0](**SHAPE, **{k: getattr(model.config, k) for k in model.config.to_dict()
                                             if k.startswith("ttt_")})
    write_remote_code(out, config)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == family and set(saved["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    over = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, ttt_lr=0.25,
                                                ttt_max_update_norm=0.5).eval()
    assert (over.config.ttt_lr, over.config.ttt_max_update_norm) == (0.25, 0.5)
    model.config.ttt_lr, model.config.ttt_max_update_norm = 0.25, 0.5
    with torch.no_grad():
        torch.testing.assert_close(over(ids).logits, model(ids).logits, rtol=0, atol=0)
    plain = AutoModelForCausalLM.from_pretrained(out)  # no remote code: the base model, without In-Place TTT
    assert type(plain) is FAMILIES[family][3] and not hasattr(plain.model, "ttt_mlps")
    with pytest.raises(ValueError, match="config.ttt_lr"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, ttt_lr=-1.0)


@pytest.mark.compat
def test_bad_input_is_named(tmp_path):
    with pytest.raises(ValueError, match="Qwen3Config has no In-Place TTT modeling code"):
        write_remote_code(tmp_path, Qwen3Config(**SHAPE))
    with pytest.raises(StrictDataclassError, match=r"config.ttt_layers .*\[0, 3\)"):
        InPlaceTTTQwen3Config(**SHAPE, ttt_mode=True, ttt_layers=[3])
    with pytest.raises(StrictDataclassError, match="config.ttt_target"):
        InPlaceTTTQwen3Config(**SHAPE, ttt_mode=True, ttt_layers=[0], ttt_target="embeddings")
    model = ttt_model()
    ids = torch.randint(0, SHAPE["vocab_size"], (1, 5))
    with pytest.raises(ValueError, match="InPlaceTTTCache"):
        model(ids, **{CACHE_ARG: DynamicCache(config=model.config)}, use_cache=True)
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(ids, attention_mask=torch.ones(1, 1, 5, 5))
