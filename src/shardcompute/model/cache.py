"""This rank's KV cache for a batch of rows: fixed-capacity buffers, a length per row.

Every layer's keys and values live in (rows, local_kv_heads, capacity, head_dim) buffers. A
request holds one row (its slot) from its first prefill chunk to its end. Rows are allocated
in powers of two up to the engine's batch size and positions in steps of 256, so a decode step
over the first `rows` slots has the same shapes until one of them grows, and `mx.compile` reuses
its trace (see `Model.decode`). Growing copies the used part into new buffers, outside any
compiled step. How much to hold is decided by the scheduler (`scheduler.kv_shape`), with the
same arithmetic, so its accounting is this cache's real size.
"""

from __future__ import annotations

import mlx.core as mx

from shardcompute.kv_layout import kv_shape
from shardcompute.parallel.kv import LayerKV


class BatchKVCache:
    """The whole model's cache on this rank: one `LayerKV` per layer, and each row's length."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: mx.Dtype):
        self.num_layers = num_layers
        self.kv_heads, self.head_dim, self.dtype = kv_heads, head_dim, dtype
        self.layers: list[LayerKV] = []
        self.lengths: dict[int, int] = {}  # slot -> positions written

    @property
    def rows(self) -> int:
        return self.layers[0].keys.shape[0] if self.layers else 0

    @property
    def capacity(self) -> int:
        return self.layers[0].keys.shape[2] if self.layers else 0

    def reserve(self, lengths: dict[int, int]) -> None:
        """Make room for rows at these lengths (slot -> positions needed): grow to at least
        `kv_shape` of them. (The engine's scheduler sets the shape itself, with `resize`.)"""
        rows, capacity = kv_shape({**self.lengths, **lengths})
        if rows > self.rows or capacity > self.capacity:
            self.resize(max(rows, self.rows), max(capacity, self.capacity))

    def resize(self, rows: int, capacity: int) -> None:
        """Buffers of exactly (rows, capacity), the rows' used positions copied over."""
        if (rows, capacity) == (self.rows, self.capacity):
            return
        beyond = [s for s, n in self.lengths.items() if s >= rows or n >= capacity]
        if beyond:
            raise ValueError(f"KV rows {beyond} do not fit ({rows} rows, {capacity} positions)")
        if rows == 0 or capacity == 0:
            self.layers = []
            return
        shape = (rows, self.kv_heads, capacity, self.head_dim)
        r, c = min(rows, self.rows), min(capacity, self.capacity)
        resized = []
        for layer in self.layers or [None] * self.num_layers:
            k, v = mx.zeros(shape, self.dtype), mx.zeros(shape, self.dtype)
            if layer is not None and r and c:
                k[:r, :, :c, :] = layer.keys[:r, :, :c, :]
                v[:r, :, :c, :] = layer.values[:r, :, :c, :]
            resized.append(LayerKV(k, v))
            mx.eval(k, v)  # one layer at a time: the old buffers go as the new ones come
        self.layers = resized

    def free(self, slot: int) -> None:
        """Forget a row; its positions are overwritten by the next request in the slot."""
        self.lengths.pop(slot, None)

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
