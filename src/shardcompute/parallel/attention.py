"""Attention split by whole KV-head groups: q/k/v column-parallel, o row-parallel."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.model.args import ModelArgs
from shardcompute.model.cache import KVCache
from shardcompute.parallel.linear import ColumnParallelLinear, QuantSpec, RowParallelLinear
from shardcompute.parallel.plan import RankSlices
from shardcompute.parallel.rope import RoPE


class ParallelAttention(nn.Module):
    """GQA attention over this rank's heads; one all-reduce in o_proj."""

    def __init__(
        self,
        args: ModelArgs,
        slices: RankSlices,
        comm: Collectives,
        quant: dict[str, QuantSpec | None],
    ):
        super().__init__()
        hd = args.head_dim
        self.head_dim = hd
        self.local_num_heads = slices.local_num_heads
        self.local_num_kv_heads = slices.local_num_kv_heads
        self.scale = hd**-0.5
        q_cols = (slices.heads[0] * hd, slices.heads[1] * hd)
        kv_cols = (slices.kv_heads[0] * hd, slices.kv_heads[1] * hd)
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = ColumnParallelLinear(args.hidden_size, q_cols, qkv_bias, quant["q_proj"])
        self.k_proj = ColumnParallelLinear(args.hidden_size, kv_cols, qkv_bias, quant["k_proj"])
        self.v_proj = ColumnParallelLinear(args.hidden_size, kv_cols, qkv_bias, quant["v_proj"])
        self.o_proj = RowParallelLinear(
            q_cols, args.hidden_size, comm, args.attention_bias, quant["o_proj"]
        )
        self.rope = RoPE(args)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        B, L, _ = x.shape
        q = self.q_proj(x).reshape(B, L, self.local_num_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.local_num_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.local_num_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q = self.rope(q, offset)  # (B, local_heads, L, head_dim)
        k = self.rope(k, offset)  # (B, local_kv_heads, L, head_dim)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)  # (B, local_kv_heads, offset + L, head_dim)
        mask = causal_mask(L, offset)
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        o = o.transpose(0, 2, 1, 3).reshape(B, L, -1)  # (B, L, local_heads * head_dim)
        return self.o_proj(o)


def causal_mask(length: int, offset: int) -> mx.array | str | None:
    """Query i (at position offset + i) sees keys 0..offset + i."""
    if length == 1:
        return None
    if offset == 0:
        return "causal"
    q_pos = mx.arange(offset, offset + length)[:, None]
    return q_pos >= mx.arange(offset + length)[None]
