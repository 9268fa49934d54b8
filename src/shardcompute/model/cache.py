"""Per-rank KV cache with fixed-capacity buffers, and the positions of one forward pass.

Every layer's keys and values live in (B, local_kv_heads, capacity, head_dim) buffers that
grow in steps of 256 positions. Writes go in with `mx.slice_update` at an *array* offset and
attention reads the whole buffer under a mask, so a decode step has the same shapes and the
same graph at every position until the buffers grow: that is what lets `mx.compile` trace the
step once and reuse it (see `Model.decode_hidden`).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from shardcompute.parallel.rope import Rotation


@dataclass
class LayerKV:
    """One layer's buffers; attention replaces them with the updated arrays."""

    keys: mx.array
    values: mx.array

    def write(self, k: mx.array, v: mx.array, offset: mx.array) -> tuple[mx.array, mx.array]:
        """Store (B, H, L, D) keys/values at `offset`; return the full buffers."""
        self.keys = mx.slice_update(self.keys, k, offset, axes=(2,))
        self.values = mx.slice_update(self.values, v, offset, axes=(2,))
        return self.keys, self.values


@dataclass
class Positions:
    """Where the L tokens of a forward pass sit: their offset, the attention mask, and (filled
    in by the model) the RoPE rotation of those positions."""

    offset: mx.array | int  # (1,) int32 with a cache, 0 without
    mask: mx.array | str | None  # (L, capacity) bool with a cache; "causal" or None without
    rotate: Rotation | None = None

    @classmethod
    def uncached(cls, length: int) -> Positions:
        return cls(0, "causal" if length > 1 else None)

    @classmethod
    def cached(cls, offset: mx.array, length: int, capacity: int) -> Positions:
        """Query i (at offset + i) sees buffer slots 0..offset + i; later slots are stale."""
        q_pos = offset + mx.arange(length)[:, None]
        return cls(offset, q_pos >= mx.arange(capacity)[None])


class KVCache:
    """The whole model's cache on this rank: one `LayerKV` per layer and the filled length."""

    step = 256

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.num_layers = num_layers
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.layers: list[LayerKV] = []
        self.offset = 0

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2] if self.layers else 0

    def reserve(self, batch: int, length: int) -> None:
        """Make room for `length` more positions (grows every layer, outside any compiled step)."""
        needed = self.offset + length
        if needed <= self.capacity:
            return
        capacity = (needed + self.step - 1) // self.step * self.step
        shape = (batch, self.kv_heads, capacity, self.head_dim)
        grown = []
        for i in range(self.num_layers):
            k, v = mx.zeros(shape, self.dtype), mx.zeros(shape, self.dtype)
            if self.layers:
                old = self.layers[i]
                k[..., : self.offset, :] = old.keys[..., : self.offset, :]
                v[..., : self.offset, :] = old.values[..., : self.offset, :]
            grown.append(LayerKV(k, v))
        self.layers = grown

    def positions(self, length: int) -> Positions:
        return Positions.cached(mx.array([self.offset], mx.int32), length, self.capacity)

    def arrays(self) -> list[mx.array]:
        return flatten(self.layers)

    def set_arrays(self, arrays: list[mx.array]) -> None:
        self.layers = unflatten(arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())


def flatten(layers: list[LayerKV]) -> list[mx.array]:
    """[k0, v0, k1, v1, ...]: the buffers as a compiled function's inputs and outputs."""
    return [a for layer in layers for a in (layer.keys, layer.values)]


def unflatten(arrays: list[mx.array]) -> list[LayerKV]:
    return [LayerKV(k, v) for k, v in zip(arrays[::2], arrays[1::2], strict=True)]
