"""Rotary position embedding in the HF (half-split) layout, with llama3 and linear scaling.

Not `mx.fast.rope`: on the CPU that falls back to ~15 ops per call that recompute the angles,
twice per layer. Here the angles' cos/sin are computed once per forward pass.
"""

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
    """The checkpoint's rotary frequencies (base and scaling); `tables` gives the cos/sin of one
    forward pass's positions, computed once and shared by every layer's `rotate`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dims = args.head_dim
        cfg = args.rope_scaling or {}
        kind = cfg.get("rope_type", cfg.get("type", "default"))
        inv_freq = 1.0 / args.rope_theta ** (
            mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims
        )
        if kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, cfg)
        elif kind == "linear":
            inv_freq = inv_freq / cfg["factor"]  # positions slowed by the factor
        elif kind != "default":
            raise ModelFormatError(f"rope_scaling type {kind!r} is not supported")
        self._inv_freq = inv_freq

    def tables(self, offset: mx.array | int, length: int) -> tuple[mx.array, mx.array]:
        """cos and sin of positions offset .. offset + length - 1, each (length, head_dim / 2)."""
        positions = offset + mx.arange(length, dtype=mx.float32)
        angles = positions[:, None] * self._inv_freq[None]
        return mx.cos(angles), mx.sin(angles)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Apply RoPE to x (B, heads, L, head_dim), HF layout: the halves (a, b) of each head
    become (a cos - b sin, b cos + a sin)."""
    a, b = mx.split(x, 2, axis=-1)
    return mx.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
