"""SwiGLU MLP: gate and up column-parallel, down row-parallel (one all-reduce)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.model.args import ModelArgs
from shardcompute.parallel.linear import (
    ColumnParallelLinear,
    QuantSpec,
    RowParallelLinear,
    fuse_columns,
)
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

    def fuse(self) -> None:
        """Replace gate and up by one layer with their rows stacked (2 matmuls become 1)."""
        fuse_columns(self, ("gate_proj", "up_proj"), "gate_up_proj")

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate, up = mx.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.silu(gate) * up)  # silu(gate) * up: (B, L, local_intermediate)
