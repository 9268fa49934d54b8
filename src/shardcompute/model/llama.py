"""The Llama-family transformer built from parallel layers.

The TP plan, read top to bottom: embedding all-gathers along hidden; per layer, attention
(q/k/v column, o row: one all-reduce) and MLP (gate/up column, down row: one all-reduce);
LM head column-parallel over the vocabulary, then one all-gather.
So a forward pass makes 2 * num_hidden_layers + 2 collectives.

Every tensor is in the compute dtype `dtype` (see dtypes.py): activations, the KV cache, the
RoPE tables, norm weights, quantization scales and biases, and so every collective payload.

A one-token decode step runs as one `mx.compile`d graph: the KV buffers have a fixed capacity
and the position is an array, so the trace is reused at every position (see model/cache.py).
Which kernels run (fused RoPE, compiled decode) is decided by device in parallel/kernels.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import QuantSpec
from shardcompute.model.args import ModelArgs
from shardcompute.model.cache import KVCache, LayerKV, Positions, flatten, unflatten
from shardcompute.parallel.attention import ParallelAttention
from shardcompute.parallel.embedding import HiddenParallelEmbedding
from shardcompute.parallel.kernels import Kernels
from shardcompute.parallel.linear import VocabParallelLMHead
from shardcompute.parallel.mlp import ParallelMLP
from shardcompute.parallel.plan import PartitionPlan
from shardcompute.parallel.rope import RoPE

QuantMap = Mapping[str, QuantSpec]  # module path -> quantization, for quantized weights only


def collectives_per_forward(args: ModelArgs) -> int:
    """2 all-reduces per layer, the embedding's and the LM head's all-gathers."""
    return 2 * args.num_hidden_layers + 2


class TransformerBlock(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        plan: PartitionPlan,
        rank: int,
        comm: Collectives,
        quant: QuantMap,
        prefix: str,
        dtype: mx.Dtype,
    ):
        super().__init__()
        slices = plan[rank]
        attn_q = {
            n: quant.get(f"{prefix}.self_attn.{n}")
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        mlp_q = {n: quant.get(f"{prefix}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")}
        self.self_attn = ParallelAttention(args, slices, comm, attn_q, dtype)
        self.mlp = ParallelMLP(args, slices, comm, mlp_q, dtype)
        self.input_layernorm = rms_norm(args, dtype)
        self.post_attention_layernorm = rms_norm(args, dtype)

    def __call__(self, x: mx.array, kv: LayerKV | None, pos: Positions) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), kv, pos)
        return h + self.mlp(self.post_attention_layernorm(h))


def rms_norm(args: ModelArgs, dtype: mx.Dtype) -> nn.RMSNorm:
    """mx.fast.rms_norm (statistics in float32 inside the kernel), weight in the compute dtype."""
    norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
    norm.weight = norm.weight.astype(dtype)
    return norm


class LlamaBody(nn.Module):
    """`model.*` in HF naming: embedding, blocks, final norm."""

    def __init__(
        self,
        args: ModelArgs,
        plan: PartitionPlan,
        rank: int,
        comm: Collectives,
        quant: QuantMap,
        dtype: mx.Dtype,
        kernels: Kernels,
    ):
        super().__init__()
        self.embed_tokens = HiddenParallelEmbedding(
            args.vocab_size,
            plan[rank].hidden,
            plan.sizes("hidden"),
            comm,
            quant.get("model.embed_tokens"),
            dtype,
        )
        self.layers = [
            TransformerBlock(args, plan, rank, comm, quant, f"model.layers.{i}", dtype)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = rms_norm(args, dtype)
        self.rope = RoPE(args, dtype, kernels.fused_rope)

    def __call__(
        self, ids: mx.array, kv: list[LayerKV] | None = None, pos: Positions | None = None
    ) -> mx.array:
        pos = pos or Positions.uncached(ids.shape[1])
        pos = replace(pos, rotate=self.rope.rotation(pos.offset, ids.shape[1]))
        h = self.embed_tokens(ids)  # (B, L, hidden)
        for i, layer in enumerate(self.layers):
            h = layer(h, kv[i] if kv else None, pos)
        return self.norm(h)


class Model(nn.Module):
    """One rank's share of a Llama-family model. With a 1-rank plan it is the dense model."""

    def __init__(
        self,
        args: ModelArgs,
        plan: PartitionPlan,
        dtype: mx.Dtype,
        rank: int = 0,
        comm: Collectives | None = None,
        quant: QuantMap | None = None,
        kernels: Kernels | None = None,
    ):
        super().__init__()
        comm = comm or Collectives()
        quant = quant or {}
        self.args, self.plan, self.rank, self.comm = args, plan, rank, comm
        self.dtype = dtype
        self.kernels = kernels or Kernels.for_device()
        self.model = LlamaBody(args, plan, rank, comm, quant, dtype, self.kernels)
        self._decode = None  # the compiled decode step, traced on first use
        self.lm_head = VocabParallelLMHead(
            args.hidden_size,
            plan[rank].vocab,
            plan.sizes("vocab"),
            comm,
            quant.get("lm_head"),
            dtype,
        )

    def __call__(
        self, ids: mx.array, cache: KVCache | None = None, last_only: bool = False
    ) -> mx.array:
        """ids (B, L) -> logits (B, L, vocab), or (B, 1, vocab) with last_only."""
        h = self.hidden(ids, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def hidden(self, ids: mx.array, cache: KVCache | None = None) -> mx.array:
        """ids (B, L) -> final hidden states (B, L, hidden), op by op; appends to `cache`."""
        if cache is None:
            return self.model(ids)
        B, L = ids.shape
        cache.reserve(B, L)
        h = self.model(ids, cache.layers, cache.positions(L))
        cache.offset += L
        return h

    def last_hidden(self, ids: mx.array, cache: KVCache) -> mx.array:
        """The final hidden state of the last position, (B, 1, hidden): the LM head's input.

        A one-token step runs compiled, unless collectives are being profiled (the profiler
        evaluates inside the graph, which a compiled function cannot do).
        """
        if ids.shape[1] == 1 and self.kernels.compiled_decode and not self.comm.profile:
            return self.decode_hidden(ids, cache)
        return self.hidden(ids, cache)[:, -1:]

    def decode_hidden(self, ids: mx.array, cache: KVCache) -> mx.array:
        """One compiled decode step: ids (B, 1) -> (B, 1, hidden); appends to `cache`."""
        if self._decode is None:
            self._decode = mx.compile(self._decode_graph)
        cache.reserve(ids.shape[0], 1)
        offset = mx.array([cache.offset], mx.int32)
        h, *arrays = self._decode(ids, offset, *cache.arrays())
        cache.set_arrays(arrays)
        cache.offset += 1
        return h

    def _decode_graph(self, ids: mx.array, offset: mx.array, *arrays: mx.array) -> list[mx.array]:
        """Pure in arrays (weights are constants of the trace): ids, offset, KV buffers ->
        hidden state and the updated buffers."""
        kv = unflatten(list(arrays))
        h = self.model(ids, kv, Positions.cached(offset, 1, arrays[0].shape[2]))
        return [h, *flatten(kv)]

    def fuse_projections(self) -> None:
        """Stack q/k/v and gate/up rows after loading: 4 matmuls per layer instead of 7.

        A layout change for speed (fewer, larger gemvs per decode step); checkpoints and
        shard files keep the separate names.
        """
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
            mx.eval(layer.parameters())  # one layer at a time bounds the copy's peak memory
        self._decode = None

    def make_cache(self) -> KVCache:
        attn = self.model.layers[0].self_attn
        return KVCache(
            self.args.num_hidden_layers,
            attn.local_num_kv_heads,
            attn.head_dim,
            self.dtype,
        )
