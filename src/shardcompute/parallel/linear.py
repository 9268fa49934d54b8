"""Column- and row-parallel linear layers, float or MLX affine-quantized.

Each layer knows how to cut its slice out of the full checkpoint tensor (`shard`), so the
class is the sharding decision. Parameter names follow the checkpoint: weight, bias, and for
quantized weights scales and biases (packed uint32 weight, one scale/bias per group).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import QuantSpec
from shardcompute.parallel.plan import Range


class ShardedLinear(nn.Module):
    """Shared parts of the column- and row-parallel layers: parameters and the local matmul."""

    def __init__(
        self, local_out: int, local_in: int, bias: int, quant: QuantSpec | None, dtype: mx.Dtype
    ):
        super().__init__()
        self.quant = quant
        for name, placeholder in weight_placeholders(local_out, local_in, quant, dtype).items():
            setattr(self, name, placeholder)
        if bias:
            self.bias = mx.zeros((bias,), dtype)

    def _matmul(self, x: mx.array) -> mx.array:
        if self.quant is None:
            return x @ self.weight.T
        q = self.quant
        return mx.quantized_matmul(
            x, self.weight, self.scales, self.biases, True, q.group_size, q.bits
        )


def weight_placeholders(
    rows: int, cols: int, quant: QuantSpec | None, dtype: mx.Dtype
) -> dict[str, mx.array]:
    """Unevaluated stand-ins with the shapes and dtypes of a (rows, cols) weight, float or
    packed with its per-group scales and biases; loading replaces them."""
    if quant is None:
        return {"weight": mx.zeros((rows, cols), dtype)}
    groups = cols // quant.group_size
    return {
        "weight": mx.zeros((rows, quant.packed_cols(cols)), mx.uint32),
        "scales": mx.zeros((rows, groups), dtype),
        "biases": mx.zeros((rows, groups), dtype),
    }


class ColumnParallelLinear(ShardedLinear):
    """y[:, out_range] = x @ W[out_range].T + b[out_range]. Never communicates."""

    def __init__(
        self,
        in_features: int,
        out_range: Range,
        bias: bool,
        quant: QuantSpec | None,
        dtype: mx.Dtype,
    ):
        local_out = out_range[1] - out_range[0]
        super().__init__(local_out, in_features, local_out if bias else 0, quant, dtype)
        self.out_range = out_range

    def shard(self, full: dict[str, mx.array]) -> dict[str, mx.array]:
        """This rank's rows of every tensor (weight, scales, biases, bias)."""
        s, e = self.out_range
        return {name: t[s:e] for name, t in full.items()}

    def __call__(self, x: mx.array) -> mx.array:
        y = self._matmul(x)
        return y + self.bias if "bias" in self else y

    @classmethod
    def fused(cls, parts: list[ColumnParallelLinear]) -> ColumnParallelLinear | None:
        """One layer whose output is the parts' outputs side by side (their rows stacked):
        one matmul, and one larger gemv when decoding, instead of several. None when the
        parts cannot share a matmul (different quantization or bias)."""
        first = parts[0]
        names = _array_names(first)
        if any(p.quant != first.quant or _array_names(p) != names for p in parts):
            return None
        packed = first.weight.shape[-1]
        in_features = packed * 32 // first.quant.bits if first.quant else packed
        local_out = sum(p.out_range[1] - p.out_range[0] for p in parts)
        dtype = first.scales.dtype if first.quant else first.weight.dtype
        out = cls(in_features, (0, local_out), "bias" in first, first.quant, dtype)
        out.update({k: mx.concatenate([p[k] for p in parts]) for k in names})
        return out


def fuse_columns(module: nn.Module, parts: tuple[str, ...], name: str) -> None:
    """Replace `module`'s column-parallel children `parts` by one, `name`, with their rows
    stacked (see `ColumnParallelLinear.fused`); they stay apart when they cannot share it."""
    fused = ColumnParallelLinear.fused([module[p] for p in parts])
    if fused is not None:
        for p in parts:
            del module[p]
        setattr(module, name, fused)


def _array_names(module: nn.Module) -> list[str]:
    return sorted(k for k, v in module.items() if isinstance(v, mx.array))


class RowParallelLinear(ShardedLinear):
    """y = all_sum(x[:, in_range] @ W[:, in_range].T) + b. One all-reduce, bias after it."""

    def __init__(
        self,
        in_range: Range,
        out_features: int,
        comm: Collectives,
        bias: bool,
        quant: QuantSpec | None,
        dtype: mx.Dtype,
    ):
        local_in = in_range[1] - in_range[0]
        super().__init__(out_features, local_in, out_features if bias else 0, quant, dtype)
        self.in_range = in_range
        self.comm = comm

    def shard(self, full: dict[str, mx.array]) -> dict[str, mx.array]:
        """This rank's input columns; packed and per-group tensors cut at group boundaries."""
        s, e = self.in_range
        out = {}
        for name, t in full.items():
            if name == "bias":
                out[name] = t[:]
            elif name == "weight" and self.quant is not None:
                out[name] = t[:, self.quant.packed_cols(s) : self.quant.packed_cols(e)]
            elif name in ("scales", "biases"):
                g = self.quant.group_size
                out[name] = t[:, s // g : e // g]
            else:
                out[name] = t[:, s:e]
        return out

    def __call__(self, x: mx.array) -> mx.array:
        y = self.comm.all_sum(self._matmul(x))
        return y + self.bias if "bias" in self else y


class VocabParallelLMHead(ColumnParallelLinear):
    """Column-parallel over the vocabulary, then one all-gather of the logits."""

    def __init__(
        self,
        in_features: int,
        vocab_range: Range,
        vocab_sizes: list[int],
        comm: Collectives,
        quant: QuantSpec | None,
        dtype: mx.Dtype,
    ):
        super().__init__(in_features, vocab_range, bias=False, quant=quant, dtype=dtype)
        self.vocab_sizes = vocab_sizes
        self.comm = comm

    def local_logits(self, x: mx.array) -> mx.array:
        """This rank's slice of the logits, (B, L, local_vocab): no communication."""
        return super().__call__(x)

    def gather(self, local_logits: mx.array) -> mx.array:
        return self.comm.all_gather(local_logits, axis=-1, sizes=self.vocab_sizes)

    def __call__(self, x: mx.array) -> mx.array:
        return self.gather(self.local_logits(x))
