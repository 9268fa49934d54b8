"""Attention split by whole KV-head groups: q/k/v column-parallel, o row-parallel."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import QuantSpec
from shardcompute.model_spec import ModelArgs
from shardcompute.parallel.host_kernels import chunk_attention, worth_it
from shardcompute.parallel.kv import LayerKV, Packed, Positions
from shardcompute.parallel.linear import ColumnParallelLinear, RowParallelLinear, fuse_columns
from shardcompute.parallel.plan import RankSlices


class ParallelAttention(nn.Module):
    """GQA attention over this rank's heads; one all-reduce in o_proj."""

    def __init__(
        self,
        args: ModelArgs,
        slices: RankSlices,
        comm: Collectives,
        quant: dict[str, QuantSpec | None],
        dtype: mx.Dtype,
        host_threads: int = 0,
    ):
        super().__init__()
        self.host_threads = host_threads  # see parallel/kernels.py
        hd = args.head_dim
        self.head_dim = hd
        self.local_num_heads = slices.local_num_heads
        self.local_num_kv_heads = slices.local_num_kv_heads
        self.scale = hd**-0.5
        q_cols = (slices.heads[0] * hd, slices.heads[1] * hd)
        kv_cols = (slices.kv_heads[0] * hd, slices.kv_heads[1] * hd)
        qkv_bias = args.attention_bias or args.qkv_bias
        h = args.hidden_size
        self.q_proj = ColumnParallelLinear(h, q_cols, qkv_bias, quant["q_proj"], dtype)
        self.k_proj = ColumnParallelLinear(h, kv_cols, qkv_bias, quant["k_proj"], dtype)
        self.v_proj = ColumnParallelLinear(h, kv_cols, qkv_bias, quant["v_proj"], dtype)
        self.o_proj = RowParallelLinear(
            q_cols, h, comm, args.attention_bias, quant["o_proj"], dtype
        )

    def fuse(self) -> None:
        """Replace q/k/v by one layer with their rows stacked (3 matmuls become 1)."""
        fuse_columns(self, ("q_proj", "k_proj", "v_proj"), "qkv_proj")

    def _project(self, x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        if "qkv_proj" not in self:
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q_cols = self.local_num_heads * self.head_dim
        kv_cols = self.local_num_kv_heads * self.head_dim
        q, k, v = mx.split(self.qkv_proj(x), [q_cols, q_cols + kv_cols], axis=-1)
        return q, k, v

    def __call__(self, x: mx.array, kv: LayerKV | None, pos: Positions | Packed) -> mx.array:
        q, k, v = self._project(x)
        if isinstance(pos, Packed):  # each chunk attends within its own row
            parts = [(q[:, s:e], k[:, s:e], v[:, s:e], kv, p) for s, e, p in pos.parts]
            o = mx.concatenate([self._attend(*part) for part in parts], axis=1)
        else:
            o = self._attend(q, k, v, kv, pos)
        return self.o_proj(o)

    def _attend(
        self, q: mx.array, k: mx.array, v: mx.array, kv: LayerKV | None, pos: Positions
    ) -> mx.array:
        """Projections (B, L, cols) -> the attention output (B, L, heads * head_dim)."""
        q = pos.rotate(split_heads(q, self.local_num_heads))  # (B, heads, L, head_dim)
        k = pos.rotate(split_heads(k, self.local_num_kv_heads))
        v = split_heads(v, self.local_num_kv_heads)
        if kv is None:  # the uncached reference pass stays on MLX
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=pos.mask)
            return merge_heads(o)
        k, v = pos.write(kv, k, v)  # (B, local_kv_heads, positions seen, head_dim)
        if self.host_threads and isinstance(pos.offset, int) and worth_it(q, k):
            return chunk_attention(q, k, v, self.scale, pos.offset, self.host_threads)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=pos.mask)
        return merge_heads(o)


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, L, heads * head_dim) -> (B, heads, L, head_dim). One token needs no transpose, and
    a decode step saves the graph node (4 per layer with `merge_heads`)."""
    B, L, _ = x.shape
    if L == 1:
        return x.reshape(B, heads, 1, -1)
    return x.reshape(B, L, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """(B, heads, L, head_dim) -> (B, L, heads * head_dim)."""
    B, _, L, _ = x.shape
    if L == 1:
        return x.reshape(B, 1, -1)
    return x.transpose(0, 2, 1, 3).reshape(B, L, -1)
