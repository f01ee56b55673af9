"""Reading a HuggingFace folder's safetensors (one file, or shards listed in an index) lazily."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class SafetensorsFolder:
    """Tensor names -> shard files of a HF folder; tensors are read one at a time with `safe_open`.

    Raises FileNotFoundError naming the missing file (no weights, a shard the index lists but the
    folder lacks) and ValueError for a malformed index.
    """

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a safetensors index with a 'weight_map' ({err})") from err
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise FileNotFoundError(f"{index} lists shard(s) {missing} that are missing from {self.dir}; "
                                        "download the complete checkpoint")
            self.file_of = dict(weight_map)
        elif (self.dir / SINGLE).is_file():
            from safetensors import safe_open

            with safe_open(self.dir / SINGLE, framework="pt") as f:
                self.file_of = {name: SINGLE for name in f.keys()}
        else:
            found = sorted(p.name for p in self.dir.glob("*.bin")) or sorted(p.name for p in self.dir.iterdir())
            raise FileNotFoundError(f"{self.dir}: no {SINGLE} or {INDEX} (found {found[:8]}); only safetensors "
                                    "checkpoints are read (save with safe_serialization=True)")

    def names(self) -> set[str]:
        return set(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.dir / self.file_of[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def iter_tensors(self, names: Iterable[str], reopen_bytes: int = 1 << 29) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for `names`, file by file.

        The files are memory-mapped: the pages a tensor was read from stay resident (file-backed)
        until the file is closed, so a file is reopened after every `reopen_bytes` read; the resident
        memory of the mapping stays below that instead of growing to the checkpoint's size."""
        by_file = defaultdict(list)
        for name in names:
            by_file[self.file_of[name]].append(name)
        from safetensors import safe_open

        for file in sorted(by_file):
            pending = by_file[file][::-1]
            while pending:
                read = 0
                with safe_open(self.dir / file, framework="pt") as f:
                    while pending and read < reopen_bytes:
                        name = pending.pop()
                        tensor = f.get_tensor(name)
                        read += tensor.numel() * tensor.element_size()
                        yield name, tensor
