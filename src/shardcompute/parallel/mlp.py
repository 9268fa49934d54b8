"""SwiGLU MLP: gate and up column-parallel, down row-parallel (one all-reduce)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.model.args import ModelArgs
from shardcompute.parallel.linear import ColumnParallelLinear, QuantSpec, RowParallelLinear
from shardcompute.parallel.plan import RankSlices


class ParallelMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) over this rank's intermediate units."""

    def __init__(
        self,
        args: ModelArgs,
        slices: RankSlices,
        comm: Collectives,
        quant: dict[str, QuantSpec | None],
    ):
        super().__init__()
        units, bias = slices.intermediate, args.mlp_bias
        self.gate_proj = ColumnParallelLinear(args.hidden_size, units, bias, quant["gate_proj"])
        self.up_proj = ColumnParallelLinear(args.hidden_size, units, bias, quant["up_proj"])
        self.down_proj = RowParallelLinear(units, args.hidden_size, comm, bias, quant["down_proj"])

    def __call__(self, x: mx.array) -> mx.array:
        h = nn.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, L, local_intermediate)
        return self.down_proj(h)
