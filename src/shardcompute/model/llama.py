"""The Llama-family transformer built from parallel layers.

The TP plan, read top to bottom: embedding all-gathers along hidden; per layer, attention
(q/k/v column, o row: one all-reduce) and MLP (gate/up column, down row: one all-reduce);
LM head column-parallel over the vocabulary, then one all-gather.
So a forward pass makes 2 * num_hidden_layers + 2 collectives.
"""

from __future__ import annotations

from collections.abc import Mapping

import mlx.core as mx
import mlx.nn as nn

from shardcompute.collectives.group import Collectives
from shardcompute.model.args import ModelArgs
from shardcompute.model.cache import KVCache, make_cache
from shardcompute.parallel.attention import ParallelAttention
from shardcompute.parallel.embedding import HiddenParallelEmbedding
from shardcompute.parallel.linear import QuantSpec, VocabParallelLMHead
from shardcompute.parallel.mlp import ParallelMLP
from shardcompute.parallel.plan import PartitionPlan

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
    ):
        super().__init__()
        slices = plan[rank]
        attn_q = {
            n: quant.get(f"{prefix}.self_attn.{n}")
            for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        }
        mlp_q = {n: quant.get(f"{prefix}.mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")}
        self.self_attn = ParallelAttention(args, slices, comm, attn_q)
        self.mlp = ParallelMLP(args, slices, comm, mlp_q)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cache: KVCache | None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaBody(nn.Module):
    """`model.*` in HF naming: embedding, blocks, final norm."""

    def __init__(
        self, args: ModelArgs, plan: PartitionPlan, rank: int, comm: Collectives, quant: QuantMap
    ):
        super().__init__()
        self.embed_tokens = HiddenParallelEmbedding(
            args.vocab_size,
            plan[rank].hidden,
            plan.sizes("hidden"),
            comm,
            quant.get("model.embed_tokens"),
        )
        self.layers = [
            TransformerBlock(args, plan, rank, comm, quant, f"model.layers.{i}")
            for i in range(args.num_hidden_layers)
        ]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, ids: mx.array, cache: list[KVCache] | None) -> mx.array:
        h = self.embed_tokens(ids)  # (B, L, hidden)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache else None)
        return self.norm(h)


class Model(nn.Module):
    """One rank's share of a Llama-family model. With a 1-rank plan it is the dense model."""

    def __init__(
        self,
        args: ModelArgs,
        plan: PartitionPlan,
        rank: int = 0,
        comm: Collectives | None = None,
        quant: QuantMap | None = None,
    ):
        super().__init__()
        comm = comm or Collectives()
        quant = quant or {}
        self.args, self.plan, self.rank, self.comm = args, plan, rank, comm
        self.model = LlamaBody(args, plan, rank, comm, quant)
        self.lm_head = VocabParallelLMHead(
            args.hidden_size, plan[rank].vocab, plan.sizes("vocab"), comm, quant.get("lm_head")
        )

    def __call__(
        self, ids: mx.array, cache: list[KVCache] | None = None, last_only: bool = False
    ) -> mx.array:
        """ids (B, L) -> logits (B, L, vocab), or (B, 1, vocab) with last_only."""
        h = self.model(ids, cache)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def last_hidden(self, ids: mx.array, cache: list[KVCache]) -> mx.array:
        """The final hidden state of the last position, (B, 1, hidden): the LM head's input."""
        return self.model(ids, cache)[:, -1:]

    def make_cache(self) -> list[KVCache]:
        return make_cache(self.args.num_hidden_layers)
