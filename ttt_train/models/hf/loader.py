"""Fill this rank's megatron shards in place from a HuggingFace folder, tensor by tensor."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from ttt_train.layers.ttt_config import TTTConfig
from ttt_train.models.config import ModelConfig
from ttt_train.models.hf.gpt_family import (
    expected_hf_shapes,
    global_parameters,
    local_shard,
    tensor_maps,
    to_megatron,
)
from ttt_train.models.hf.hf_config import config_mismatches, model_config_from_cfg, read_hf_config
from ttt_train.models.hf.hf_files import SafetensorsFolder

log = logging.getLogger(__name__)
_TTT_TENSOR = re.compile(r"^model\.layers\.(\d+)\.mlp\.ttt_(conv|proj)\.weight$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # a buffer old transformers versions saved


def hf_ttt_layers(names: set[str]) -> dict[int, set[str]]:
    """Layer index -> {"conv", "proj"} for the official release's TTT tensors among `names`."""
    found: dict[int, set[str]] = {}
    for name in names:
        match = _TTT_TENSOR.match(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return found


def plan_tensors(hf_dir: str | Path, model_cfg: ModelConfig, ttt_cfg: TTTConfig | None):
    """Check a HF folder against the model to build; return (SafetensorsFolder, tensor maps, TTT layers
    that take their weights from the folder). Errors name the key, tensor or file."""
    where = str(Path(hf_dir) / "config.json")
    from_hf = model_config_from_cfg(read_hf_config(hf_dir), model_cfg.name, where)
    mismatches = config_mismatches(model_cfg, from_hf)
    if mismatches:
        raise ValueError(f"model config does not match {where}: " + "; ".join(mismatches))
    files = SafetensorsFolder(hf_dir)
    available = files.names()
    ttt_here = ttt_cfg.layer_indices(model_cfg.num_layers) if ttt_cfg is not None else []
    in_file = hf_ttt_layers(available)
    beyond = sorted(i for i in in_file if i >= model_cfg.num_layers)
    if beyond:
        log.warning("%s: TTT tensors of layers %s dropped: the model has only %d layers", hf_dir, beyond,
                    model_cfg.num_layers)
    loaded = sorted(i for i in in_file if i < model_cfg.num_layers)
    stray = sorted(set(loaded) - set(ttt_here))
    if stray:
        raise ValueError(f"{hf_dir} holds TTT tensors (mlp.ttt_conv / mlp.ttt_proj) of layers {stray}, but the TTT "
                         f"config puts TTT in layers {ttt_here}; set ttt.layers to include them (or drop ttt_mode)")
    use_proj = ttt_cfg.use_proj if ttt_cfg is not None else True
    maps = tensor_maps(model_cfg, loaded, use_proj)
    required = {name for tm in maps for name in tm.hf}
    missing = sorted(required - available)
    if missing:
        raise ValueError(f"{hf_dir}: tensor(s) missing from the safetensors files: {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''} ({len(missing)} in all)")
    ignorable = {n for n in available if _IGNORED.search(n)}
    ignorable |= {n for n in available if (m := _TTT_TENSOR.match(n)) and int(m.group(1)) in beyond}
    if model_cfg.tie_embeddings:
        ignorable.add("lm_head.weight")
    unexpected = sorted(available - required - ignorable)
    if unexpected:
        raise ValueError(f"{hf_dir}: tensor(s) with no place in the model: {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)} in all)")
    fresh = sorted(set(ttt_here) - set(loaded))
    if fresh and loaded:
        log.warning("TTT layers %s have no tensors in %s: initialised fresh (METHOD.md section 3)", fresh, hf_dir)
    return files, maps, loaded


@torch.no_grad()
def load_hf_weights(hf_dir: str | Path, model_chunks, model_cfg: ModelConfig, ttt_cfg: TTTConfig | None,
                    *, progress: bool = True) -> list[int]:
    """Fill this rank's TP/PP shards of `model_chunks` (wrapped or bare GPTModels) from the HF folder.

    Streams: only this rank's tensors are read, one at a time (the three q/k/v or the two gate/up
    tensors of a layer wait for each other), each placed and freed. TTT parameters keep their
    initialisation unless the folder holds official-release `mlp.ttt_*` tensors for that layer;
    returns the layers whose TTT tensors came from the folder.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model
    from tqdm import tqdm

    files, maps, loaded = plan_tensors(hf_dir, model_cfg, ttt_cfg)
    params: dict[str, torch.Tensor] = {}
    for chunk in model_chunks:
        params.update(global_parameters(unwrap_model(chunk)))
    here = [tm for tm in maps if tm.megatron in params]
    covered = {tm.megatron for tm in here}
    uncovered = sorted(n for n in params if n not in covered and ".ttt_target." not in n)
    if uncovered:
        raise ValueError(f"model parameters with no HF source: {uncovered[:6]} (unsupported model layout)")
    conv_size = ttt_cfg.conv_size if ttt_cfg is not None else 0
    consumers: dict[str, list] = {}
    for tm in here:
        for name in tm.hf:
            consumers.setdefault(name, []).append(tm)
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    pending: dict = {}
    bar = tqdm(total=len(consumers), desc=f"import {Path(hf_dir).name}", unit="tensor",
               disable=not progress or torch.distributed.get_rank() != 0)
    for name, tensor in files.iter_tensors(sorted(consumers)):
        for tm in consumers[name]:
            want = expected_hf_shapes(tm, model_cfg, conv_size)[tm.hf.index(name)]
            if tuple(tensor.shape) != want:
                raise ValueError(f"{hf_dir}: tensor {name} has shape {list(tensor.shape)}, the model expects "
                                 f"{list(want)} (from config.json)")
            parts = pending.setdefault(tm, {})
            parts[name] = tensor
            if len(parts) == len(tm.hf):
                del pending[tm]
                param = params[tm.megatron]
                shard = local_shard(tm, to_megatron(tm, [parts[n] for n in tm.hf], model_cfg), param, tp_rank, tp_size)
                if shard.shape != param.shape:
                    raise ValueError(f"{tm.megatron}: HF tensors {list(tm.hf)} give shape {list(shard.shape)} on "
                                     f"this rank, the parameter has {list(param.shape)}")
                param.copy_(shard)
        del tensor
        bar.update(1)
    bar.close()
    log.info("loaded %d tensors from %s%s", len(here), hf_dir,
             f" (In-Place TTT target tensors of layers {loaded})" if loaded else "")
    return loaded
