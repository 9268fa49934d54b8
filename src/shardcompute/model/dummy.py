"""Random weights with a real config, made per rank for its slice only.

Each tensor is generated in blocks of BLOCK indices along the axis the plan splits it on
(rows for column-parallel weights and the LM head, columns for row-parallel weights and the
embedding), each block from its own key derived from the seed and the tensor's name. A rank
asking for its slice generates only the blocks it covers, directly in the compute dtype; the
full model is the same blocks side by side, so every slice equals the full tensor's slice.
A slice along the other axis (a tied LM head reading the embedding's rows) generates every
block once, one at a time.
"""

from __future__ import annotations

import hashlib
import math

import mlx.core as mx

from shardcompute.model_spec import ModelArgs

BLOCK = 128
COLUMN_SPLIT = ("o_proj.weight", "down_proj.weight", "embed_tokens.weight")


class DummyTensor:
    """A random tensor that exists only as its recipe; indexing generates the slice asked."""

    def __init__(self, name: str, shape: tuple[int, ...], seed: int, dtype: mx.Dtype):
        self.name, self.shape, self.dtype = name, shape, dtype
        self.axis = 1 if len(shape) == 2 and name.endswith(COLUMN_SPLIT) else 0
        self.ones = name.endswith("norm.weight")
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        self._seed = int.from_bytes(digest[:8], "little") >> 1
        self._scale = shape[-1] ** -0.5  # fan-in scaling keeps activations sane

    def __getitem__(self, index) -> mx.array:
        spans = _spans(index, self.shape)
        if self.ones:
            return mx.ones(tuple(e - s for s, e in spans), self.dtype)
        lo, hi = spans[self.axis]
        if hi <= lo:
            return mx.zeros(tuple(e - s for s, e in spans), self.dtype)
        first, last = lo // BLOCK, (hi - 1) // BLOCK
        keys = mx.random.split(mx.random.key(self._seed), math.ceil(self.shape[self.axis] / BLOCK))
        parts = [self._block(keys[b], b, spans) for b in range(first, last + 1)]
        out = mx.concatenate(parts, axis=self.axis) if len(parts) > 1 else parts[0]
        cut = [slice(None)] * len(self.shape)
        cut[self.axis] = slice(lo - first * BLOCK, hi - first * BLOCK)
        return mx.contiguous(out[tuple(cut)])

    def _block(self, key: mx.array, b: int, spans: list[tuple[int, int]]) -> mx.array:
        """Block b, cut to the other axis's span (one block's memory at a time)."""
        shape = list(self.shape)
        shape[self.axis] = min(BLOCK, self.shape[self.axis] - b * BLOCK)
        block = mx.random.normal(tuple(shape), self.dtype, key=key) * self._scale
        if len(self.shape) == 2:
            other = 1 - self.axis
            cut = [slice(None)] * 2
            cut[other] = slice(*spans[other])
            block = block[tuple(cut)]
        mx.eval(block)
        return block


def _spans(index, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    parts = index if isinstance(index, tuple) else (index,)
    spans = []
    for d, size in enumerate(shape):
        part = parts[d] if d < len(parts) else slice(None)
        start, stop, step = part.indices(size)
        if step != 1:
            raise IndexError("dummy tensors take contiguous slices only")
        spans.append((start, max(start, stop)))
    return spans


def dummy_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every parameter of `args` under HF names, with its shape."""
    h, i, hd = args.hidden_size, args.intermediate_size, args.head_dim
    q_out, kv_out = args.num_attention_heads * hd, args.num_key_value_heads * hd
    shapes = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    for n in range(args.num_hidden_layers):
        p = f"model.layers.{n}"
        shapes.update(
            {
                f"{p}.input_layernorm.weight": (h,),
                f"{p}.post_attention_layernorm.weight": (h,),
                f"{p}.self_attn.q_proj.weight": (q_out, h),
                f"{p}.self_attn.k_proj.weight": (kv_out, h),
                f"{p}.self_attn.v_proj.weight": (kv_out, h),
                f"{p}.self_attn.o_proj.weight": (h, q_out),
                f"{p}.mlp.gate_proj.weight": (i, h),
                f"{p}.mlp.up_proj.weight": (i, h),
                f"{p}.mlp.down_proj.weight": (h, i),
            }
        )
        if args.attention_bias or args.qkv_bias:
            for proj, n_out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
                shapes[f"{p}.self_attn.{proj}.bias"] = (n_out,)
    return shapes


def dummy_tensors(args: ModelArgs, seed: int, dtype: mx.Dtype) -> dict[str, DummyTensor]:
    """Recipes for every parameter of `args` (nothing is generated until sliced)."""
    return {
        name: DummyTensor(name, shape, seed, dtype) for name, shape in dummy_shapes(args).items()
    }
