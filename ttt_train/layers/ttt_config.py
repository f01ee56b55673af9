"""In-Place TTT settings: which layers, chunk size, inner learning rate, target, clipping."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ttt_train.config_keys import checked_mapping

TARGETS = ("hidden_states", "input_embed")


@dataclass
class TTTConfig:
    """Where and how In-Place TTT runs (METHOD.md sections 1-4).

    layers: explicit global layer indices (0-based), or None to use `every`/`offset`: layers
        `offset, offset + every, ...` (the official release lists `[0, 6, 12, ...]`: every 6, offset 0).
    chunk_size: tokens per chunk C. lr: inner learning rate (the release uses 3; warm it up in training).
    conv_size: kernel of the target's depthwise convolution (odd). use_proj: keep W_target.
    target: `hidden_states` (the MLP's normalised input; the release's default for continual
        training) or `input_embed` (the token embeddings; the paper's choice from scratch).
    max_update_norm: per-chunk, per-document Frobenius clip tau of `lr * dW`, or None.
    """

    enabled: bool = True
    every: int = 6
    offset: int = 0
    layers: list[int] | None = None
    chunk_size: int = 1024
    lr: float = 3.0
    conv_size: int = 5
    use_proj: bool = True
    target: str = "hidden_states"
    max_update_norm: float | None = None

    @classmethod
    def from_dict(cls, values: dict) -> TTTConfig:
        return cls(**checked_mapping(cls, values, "ttt"))

    def layer_indices(self, num_layers: int) -> list[int]:
        """Validated global indices of the TTT layers in a model of `num_layers` layers."""
        self.validate(num_layers)
        if not self.enabled:
            return []
        if self.layers is not None:
            return sorted(set(self.layers))
        return list(range(self.offset, num_layers, self.every))

    def validate(self, num_layers: int) -> None:
        """Raise ValueError naming the offending `ttt.<key>`."""
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"ttt.{key}: {msg}")

        need(isinstance(self.chunk_size, int) and self.chunk_size > 0, "chunk_size",
             f"must be a positive integer, got {self.chunk_size!r}")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr >= 0, "lr",
             f"must be a finite number >= 0, got {self.lr!r}")
        need(isinstance(self.conv_size, int) and self.conv_size >= 1 and self.conv_size % 2 == 1, "conv_size",
             f"must be an odd positive integer, got {self.conv_size!r}")
        need(self.target in TARGETS, "target", f"must be one of {TARGETS}, got {self.target!r}")
        need(self.max_update_norm is None or (math.isfinite(self.max_update_norm) and self.max_update_norm > 0),
             "max_update_norm", f"must be null or a positive number, got {self.max_update_norm!r}")
        if self.layers is not None:
            bad = [i for i in self.layers if not isinstance(i, int) or not 0 <= i < num_layers]
            need(not bad, "layers", f"indices {bad} are outside the model's layers 0..{num_layers - 1}")
        else:
            need(isinstance(self.every, int) and self.every >= 1, "every",
                 f"must be a positive integer, got {self.every!r}")
            need(isinstance(self.offset, int) and 0 <= self.offset < min(self.every, num_layers), "offset",
                 f"must be in 0..{min(self.every, num_layers) - 1} (every={self.every}, "
                 f"num_layers={num_layers}), got {self.offset!r}")
