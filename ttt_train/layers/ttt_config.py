"""In-Place TTT settings: which layers, chunk size, inner learning rate, target, clipping."""

from __future__ import annotations

from dataclasses import dataclass

from ttt_train.config_keys import build, check_fields, checked

TARGETS = ("hidden_states", "input_embed")
TARGET_INITS = ("dropin", "next_token", "next_token_difference")


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
    target_init: how the target's conv and projection start (`ttt_train.ops.LMAlignedTarget`):
        `dropin` (the paper's: V = 0 at step 0, a pretrained model's outputs unchanged) or
        `next_token` (from scratch: V_t = target_init_scale * source_{t+1} at step 0, no saddle) or
        `next_token_difference` (from scratch: V_t = target_init_scale * (source_{t+1} - source_t)).
    An empty `layers` list is refused: `enabled: false` is the way to turn TTT off.
    """

    enabled: bool = True
    every: int = checked(6, ge=1)
    offset: int = checked(0, ge=0)
    layers: list[int] | None = checked(None, ge=0, nonempty=True)
    chunk_size: int = checked(1024, ge=1)
    lr: float = checked(3.0, ge=0.0)
    conv_size: int = checked(5, ge=1, odd=True)
    use_proj: bool = True
    target: str = checked("hidden_states", choices=TARGETS)
    max_update_norm: float | None = checked(None, gt=0.0)
    target_init: str = checked("dropin", choices=TARGET_INITS)
    target_init_scale: float = checked(1.0, gt=0.0)

    @classmethod
    def from_dict(cls, values) -> TTTConfig:
        """Build from a plain mapping (YAML, Hydra); unknown keys, wrong types and ranges are errors naming them."""
        return build(cls, values, "ttt")

    def layer_indices(self, num_layers: int) -> list[int]:
        """Validated global indices of the TTT layers in a model of `num_layers` layers."""
        self.validate(num_layers)
        if not self.enabled:
            return []
        if self.layers is not None:
            return sorted(set(self.layers))
        return list(range(self.offset, num_layers, self.every))

    def validate(self, num_layers: int) -> None:
        """Raise ValueError naming the offending `ttt.<key>` (types, ranges, layers against `num_layers`)."""
        check_fields(self, "ttt")
        if self.target_init != "dropin" and self.conv_size < 3:
            raise ValueError(f"ttt.target_init={self.target_init} needs ttt.conv_size >= 3 (a tap for token t+1), "
                             f"got {self.conv_size}")
        if self.layers is not None:
            bad = [i for i in self.layers if i >= num_layers]
            if bad:
                raise ValueError(f"ttt.layers: indices {bad} are outside the model's layers 0..{num_layers - 1}")
        elif self.offset >= min(self.every, num_layers):
            raise ValueError(f"ttt.offset: must be in 0..{min(self.every, num_layers) - 1} (every={self.every}, "
                             f"num_layers={num_layers}), got {self.offset!r}")
