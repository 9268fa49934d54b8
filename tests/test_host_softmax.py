"""Prefill attention with its softmax in numpy against MLX's own attention kernel."""

import mlx.core as mx
import numpy as np
import pytest

from shardcompute.parallel.host_softmax import MIN_SCORES, chunk_attention, worth_it
from shardcompute.parallel.kv import Positions


def qkv(heads: int, kv_heads: int, length: int, positions: int, seed: int = 0):
    mx.random.seed(seed)
    q = mx.random.normal((1, heads, length, 32)) * 2
    k = mx.random.normal((1, kv_heads, positions, 32)) * 2
    v = mx.random.normal((1, kv_heads, positions, 32))
    return q, k, v


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (6, 1)])
def test_a_chunk_deep_in_a_prompt_equals_mlx_attention(threads, heads, kv_heads):
    """A causal chunk of 40 queries at offset 200: every query sees the 200 earlier positions
    and the chunk up to itself; grouped query heads share their KV head."""
    offset, length = 200, 40
    q, k, v = qkv(heads, kv_heads, length, offset + length)
    mask = Positions.chunk(0, offset, length).mask
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.2, mask=mask)
    got = chunk_attention(q, k, v, 0.2, mask, threads)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_any_mask_not_only_causal():
    q, k, v = qkv(4, 2, 16, 50, seed=1)
    mask = mx.random.uniform(shape=(16, 50)) > 0.3
    mask[:, 0] = True  # every query sees at least one position
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    got = chunk_attention(q, k, v, 0.3, mask, 2)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
    everything = mx.ones((16, 50), mx.bool_)  # no column masked at all
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=everything)
    got = chunk_attention(q, k, v, 0.3, everything, 2)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)


def test_only_large_float32_chunks_take_it():
    positions = -(-MIN_SCORES // (9 * 64))  # just enough scores
    q, k, _ = qkv(9, 3, 64, positions)
    mask = Positions.chunk(0, positions - 64, 64).mask
    assert worth_it(q, k, mask)
    assert not worth_it(q[:, :, :1], k, mask[:1])  # one query: decode-shaped
    assert not worth_it(q[:, :, :32], k, mask[:32])  # too few scores
    assert not worth_it(q.astype(mx.bfloat16), k.astype(mx.bfloat16), mask)
    assert not worth_it(q, k, "causal")  # the uncached reference pass
