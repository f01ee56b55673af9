"""ttt-train checkpoint -> HuggingFace folder (`python -m ttt_train.convert export ...`).

The checkpoint (any TP/PP layout) is loaded into one TP=1, PP=1 model in this process
(dist_checkpointing reshards); its manifest gives the model / TTT config and the tokenizer. Written:
sharded safetensors + index, `config.json` (max_position_embeddings and the exact rotary settings of
training, in both transformers 4.x's and 5.x's layout; every shape key written explicitly),
`generation_config.json`, tokenizer files (naming their class, so `AutoTokenizer` needs no remote
code), `README.md`, and for TTT models the project's modeling code with `auto_map` (the `model_type`
stays the base model's, as the official release writes it). The tensor names are checked against the
HF class built on the meta device: nothing missing, nothing left over. The folder appears atomically
(written beside it, then renamed).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig
from ttt_train.models.hf.gpt_family import global_parameters, tensor_maps, to_hf
from ttt_train.models.hf.hf_config import (
    family_for,
    hf_config_kwargs,
    legacy_rope_keys,
    official_differences,
    ttt_config_keys,
)
from ttt_train.models.hf.model_card import model_card
from ttt_train.models.hf.out_dir import check_out, sibling_tmp, swap_in
from ttt_train.models.hf.remote_files import write_config_json, write_remote_code

log = logging.getLogger(__name__)
PLAIN_CLASSES = {"qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM")}
REMOTE_CLASSES = {"qwen3": ("InPlaceTTTQwen3Config", "InPlaceTTTQwen3ForCausalLM"),
                  "llama": ("InPlaceTTTLlamaConfig", "InPlaceTTTLlamaForCausalLM")}


def remote_classes(family: str):
    """(config class, model class) of ttt-train's In-Place TTT HF modeling code for `family`."""
    from ttt_train.models.hf.remote_code import configuration_inplace_ttt, modeling_inplace_ttt

    config_name, model_name = REMOTE_CLASSES[family]
    return getattr(configuration_inplace_ttt, config_name), getattr(modeling_inplace_ttt, model_name)


def hf_config(model_cfg: ModelConfig, ttt: TTTConfig | None, *, max_position_embeddings: int | None = None,
              token_ids: dict | None = None, dtype: str = "float32"):
    """The transformers config object of the export (plain Qwen3/Llama, or the TTT remote config)."""
    import transformers

    family = family_for(model_cfg)
    kwargs = dict(hf_config_kwargs(model_cfg, max_position_embeddings=max_position_embeddings), **(token_ids or {}))
    if ttt is None:
        config = getattr(transformers, PLAIN_CLASSES[family][0])(**kwargs)
        config.architectures = [PLAIN_CLASSES[family][1]]
    else:
        config_cls, _ = remote_classes(family)
        config = config_cls(**kwargs, **ttt_config_keys(ttt, model_cfg.num_layers))
        config.architectures = [REMOTE_CLASSES[family][1]]
    config.dtype = dtype
    return config


def config_json_keys(model_cfg: ModelConfig, ttt: TTTConfig | None, *, max_position_embeddings: int | None = None,
                     token_ids: dict | None = None) -> dict:
    """The keys `config.json` states explicitly whatever a transformers version's defaults: every shape
    and rotary key (`rope_parameters` for 5.x, `rope_theta` / `rope_scaling` for 4.x), the token ids and,
    with TTT, all eight `ttt_*` keys."""
    keys = dict(hf_config_kwargs(model_cfg, max_position_embeddings=max_position_embeddings),
                **legacy_rope_keys(model_cfg), **(token_ids or {}))
    if ttt is not None:
        keys.update(ttt_config_keys(ttt, model_cfg.num_layers))
    return keys


def earlier_export(out: Path) -> str | None:
    """None when `out` holds only an HF model folder's files (config.json among them), else why not."""
    from ttt_train.models.hf.importer import TOKENIZER_FILES

    known = {"config.json", "generation_config.json", "README.md", "model.safetensors.index.json", *TOKENIZER_FILES}
    others = sorted(p.name for p in out.iterdir() if not (p.is_file() and (
        p.name in known or p.suffix in (".safetensors", ".py"))) and not p.name.startswith("."))
    if others:
        return f"it holds {others[:4]}{' ...' if len(others) > 4 else ''}"
    return None if (out / "config.json").is_file() else "it has no config.json"


def warn_official_differences(ttt: TTTConfig | None) -> None:
    """Warn when keys only ttt-train reads hold values the official release's code does not assume."""
    diffs = official_differences(ttt) if ttt is not None else {}
    if diffs:
        log.warning("export: %s: only ttt-train's modeling code reads %s; the official In-Place TTT release's code "
                    "assumes %s and so computes a different model from these weights (the export's README says so)",
                    ", ".join(f"{k}={ours}" for k, (ours, _) in diffs.items()), " and ".join(diffs),
                    ", ".join(f"{k}={theirs}" for k, (_, theirs) in diffs.items()))


def hf_model_class(config, ttt: TTTConfig | None, family: str):
    if ttt is None:
        import transformers

        return getattr(transformers, PLAIN_CLASSES[family][1])
    return remote_classes(family)[1]


def check_names(config, ttt: TTTConfig | None, family: str, shapes: dict[str, tuple]) -> None:
    """Our tensor names and shapes must be exactly the HF class's (built on the meta device)."""
    with torch.device("meta"):  # cpu_compat P2 keeps this context working (it caches the originals)
        model = hf_model_class(config, ttt, family)(config)
    if next(model.parameters()).device.type != "meta":
        raise RuntimeError("the HF model for the name check was not built on the meta device")
    params = dict(model.named_parameters())
    every_param = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    expected = {n: tuple(p.shape) for n, p in params.items()}
    expected.update({n: tuple(t.shape) for n, t in model.state_dict().items() if n not in every_param})
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = sorted(n for n in set(expected) & set(shapes) if expected[n] != shapes[n])
    if missing or extra or wrong:
        raise ValueError(f"export does not match {type(model).__name__}: missing {missing[:6]}, left over {extra[:6]}, "
                         f"wrong shape {[(n, shapes[n], expected[n]) for n in wrong[:6]]}")


def hf_tensors(gpt, model_cfg: ModelConfig, ttt: TTTConfig | None) -> dict[str, tuple]:
    """HF name -> (shape, producer) for a TP=1, PP=1 model; producers build tensors on demand."""
    layers = ttt.layer_indices(model_cfg.num_layers) if ttt is not None else []
    params = global_parameters(gpt)
    out = {}
    for tm in tensor_maps(model_cfg, layers, ttt.use_proj if ttt is not None else True):
        if tm.megatron not in params:
            if tm.megatron == "output_layer.weight" and model_cfg.tie_embeddings:
                continue
            raise ValueError(f"the model has no parameter {tm.megatron} (expected for {list(tm.hf)})")
        full = params[tm.megatron].detach()
        for index, name in enumerate(tm.hf):
            shape = tuple(to_hf(tm, torch.empty(full.shape, device="meta"), model_cfg)[index].shape)
            out[name] = (shape, lambda tm=tm, full=full, index=index: to_hf(tm, full, model_cfg)[index])
    return out


def write_safetensors(tensors: dict[str, tuple], folder: Path, dtype: torch.dtype, max_shard_size: str) -> None:
    """Sharded safetensors + index (one file, no index, when it fits in one shard)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    metas = {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, _) in tensors.items()}
    split = split_torch_state_dict_into_shards(metas, max_shard_size=max_shard_size)
    for file, names in split.filename_to_tensors.items():
        save_file({n: tensors[n][1]().to(dtype).contiguous() for n in names}, str(folder / file),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(m.numel() * m.element_size() for m in metas.values())},
                 "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(spec: str, folder: Path) -> dict:
    """Tokenizer files for `spec` ("byte", a tokenizer.json, or a tokenizer directory) so that
    `AutoTokenizer.from_pretrained(folder)` works; return the special token ids for the configs."""
    import tokenizers

    from ttt_train.data.tokenizer import BYTE_TOKENIZER_PATH, load_tokenizer
    from ttt_train.models.hf.importer import TOKENIZER_FILES

    ours, folder = load_tokenizer(spec), Path(folder)
    path = BYTE_TOKENIZER_PATH if spec == "byte" else Path(spec)
    if path.is_dir():
        for name in TOKENIZER_FILES:
            if (path / name).is_file():
                shutil.copy2(path / name, folder / name)
    else:
        from transformers import PreTrainedTokenizerFast

        backend = tokenizers.Tokenizer.from_file(str(path))
        pad = backend.id_to_token(ours.pad_id) if ours.pad_id is not None else None
        eos = backend.id_to_token(ours.eod_id)
        PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, pad_token=pad).save_pretrained(folder)
    name_tokenizer_class(folder)
    return {"eos_token_id": ours.eod_id, "pad_token_id": ours.pad_id if ours.pad_id is not None else ours.eod_id}


def name_tokenizer_class(folder: Path) -> None:
    """Make `tokenizer_config.json` name a class both transformers 4.x and 5.x know.

    transformers 4.x's `AutoTokenizer` reads `config.json` (and its remote-code `auto_map`) only when
    the tokenizer files name no class; 5.x saves a fast tokenizer as `TokenizersBackend`, a name 4.x
    lacks. Both become `PreTrainedTokenizerFast` (the same `tokenizer.json`); other names are kept."""
    path = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file():
        return
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def build_export_model(checkpoint_path):
    """(TP=1 PP=1 float32 model with the checkpoint's weights, ModelConfig, TTTConfig|None, checkpoint info).

    Float32 whatever the training dtype (bf16 weights load exactly), so the verification's forward
    runs in float32 like the HF side's. Runs in one process (a world of one when torch.distributed
    is not set up)."""
    import torch.distributed as dist

    from ttt_train.checkpoint import load_checkpoint, read_checkpoint_info
    from ttt_train.models import build_gpt_model, to_transformer_config
    from ttt_train.runtime.distributed import ParallelConfig, initialize

    info = read_checkpoint_info(checkpoint_path)
    manifest = info["manifest"]
    if manifest is None:
        raise ValueError(f"checkpoint {info['path']} has no manifest (saved without manifest=); export needs the "
                         "model and TTT config it records")
    model_cfg = ModelConfig.from_dict(manifest["model"])
    ttt = TTTConfig.from_dict(manifest["ttt"]) if manifest.get("ttt") else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("export runs in a single process (it reshards to TP=1, PP=1); start it without torchrun")
    parallel = ParallelConfig()
    initialize(parallel)
    config = to_transformer_config(model_cfg, parallel, dtype="fp32", perform_initialization=False)  # all loaded
    gpt = build_gpt_model(model_cfg, config, ttt=ttt)
    load_checkpoint(info["path"], [gpt], strict=True)
    return gpt, model_cfg, ttt, info


def export_checkpoint(checkpoint_path, out_dir, *, verify: bool = True, tolerance: float = 1e-3,
                      max_shard_size: str = "1GB", max_position_embeddings: int | None = None,
                      dtype: str | None = None, force: bool = False) -> Path:
    """Write the HF folder `out_dir` from a checkpoint (iter_* folder or root with `latest`); return it.

    `out_dir` must be absent or empty; `force` replaces an earlier export (a folder holding only an HF
    model's files) there.
    dtype: "fp32" / "bf16" for the safetensors (default: the manifest's training dtype).
    max_shard_size: safetensors serialises a whole shard in memory, so the peak is about the model
    plus one shard.
    max_position_embeddings: the trained context length written to config.json (default: the
    model config's). Verification compares logits of the loaded export with the megatron model's.
    """
    out_dir = Path(out_dir)
    check_out(out_dir, force, "convert export", earlier_export)
    gpt, model_cfg, ttt, info = build_export_model(checkpoint_path)
    warn_official_differences(ttt)
    dtype = dtype or info["manifest"].get("dtype", "fp32")
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tokenizer = (info["manifest"].get("tokenizer") or {}).get("spec")
    tmp = sibling_tmp(out_dir)
    try:
        token_ids = write_tokenizer(tokenizer, tmp) if tokenizer else {}
        if not tokenizer:
            log.warning("checkpoint %s records no tokenizer: the export has no tokenizer files", info["path"])
        config = hf_config(model_cfg, ttt, max_position_embeddings=max_position_embeddings, token_ids=token_ids,
                           dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype])
        family = family_for(model_cfg)
        tensors = hf_tensors(gpt, model_cfg, ttt)
        check_names(config, ttt, family, {n: s for n, (s, _) in tensors.items()})
        write_safetensors(tensors, tmp, torch_dtype, max_shard_size)
        explicit = config_json_keys(model_cfg, ttt, max_position_embeddings=max_position_embeddings,
                                    token_ids=token_ids)
        if ttt is not None:
            write_remote_code(tmp, config, explicit)
        else:
            write_config_json(tmp, config, explicit)
        _write_generation_config(tmp, token_ids)
        (tmp / "README.md").write_text(model_card(
            model_cfg, ttt, family=family, source=str(info["path"]), dtype=dtype,
            max_position_embeddings=max_position_embeddings or model_cfg.max_position_embeddings))
        swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    print(f"exported {info['path']} -> {out_dir}", flush=True)
    if verify:
        verify_export(gpt, out_dir, model_cfg, ttt, tolerance)
    return out_dir


def _write_generation_config(folder: Path, token_ids: dict) -> None:
    from transformers import GenerationConfig

    GenerationConfig(**token_ids).save_pretrained(folder)


def verify_export(gpt, out_dir: Path, model_cfg: ModelConfig, ttt: TTTConfig | None, tolerance: float) -> float:
    """Logits of the exported folder under transformers vs. the megatron model (fp32 both)."""
    from transformers import AutoModelForCausalLM

    from ttt_train.models.hf.verify import (
        compare_logits,
        hf_model_logits,
        load_causal_lm,
        prompt_lengths,
        sample_prompts,
    )


    def hf_logits(prompts):
        model = load_causal_lm(AutoModelForCausalLM.from_pretrained, out_dir, dtype=torch.float32,
                               trust_remote_code=ttt is not None)
        return hf_model_logits(model, prompts)

    lengths = prompt_lengths(model_cfg.max_position_embeddings, ttt.chunk_size if ttt is not None else None)
    return compare_logits([gpt], sample_prompts(model_cfg.vocab_size, lengths), hf_logits, model_cfg.vocab_size,
                          tolerance, f"export {out_dir.name}")
