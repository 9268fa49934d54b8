"""The Llama-family transformer built from parallel layers.

The TP plan, read top to bottom: embedding all-gathers along hidden; per layer, attention
(q/k/v column, o row: one all-reduce) and MLP (gate/up column, down row: one all-reduce);
LM head column-parallel over the vocabulary, then one all-gather.
So a forward pass makes 2 * num_hidden_layers + 2 collectives.

Every tensor is in the compute dtype `dtype` (see dtypes.py): activations, the KV cache, the
RoPE tables, norm weights, quantization scales and biases, and so every collective payload.

Requests run as rows of a batch (model/cache.py): a step's prefill chunks (one row's, or
several rows' packed into one pass) run op by op; a decode step of every row runs as one
`mx.compile`d graph whose shapes depend only on the cache's (rows, capacity), so its trace is
reused at every position (see parallel/kv.py).
Which kernels run (fused RoPE, compiled decode) is decided by device in parallel/kernels.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import QuantSpec
from shardcompute.kv_layout import attention_window
from shardcompute.model.cache import BatchKVCache, flatten, unflatten
from shardcompute.model_spec import ModelArgs
from shardcompute.parallel.attention import ParallelAttention
from shardcompute.parallel.embedding import HiddenParallelEmbedding
from shardcompute.parallel.kernels import Kernels
from shardcompute.parallel.kv import LayerKV, Packed, Positions
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
        kernels: Kernels,
    ):
        super().__init__()
        slices = plan[rank]
        attn_q = {
            n: quant.get(f"{prefix}.self_attn.{n}")
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        mlp_q = {n: quant.get(f"{prefix}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")}
        self.self_attn = ParallelAttention(args, slices, comm, attn_q, dtype, kernels.host_threads)
        self.mlp = ParallelMLP(args, slices, comm, mlp_q, dtype, kernels.host_threads)
        self.input_layernorm = rms_norm(args, dtype)
        self.post_attention_layernorm = rms_norm(args, dtype)

    def __call__(self, x: mx.array, kv: LayerKV | None, pos: Positions | Packed) -> mx.array:
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
            TransformerBlock(args, plan, rank, comm, quant, f"model.layers.{i}", dtype, kernels)
            for i in range(args.num_hidden_layers)
        ]
        self.norm = rms_norm(args, dtype)
        self.rope = RoPE(args, dtype, kernels.fused_rope)

    def __call__(
        self, ids: mx.array, kv: list[LayerKV] | None = None, pos: Positions | Packed | None = None
    ) -> mx.array:
        pos = pos or Positions.uncached(ids.shape[1])
        if isinstance(pos, Packed):
            pos = Packed([(s, e, self._rotated(p, e - s)) for s, e, p in pos.parts])
        else:
            pos = self._rotated(pos, ids.shape[1])
        h = self.embed_tokens(ids)  # (B, L, hidden)
        for i, layer in enumerate(self.layers):
            h = layer(h, kv[i] if kv else None, pos)
        return self.norm(h)

    def _rotated(self, pos: Positions, length: int) -> Positions:
        return replace(pos, rotate=self.rope.rotation(pos.offset, length))


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

    def __call__(self, ids: mx.array, last_only: bool = False) -> mx.array:
        """ids (B, L) -> logits (B, L, vocab), or (B, 1, vocab) with last_only; no cache."""
        h = self.hidden(ids)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def hidden(self, ids: mx.array) -> mx.array:
        """ids (B, L) -> final hidden states (B, L, hidden) of a whole sequence, no cache."""
        return self.model(ids)

    def prefill(self, ids: mx.array, cache: BatchKVCache, slot: int) -> mx.array:
        """One row's next chunk, ids (1, L) -> (1, L, hidden), op by op: stored in the row's
        buffers after what it holds, attending to the row's used positions only."""
        offset, length = cache.lengths.get(slot, 0), ids.shape[1]
        cache.reserve({slot: offset + length})
        h = self.model(ids, cache.layers, Positions.chunk(slot, offset, length))
        cache.lengths[slot] = offset + length
        return h

    def prefill_packed(
        self, chunks: list[tuple[int, list[int]]], cache: BatchKVCache
    ) -> list[mx.array]:
        """Several rows' next chunks, [(slot, tokens)], in one pass op by op: the projections
        and the MLP over all their tokens at once (one read of the weights instead of one per
        chunk), attention per row as in `prefill` -> each chunk's (1, L, hidden)."""
        if len({slot for slot, _ in chunks}) != len(chunks):
            raise ValueError("prefill_packed: one chunk per row")
        if len(chunks) == 1:  # one row: `prefill`'s own pass
            slot, tokens = chunks[0]
            return [self.prefill(mx.array([tokens], mx.int32), cache, slot)]
        offsets = {slot: cache.lengths.get(slot, 0) for slot, _ in chunks}
        cache.reserve({slot: offsets[slot] + len(tokens) for slot, tokens in chunks})
        parts, start = [], 0
        for slot, tokens in chunks:
            parts.append(
                (start, start + len(tokens), Positions.chunk(slot, offsets[slot], len(tokens)))
            )
            start += len(tokens)
        ids = mx.array([[t for _, tokens in chunks for t in tokens]], mx.int32)
        h = self.model(ids, cache.layers, Packed(parts))
        for slot, tokens in chunks:
            cache.lengths[slot] = offsets[slot] + len(tokens)
        return [h[:, s:e] for s, e, _ in parts]

    def decode(self, tokens: dict[int, int], cache: BatchKVCache) -> mx.array:
        """One token for each of some rows ({slot: token}) -> (len, 1, hidden), in slot order
        of `tokens`. The step runs over every row of the cache as one graph, compiled unless
        collectives are being profiled (the profiler evaluates inside the graph), attending
        over a window of the buffers just past the longest decoding row: one trace per (rows,
        capacity, window), reused at every position of the window."""
        cache.reserve({s: cache.lengths[s] + 1 for s in tokens})
        ids = [[tokens.get(r, 0)] for r in range(cache.rows)]  # rows not decoding: ignored
        offsets = [cache.lengths.get(r, 0) for r in range(cache.rows)]
        step = self._decode_graph
        if self.kernels.compiled_decode and not self.comm.profile:
            self._decode = self._decode or mx.compile(self._decode_graph)
            step = self._decode
        longest = 1 + max(cache.lengths[s] for s in tokens)  # positions the step attends to
        window = mx.zeros((attention_window(longest, cache.capacity),), mx.int8)  # a shape only
        h, *arrays = step(
            mx.array(ids, mx.int32), mx.array(offsets, mx.int32), window, *cache.arrays()
        )
        cache.set_arrays(arrays)
        for s in tokens:
            cache.lengths[s] += 1
        return h[mx.array(list(tokens), mx.int32)]

    def _decode_graph(
        self, ids: mx.array, offsets: mx.array, window: mx.array, *arrays: mx.array
    ) -> list:
        """Pure in arrays (weights are constants of the trace): ids (rows, 1), offsets (rows,),
        an array whose length is the attention window, KV buffers -> hidden states and the
        updated buffers."""
        kv = unflatten(list(arrays))
        h = self.model(ids, kv, Positions.decode(offsets, window.shape[0]))
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

    def make_cache(self) -> BatchKVCache:
        attn = self.model.layers[0].self_attn
        return BatchKVCache(
            self.args.num_hidden_layers,
            attn.local_num_kv_heads,
            attn.head_dim,
            self.dtype,
        )
