"""Per-rank KV cache: only this rank's KV heads, grown in steps to avoid a copy per token."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one layer, (B, local_kv_heads, capacity, head_dim)."""

    step = 256

    def __init__(self):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(self, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array]:
        """Append (B, H, L, D) keys/values; return everything cached so far."""
        prev, length = self.offset, k.shape[2]
        if self.keys is None or prev + length > self.keys.shape[2]:
            self._grow(k, v, prev + length)
        self.keys[..., prev : prev + length, :] = k
        self.values[..., prev : prev + length, :] = v
        self.offset += length
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, k: mx.array, v: mx.array, needed: int) -> None:
        B, H, _, D = k.shape
        capacity = (needed + self.step - 1) // self.step * self.step
        new_k = mx.zeros((B, H, capacity, D), k.dtype)
        new_v = mx.zeros((B, H, capacity, D), v.dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def make_cache(num_layers: int) -> list[KVCache]:
    return [KVCache() for _ in range(num_layers)]
