"""Rotary position embedding in the HF (half-split) layout, with llama3 and linear scaling."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from shardcompute.errors import ModelFormatError
from shardcompute.model.args import ModelArgs


def _llama3_inv_freq(inv_freq: mx.array, cfg: dict) -> mx.array:
    """Llama 3.1 frequency scaling: long wavelengths slowed by `factor`, a smooth band between."""
    factor = cfg["factor"]
    low, high = cfg.get("low_freq_factor", 1.0), cfg.get("high_freq_factor", 4.0)
    old_ctx = cfg.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = mx.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return mx.where(medium, smoothed, scaled)


class RoPE(nn.Module):
    """mx.fast.rope with the checkpoint's base and scaling."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = args.head_dim
        self.scale = 1.0
        cfg = args.rope_scaling or {}
        kind = cfg.get("rope_type", cfg.get("type", "default"))
        inv_freq = 1.0 / args.rope_theta ** (
            mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims
        )
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, cfg)
        elif kind == "linear":
            self.scale = 1.0 / cfg["factor"]
        elif kind != "default":
            raise ModelFormatError(f"rope_scaling type {kind!r} is not supported")
        self._freqs = 1.0 / inv_freq  # mx.fast.rope takes periods, not inverse frequencies

    def __call__(self, x: mx.array, offset: mx.array | int = 0) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=None,
            scale=self.scale,
            offset=offset,
            freqs=self._freqs,
        )
