"""What attention needs to know about one forward pass: where its tokens sit, how their keys
and values go into the cache, and what each query may see.

Three kinds of pass, one `Positions` each (several prefill chunks may share a pass: `Packed`):
- uncached: a whole sequence, causal, nothing stored (references and tests);
- a prefill chunk of one row: written into that row's buffers at its offset with a slice
  update, and attention reads only the row's used positions, not the whole buffer;
- a decode step of a batch: one token per row, each at its own offset, written with a scatter
  (`put_along_axis`), attention over the buffers' first positions (a window past the longest
  row) under a per-row mask. The shapes depend only on (rows, capacity, window), so
  `mx.compile` traces the step once per bucket, capacity and window.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx

Rotation = Callable[[mx.array], mx.array]  # (B, heads, L, head_dim) -> the same, rotated


@dataclass
class LayerKV:
    """One layer's buffers, (rows, local_kv_heads, capacity, head_dim); a write replaces them
    with the updated arrays."""

    keys: mx.array
    values: mx.array


Write = Callable[[LayerKV, mx.array, mx.array], tuple[mx.array, mx.array]]


@dataclass
class Positions:
    """One forward pass: per-row position offsets, the attention mask, the cache write, and
    (filled in by the model) the RoPE rotation of its positions."""

    offset: mx.array | int  # int for one row; (B,) int32 for a decode batch
    mask: mx.array | str | None
    write: Write | None = None  # None: nothing is cached
    rotate: Rotation | None = None

    @classmethod
    def uncached(cls, length: int) -> Positions:
        return cls(0, "causal" if length > 1 else None)

    @classmethod
    def chunk(cls, row: int, offset: int, length: int) -> Positions:
        """L tokens of one row at `offset`: query i (at offset + i) sees positions 0..offset+i
        of that row, and only those are read."""
        q_pos = offset + mx.arange(length)[:, None]
        mask = q_pos >= mx.arange(offset + length)[None] if length > 1 else None
        return cls(offset, mask, lambda kv, k, v: _write_chunk(kv, k, v, row, offset))

    @classmethod
    def decode(cls, offsets: mx.array, window: int) -> Positions:
        """One token per row at offsets (B,): row b sees its buffer's slots 0..offsets[b].
        Attention reads the first `window` slots (past every offset; see
        kv_layout.attention_window), the rest of the buffers being masked anyway."""
        mask = (mx.arange(window)[None] <= offsets[:, None])[:, None, None, :]  # (B,1,1,window)
        return cls(offsets, mask, lambda kv, k, v: _write_rows(kv, k, v, offsets, window))


@dataclass
class Packed:
    """Prefill chunks of several rows packed along the sequence axis of one pass (1, T): the
    projections and the MLP run once over all their tokens (one read of the weights), attention
    runs per chunk with its own positions, cache write and mask. Part (start, end, positions)
    holds tokens start..end of the pass."""

    parts: list[tuple[int, int, Positions]]


def _write_chunk(kv: LayerKV, k: mx.array, v: mx.array, row: int, offset: int):
    """Store (1, H, L, D) at `offset` of `row`; return that row's used positions."""
    end = offset + k.shape[2]
    kv.keys[row : row + 1, :, offset:end, :] = k
    kv.values[row : row + 1, :, offset:end, :] = v
    return kv.keys[row : row + 1, :, :end, :], kv.values[row : row + 1, :, :end, :]


def _write_rows(kv: LayerKV, k: mx.array, v: mx.array, offsets: mx.array, window: int):
    """Store (B, H, 1, D) at each row's own offset; return the buffers' first `window` slots."""
    index = mx.broadcast_to(offsets.reshape(-1, 1, 1, 1), k.shape)
    kv.keys = mx.put_along_axis(kv.keys, index, k, axis=2)
    kv.values = mx.put_along_axis(kv.values, index, v, axis=2)
    return kv.keys[:, :, :window, :], kv.values[:, :, :window, :]
