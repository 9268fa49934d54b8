"""The embedding, split along the hidden dimension: each rank looks up its columns, then
one all-gather rebuilds the full hidden vector on every rank."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import QuantSpec
from shardcompute.parallel.linear import weight_placeholders
from shardcompute.parallel.plan import Range


class HiddenParallelEmbedding(nn.Module):
    """Table (vocab, local_hidden); the lookup all-gathers along hidden."""

    def __init__(
        self,
        vocab_size: int,
        hidden_range: Range,
        hidden_sizes: list[int],
        comm: Collectives,
        quant: QuantSpec | None,
        dtype: mx.Dtype,
    ):
        super().__init__()
        local = hidden_range[1] - hidden_range[0]
        self.hidden_range = hidden_range
        self.hidden_sizes = hidden_sizes
        self.comm = comm
        self.quant = quant
        for name, placeholder in weight_placeholders(vocab_size, local, quant, dtype).items():
            setattr(self, name, placeholder)

    def shard(self, full: dict[str, mx.array]) -> dict[str, mx.array]:
        """This rank's columns; packed and per-group tensors cut at group boundaries."""
        s, e = self.hidden_range
        if self.quant is None:
            return {"weight": full["weight"][:, s:e]}
        q, g = self.quant, self.quant.group_size
        return {
            "weight": full["weight"][:, q.packed_cols(s) : q.packed_cols(e)],
            "scales": full["scales"][:, s // g : e // g],
            "biases": full["biases"][:, s // g : e // g],
        }

    def __call__(self, ids: mx.array) -> mx.array:
        """ids (B, L) -> (B, L, hidden) in the compute dtype (a quantized table dequantizes
        to its scales' dtype)."""
        if self.quant is None:
            local = self.weight[ids]  # (B, L, local_hidden)
        else:
            q = self.quant
            local = mx.dequantize(
                self.weight[ids], self.scales[ids], self.biases[ids], q.group_size, q.bits
            )
        return self.comm.all_gather(local, axis=-1, sizes=self.hidden_sizes)
