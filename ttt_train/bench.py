"""`python -m ttt_train.bench [hydra overrides]`: the paper's efficiency figure, measured.

For a model with In-Place TTT in every sixth layer and the same model without TTT (same shape, same
random weights), in one run so that a noisy machine disturbs both alike:

- prefill: tokens/s and peak memory of a forward pass over a prompt (batch 1) against the prompt
  length, through the exported HF modeling file (`ttt_train/models/hf/remote_code`);
- train_step: tokens/s and peak memory of one optimizer step (forward, backward, AdamW) through the
  training driver's step (`ttt_train.training.step.run_step` on megatron-core), batch 1;
- decode: greedy decoding tokens/s with the cache (fast weights carried) at each batch size.

Lengths are swept in the configured order and a sweep stops at the first length that does not fit
(out of memory), so `prefill.lengths=[8192,...,131072]` on a GPU measures what fits. Writes
`<out>/bench.json` (also printed as one line) and `<out>/bench.png`. Configuration:
`configs/bench/bench.yaml`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ttt_train.ops.bench import _peak_extra_bytes, _time_ms

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "bench"

# Targets of issue 17, as ratios TTT / baseline measured in the same run.
TARGETS = {"train_tokens_per_s": (">=", 0.93), "train_peak_memory": ("<=", 1.10),
           "prefill_tokens_per_s": (">=", 0.93), "prefill_peak_memory": ("<=", 1.10),
           "decode_tokens_per_s": (">=", 0.90)}


MEMORY_METHOD = {
    "cpu": "torch.profiler(profile_memory=True) CPU-allocator records: peak live bytes allocated during one "
           "prefill forward / one train step beyond those live before it (weights, optimizer state and inputs "
           "excluded)",
    "cuda": "torch.cuda.max_memory_allocated during one prefill forward / one train step minus "
            "memory_allocated before it",
}


def compose(argv: list[str]):
    """The bench config composed from `configs/bench/bench.yaml` and Hydra overrides `argv` (a key it
    lacks is refused, `+` or not, except new keys of `model.overrides`, which `ModelConfig` checks)."""
    from ttt_train.config_compose import compose_yaml

    return compose_yaml(CONFIG_DIR, "bench", argv, open_keys=("model.overrides",))


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def median_seconds(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                   repeats: int) -> dict[str, float]:
    """Median wall seconds of each callable; rounds interleave the callables."""
    return {name: median / 1e3 for name, (median, _) in _time_ms(fns, device, warmup, repeats).items()}


def _pair_record(key: str, value: int, tokens: int, seconds: dict, peaks: dict | None) -> dict:
    """One row of a sweep: tokens/s (and peak MiB) of base and TTT, and their ratios."""
    record = {key: value}
    for variant in ("base", "ttt"):
        record[f"{variant}_tokens_per_s"] = round(tokens / seconds[variant], 2)
    record["tokens_per_s_ratio"] = round(record["ttt_tokens_per_s"] / record["base_tokens_per_s"], 4)
    if peaks is not None:
        for variant in ("base", "ttt"):
            record[f"{variant}_peak_mib"] = round(peaks[variant] / 2**20, 3)
        record["peak_memory_ratio"] = round(peaks["ttt"] / max(peaks["base"], 1), 4)
    return record


def _sweep(lengths, measure: Callable[[int], dict]) -> tuple[list[dict], int | None]:
    """`measure(length)` for each length until one runs out of memory; returns (rows, first OOM length)."""
    rows = []
    for length in lengths:
        try:
            rows.append(measure(int(length)))
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not _is_oom(error):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return rows, int(length)
    return rows, None


# ---------------------------------------------------------------- HF modeling file: prefill and decode


def bench_model_config(cfg):
    """The benchmarked `ModelConfig`: preset `cfg.model.preset` with `cfg.model.overrides`."""
    from omegaconf import OmegaConf

    from ttt_train.models import load_model_config

    return load_model_config(cfg.model.preset, **OmegaConf.to_container(cfg.model.overrides, resolve=True))


def bench_ttt_config(cfg):
    """TTT in layers 0, every, 2*every, ... with the configured chunk, inner lr and clip."""
    from ttt_train.layers.ttt_config import TTTConfig

    return TTTConfig(every=int(cfg.ttt.every), chunk_size=int(cfg.ttt.chunk_size), lr=float(cfg.ttt.lr),
                     max_update_norm=cfg.ttt.max_update_norm)


def build_hf_pair(cfg, device: torch.device, dtype: torch.dtype) -> dict:
    """{"base", "ttt"}: HF causal LMs of the configured shape (transformers' own Qwen3/Llama, and the
    exported In-Place TTT class) holding the same random base weights; TTT tensors as initialised."""
    import transformers

    from ttt_train.models.hf.hf_config import family_for, hf_config_kwargs, ttt_config_keys
    from ttt_train.models.hf.remote_code import configuration_inplace_ttt as ttt_configs
    from ttt_train.models.hf.remote_code import modeling_inplace_ttt as ttt_models

    model_cfg = bench_model_config(cfg)
    kwargs = hf_config_kwargs(model_cfg)
    name = {"qwen3": "Qwen3", "llama": "Llama"}[family_for(model_cfg)]
    torch.manual_seed(cfg.seed)
    base = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(**kwargs))
    ttt_hf_config = getattr(ttt_configs, f"InPlaceTTT{name}Config")(
        **kwargs, **ttt_config_keys(bench_ttt_config(cfg), model_cfg.num_layers))
    ttt = getattr(ttt_models, f"InPlaceTTT{name}ForCausalLM")(ttt_hf_config)
    missing, unexpected = ttt.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(".ttt_" not in key for key in missing):
        raise RuntimeError(f"baseline and TTT models differ beyond the TTT tensors: missing {missing}, "
                           f"unexpected {unexpected}")
    return {name: model.to(device=device, dtype=dtype).eval() for name, model in (("base", base), ("ttt", ttt))}


def measure_prefill(models: dict, cfg, device: torch.device, length: int) -> dict:
    vocab = models["base"].config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(cfg.seed)).to(device)

    def forward(model):
        def run():
            with torch.no_grad():
                return model(input_ids=ids, logits_to_keep=1, use_cache=False).logits
        return run

    fns = {name: forward(model) for name, model in models.items()}
    seconds = median_seconds(fns, device, cfg.warmup, cfg.repeats)
    peaks = {name: _peak_extra_bytes(fn, device) for name, fn in fns.items()}
    return _pair_record("length", length, length, seconds, peaks)


def measure_decode(models: dict, cfg, device: torch.device, batch: int) -> dict:
    vocab = models["base"].config.vocab_size
    prompt = torch.randint(0, vocab, (batch, cfg.decode.prompt_length),
                           generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    new = int(cfg.decode.new_tokens)

    def generate(model):
        def run():
            with torch.no_grad():
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new,
                                      min_new_tokens=new, do_sample=False, pad_token_id=0)
        return run

    seconds = median_seconds({name: generate(m) for name, m in models.items()}, device, cfg.warmup, cfg.repeats)
    return _pair_record("batch", batch, batch * new, seconds, None)


# ---------------------------------------------------------------- training step (megatron-core)


def build_train_pair(cfg, dtype: str):
    """(baseline, TTT) megatron models + optimizers in this single process, same base initialisation."""
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize
    from ttt_train.training.optimizer import OptimizerArgs, build_optimizer
    from ttt_train.training.setup import DDPConfig, wrap_for_training

    parallel = ParallelConfig(seed=cfg.seed)
    initialize(parallel)
    model_cfg = bench_model_config(cfg)
    pairs = {}
    for name, ttt in (("base", None), ("ttt", bench_ttt_config(cfg))):
        torch.manual_seed(cfg.seed)
        config = to_transformer_config(model_cfg, parallel, dtype=dtype)
        chunks = wrap_for_training(build_gpt_model(model_cfg, config, ttt=ttt), config, DDPConfig())
        pairs[name] = (chunks, build_optimizer(OptimizerArgs(lr=1e-4), chunks, config))
    return pairs, model_cfg


def measure_train_step(pairs: dict, model_cfg, cfg, device: torch.device, length: int) -> dict:
    from ttt_train.training.step import run_step

    g = torch.Generator().manual_seed(cfg.seed)
    tokens = torch.randint(0, model_cfg.vocab_size, (1, length + 1), generator=g).to(device)
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(1, length, device=device),
             "position_ids": torch.arange(length, device=device)[None]}

    def step(chunks, optimizer):
        def run():
            return run_step(chunks, iter([batch]), num_microbatches=1, micro_batch_size=1, seq_length=length,
                            optimizer=optimizer)
        return run

    fns = {name: step(*pair) for name, pair in pairs.items()}
    seconds = median_seconds(fns, device, cfg.warmup, cfg.repeats)
    peaks = {name: _peak_extra_bytes(fn, device) for name, fn in fns.items()}
    return _pair_record("length", length, length, seconds, peaks)


# ---------------------------------------------------------------- report


def target_checks(result: dict) -> dict:
    """Each target's ratio at the longest measured length (largest batch for decoding), and whether it is met."""
    picks = {"train_tokens_per_s": ("train_step", "tokens_per_s_ratio"),
             "train_peak_memory": ("train_step", "peak_memory_ratio"),
             "prefill_tokens_per_s": ("prefill", "tokens_per_s_ratio"),
             "prefill_peak_memory": ("prefill", "peak_memory_ratio"),
             "decode_tokens_per_s": ("decode", "tokens_per_s_ratio")}
    checks = {}
    for name, (section, field) in picks.items():
        rows = result.get(section) or []
        if not rows:
            continue
        op, bound = TARGETS[name]
        ratio = rows[-1][field]
        at = {k: v for k, v in rows[-1].items() if k in ("length", "batch")}
        checks[name] = {"ratio": ratio, "target": f"{op} {bound}", "met": ratio >= bound if op == ">=" else
                        ratio <= bound, **at}
    return checks


def plot(result: dict, path: Path) -> None:
    """Tokens/s and peak memory against length (prefill, train step) and tokens/s per batch (decode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("prefill", "length", "tokens_per_s", "prefill tokens/s"),
              ("prefill", "length", "peak_mib", "prefill peak memory (MiB)"),
              ("train_step", "length", "tokens_per_s", "train step tokens/s"),
              ("train_step", "length", "peak_mib", "train step peak memory (MiB)"),
              ("decode", "batch", "tokens_per_s", "decode tokens/s")]
    panels = [p for p in panels if result.get(p[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (section, key, field, title) in zip(axes[0], panels):
        rows = result[section]
        xs = [row[key] for row in rows]
        for variant, style in (("base", "o-"), ("ttt", "s-")):
            ax.plot(xs, [row[f"{variant}_{field}"] for row in rows], style,
                    label="baseline" if variant == "base" else "In-Place TTT")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens" if key == "length" else "batch size")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"In-Place TTT every {result['ttt']['every']} layers vs baseline ({result['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg) -> dict:
    from omegaconf import OmegaConf

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "threads": torch.get_num_threads(), "dtype": cfg.dtype,
              "model": OmegaConf.to_container(cfg.model, resolve=True),
              "ttt": OmegaConf.to_container(cfg.ttt, resolve=True),
              "memory_method": MEMORY_METHOD[device.type]}
    if cfg.prefill.enabled or cfg.decode.enabled:
        models = build_hf_pair(cfg, device, dtype)
        result["ttt_layers"] = list(models["ttt"].config.ttt_layers)
        if cfg.prefill.enabled:
            result["prefill"], result["prefill_oom_at"] = _sweep(
                cfg.prefill.lengths, lambda n: measure_prefill(models, cfg, device, n))
        if cfg.decode.enabled:
            result["decode"], _ = _sweep(cfg.decode.batch_sizes, lambda b: measure_decode(models, cfg, device, b))
        del models
    if cfg.train_step.enabled:
        pairs, model_cfg = build_train_pair(cfg, cfg.dtype)
        result["train_step"], result["train_step_oom_at"] = _sweep(
            cfg.train_step.lengths, lambda n: measure_train_step(pairs, model_cfg, cfg, device, n))
    result["targets"] = target_checks(result)
    return result


def main(argv: list[str] | None = None) -> int:
    from ttt_train.cli_help import config_help, wants_help
    from ttt_train.config_keys import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(config_help(__doc__, CONFIG_DIR / "bench.yaml"))
        return 0
    try:
        cfg = compose(argv)
        bench_model_config(cfg)  # model.overrides: ModelConfig keys
    except (ConfigError, ValueError, FileNotFoundError) as err:  # a bad key, value or preset: refused
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = run(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "bench.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "bench.json")
    plot(result, out / "bench.png")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
