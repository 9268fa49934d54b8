"""Rotary position embedding in the HF (half-split) layout, with llama3 and linear scaling.

Two implementations of the same rotation, chosen by device (`parallel/kernels.py`):
- fused: `mx.fast.rope` with the checkpoint's frequencies, one kernel per call (GPUs);
- tables: the angles' cos/sin computed once per forward pass and shared by every layer. On the
  CPU `mx.fast.rope` falls back to ~15 ops per call that recompute the angles, twice per layer.
Either way the rotated q/k, and the tables, are in the compute dtype: a float32 table would
promote a bf16 model's whole residual stream to float32.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from shardcompute.errors import ModelFormatError
from shardcompute.model_spec import ModelArgs
from shardcompute.parallel.kv import Rotation


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


def inverse_frequencies(args: ModelArgs) -> mx.array:
    """The checkpoint's rotary frequencies (base and scaling), (head_dim / 2,) float32: angles
    are positions times these, and need float32's precision at long context."""
    dims = args.head_dim
    cfg = args.rope_scaling or {}
    kind = cfg.get("rope_type", cfg.get("type", "default"))
    exponents = mx.arange(0, dims, 2, dtype=mx.float32) / dims
    inv_freq = 1.0 / args.rope_theta**exponents
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, cfg)
    if kind == "linear":
        return inv_freq / cfg["factor"]  # positions slowed by the factor
    if kind != "default":
        raise ModelFormatError(f"rope_scaling type {kind!r} is not supported")
    return inv_freq


class RoPE(nn.Module):
    """`rotation(offset, length)` gives the rotation of one forward pass's positions, shared by
    every layer's q and k."""

    def __init__(self, args: ModelArgs, dtype: mx.Dtype, fused: bool):
        super().__init__()
        self.dims, self.dtype, self.fused = args.head_dim, dtype, fused
        self._inv_freq = inverse_frequencies(args)
        self._freqs = 1.0 / self._inv_freq  # mx.fast.rope's `freqs`: periods, not rates

    def rotation(self, offset: mx.array | int, length: int) -> Rotation:
        """Rotate by positions offset .. offset + length - 1; `offset` is an int, or a (B,)
        array of per-row offsets (a decode batch)."""
        if self.fused:
            return lambda x: mx.fast.rope(
                x, self.dims, traditional=False, base=None, scale=1.0, offset=offset,
                freqs=self._freqs,
            )  # fmt: skip
        starts = mx.array(offset) if isinstance(offset, int) else offset
        starts = starts.astype(mx.float32).reshape(-1, 1)  # (B or 1, 1)
        angles = (starts + mx.arange(length, dtype=mx.float32))[..., None] * self._inv_freq
        cos, sin = mx.cos(angles).astype(self.dtype), mx.sin(angles).astype(self.dtype)
        cos, sin = cos[:, None], sin[:, None]  # (B or 1, 1, length, head_dim / 2): per row
        return lambda x: rotate(x, cos, sin)


def rotate(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Apply RoPE to x (B, heads, L, head_dim), HF layout: the halves (a, b) of each head
    become (a cos - b sin, b cos + a sin)."""
    a, b = mx.split(x, 2, axis=-1)
    return mx.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
