"""Peak memory and time of `convert import` and `convert export` on a random ~0.5B Qwen3 model.

    python -m ttt_train.models.hf.bench_convert [dir=/tmp/bench_convert] [preset=qwen3_0.6b] [verify=false]

Saves a random transformers model of the preset's shape (float32 safetensors), then runs the two
commands as child processes, sampling the resident memory of each child's process tree
(psutil). Prints one JSON object: checkpoint bytes, the memory of a bare `import megatron,
transformers` process (the floor), and per command the wall time, the peak PSS and anonymous
memory (see `tree_memory`), and `(peak - floor) / checkpoint bytes` for both.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

DEFAULTS = {"dir": "/tmp/bench_convert", "preset": "qwen3_0.6b", "verify": False}


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(PSS, anonymous) bytes summed over a process and its children. PSS splits pages shared between
    processes (the checkpoint writer is forked), so the sum does not count them twice; anonymous =
    PSS minus the file-backed resident pages (memory-mapped safetensors pages belong to the page
    cache, which the kernel reclaims under pressure)."""
    pss = anon = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss, anon = pss + info.pss, anon + max(0, info.pss - info.shared)
    return pss, anon


def run_measured(args: list[str]) -> dict:
    """Run `args`; return wall seconds and the peak PSS / anonymous memory of its process tree
    (sampled every 100 ms)."""
    start = time.perf_counter()
    child = subprocess.Popen(args)
    proc, peak, peak_anon = psutil.Process(child.pid), 0, 0
    while child.poll() is None:
        try:
            pss, anon = tree_memory(proc)
        except psutil.NoSuchProcess:
            break
        peak, peak_anon = max(peak, pss), max(peak_anon, anon)
        time.sleep(0.1)
    if child.returncode:
        raise RuntimeError(f"{' '.join(args)} exited with {child.returncode}")
    return {"seconds": round(time.perf_counter() - start, 1), "peak_pss_bytes": peak, "peak_anon_bytes": peak_anon}


def make_random_model(folder: Path, preset: str) -> int:
    """Save a random Qwen3 model of `preset`'s shape; return its safetensors bytes."""
    import torch
    from transformers import Qwen3ForCausalLM

    from ttt_train.models import load_model_config
    from ttt_train.models.hf.exporter import hf_config

    model_cfg = load_model_config(preset)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(hf_config(model_cfg, None))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, model_cfg.init_std)
    model.save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict | None:
    from omegaconf import OmegaConf

    from ttt_train.cli_help import wants_help

    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(__doc__.strip() + f"\n\nOptions (KEY=VALUE, defaults shown): {' '.join(f'{k}={v}' for k, v in DEFAULTS.items())}")
        return None
    opts = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_dotlist(argv))
    root = Path(opts.dir)
    hf_dir, ckpt, out = root / "hf", root / "ckpt", root / "export"
    for path in (hf_dir, ckpt, out):
        if path.exists():
            raise FileExistsError(f"{path} exists; give an empty dir=")
    size = make_random_model(hf_dir, opts.preset)
    python = [sys.executable]
    floor = run_measured(python + ["-c", "import megatron.core.models.gpt.gpt_model, transformers, time; time.sleep(1)"])
    verify = [] if opts.verify else ["--no-verify"]
    result = {"preset": opts.preset, "checkpoint_bytes": size, "floor": floor}
    for name, args in (("import", ["import", "--hf", str(hf_dir), "--out", str(ckpt), "--no-progress"]),
                       ("export", ["export", "--checkpoint", str(ckpt), "--out", str(out)])):
        stats = run_measured(python + ["-m", "ttt_train.convert", *args, *verify])
        for kind in ("pss", "anon"):
            extra = stats[f"peak_{kind}_bytes"] - floor[f"peak_{kind}_bytes"]
            stats[f"{kind}_over_floor_per_checkpoint"] = round(extra / size, 2)
        result[name] = stats
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
