"""SwiGLU MLP: gate and up column-parallel, down row-parallel (one all-reduce)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import QuantSpec
from shardcompute.model_spec import ModelArgs
from shardcompute.parallel.host_kernels import swiglu, swiglu_worth_it
from shardcompute.parallel.linear import ColumnParallelLinear, RowParallelLinear, fuse_columns
from shardcompute.parallel.plan import RankSlices


class ParallelMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) over this rank's intermediate units."""

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
        units, bias, h = slices.intermediate, args.mlp_bias, args.hidden_size
        self.gate_proj = ColumnParallelLinear(h, units, bias, quant["gate_proj"], dtype)
        self.up_proj = ColumnParallelLinear(h, units, bias, quant["up_proj"], dtype)
        self.down_proj = RowParallelLinear(units, h, comm, bias, quant["down_proj"], dtype)

    def fuse(self) -> None:
        """Replace gate and up by one layer with their rows stacked (2 matmuls become 1)."""
        fuse_columns(self, ("gate_proj", "up_proj"), "gate_up_proj")

    def __call__(self, x: mx.array) -> mx.array:
        if "gate_up_proj" in self:
            gate_up = self.gate_up_proj(x)  # (B, L, 2 * local_intermediate)
            if self.host_threads and swiglu_worth_it(gate_up):
                return self.down_proj(swiglu(gate_up, self.host_threads))
            gate, up = mx.split(gate_up, 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(nn.silu(gate) * up)  # silu(gate) * up: (B, L, local_intermediate)
