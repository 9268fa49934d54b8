"""The prefill kernels of the routing library, the tiled attention (csrc/attention.c) and
SwiGLU (csrc/swiglu.c), against float64 references computed here in numpy and against MLX's
own ops."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from shardcompute import _blas
from shardcompute.parallel.host_kernels import (
    MIN_ROWS,
    MIN_SCORES,
    chunk_attention,
    kernel,
    swiglu,
    swiglu_worth_it,
    worth_it,
)
from shardcompute.parallel.kernels import Kernels
from shardcompute.parallel.kv import Positions

pytestmark = pytest.mark.skipif(kernel() is None, reason="needs the routing library (a compiler)")


def qkv(heads, kv_heads, length, offset, dim=32, batch=1, seed=0, spread=2.0):
    mx.random.seed(seed)
    q = mx.random.normal((batch, heads, length, dim)) * spread
    k = mx.random.normal((batch, kv_heads, offset + length, dim)) * spread
    v = mx.random.normal((batch, kv_heads, offset + length, dim))
    return q, k, v


def reference(q, k, v, scale, offset):
    """Causal attention in float64: query i sees positions 0 .. offset + i."""
    q, k, v = (np.array(x, np.float64) for x in (q, k, v))
    batch, heads, length, dim = q.shape
    rep = heads // k.shape[1]
    seen = np.arange(k.shape[2])[None] <= offset + np.arange(length)[:, None]
    out = np.zeros((batch, length, heads * dim))
    for h in range(heads):
        s = np.where(seen, q[:, h] @ k[:, h // rep].transpose(0, 2, 1) * scale, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[..., h * dim : (h + 1) * dim] = (p / p.sum(-1, keepdims=True)) @ v[:, h // rep]
    return out


def mlx_attention(q, k, v, scale, offset):
    mask = Positions.chunk(0, offset, q.shape[2]).mask
    o = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    return np.array(o.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1))


@pytest.fixture
def tiles():
    """Set the kernel's tile sizes for a test and put the defaults back after."""
    handle = kernel()
    yield handle.attention_set_tiles
    handle.attention_set_tiles(256, 192)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (6, 1)])
@pytest.mark.parametrize("offset,length", [(0, 40), (200, 40), (37, 129)])
def test_a_causal_chunk_equals_the_float64_reference(threads, heads, kv_heads, offset, length):
    q, k, v = qkv(heads, kv_heads, length, offset)
    want = reference(q, k, v, 0.2, offset)
    got = np.array(chunk_attention(q, k, v, 0.2, offset, threads))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())
    np.testing.assert_allclose(got, mlx_attention(q, k, v, 0.2, offset), rtol=0, atol=5e-5)


@pytest.mark.parametrize("keys,rows", [(8, 1), (16, 7), (24, 30), (1024, 1000)])
def test_any_tiling_computes_the_same(tiles, keys, rows):
    """Tiles smaller than the chunk (many key tiles, blocks ending mid-chunk, tails shorter
    than a vector) and larger than it."""
    tiles(keys, rows)
    q, k, v = qkv(9, 3, 45, 61, dim=24, batch=2, seed=3)
    want = reference(q, k, v, 0.3, 61)
    got = np.array(chunk_attention(q, k, v, 0.3, 61, 2))
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())


def test_strided_views_of_a_cache_buffer():
    """k and v as the used positions of a row of larger buffers (as a chunk's cache write
    returns them), q with its heads and positions transposed: read in place."""
    q, _, _ = qkv(6, 2, 30, 70, dim=64, seed=5)
    mx.random.seed(6)
    buffers = mx.random.normal((3, 2, 256, 64)), mx.random.normal((3, 2, 256, 64))
    k, v = (b[1:2, :, :100, :] for b in buffers)
    q = mx.contiguous(q.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # (B, H, L, D) strided
    want = reference(q, k, v, 0.125, 70)
    got = np.array(chunk_attention(q, k, v, 0.125, 70, 2))
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * np.abs(want).max())


def test_scores_far_apart_neither_overflow_nor_vanish():
    """Scores spread over hundreds: e^x underflows for most terms of a row, and the running
    maximum keeps the largest at e^0; no NaN or inf, and the result is still the reference's."""
    q, k, v = qkv(4, 2, 33, 300, seed=7, spread=6.0)
    want = reference(q, k, v, 1.0, 300)
    got = np.array(chunk_attention(q, k, v, 1.0, 300, 2))
    assert np.isfinite(got).all()
    # Scores this large carry float32 rounding of their own (MLX's error is ~1e-5 of the range
    # here): within twice MLX's error of the float64 reference.
    mlx_error = np.abs(mlx_attention(q, k, v, 1.0, 300) - want).max()
    assert np.abs(got - want).max() <= 2 * mlx_error


def test_shapes_it_does_not_take_raise():
    q, k, v = qkv(4, 2, 10, 20)
    with pytest.raises(ValueError, match="attention kernel refused"):
        chunk_attention(q, k, v, 0.2, 19, 2)  # keys for offset 20, not 19
    with pytest.raises(ValueError, match="attention kernel refused"):
        chunk_attention(q[:, :3], k, v, 0.2, 20, 2)  # 3 query heads over 2 KV heads


def test_only_float32_chunks_with_enough_scores_take_it():
    positions = -(-MIN_SCORES // (9 * 64))  # just enough scores
    q, k, _ = qkv(9, 3, 64, positions - 64)
    assert worth_it(q, k)
    assert not worth_it(q[:, :, :1], k)  # one query: decode-shaped
    assert not worth_it(q[:, :, :16], k)  # too few scores
    assert not worth_it(q.astype(mx.bfloat16), k.astype(mx.bfloat16))
    assert not worth_it(q, k.astype(mx.bfloat16))  # a cache of another dtype


def test_cpu_ranks_take_them_unless_switched_off(monkeypatch):
    """Where the routing library is loaded (every CPU rank here), prefill's attention and
    SwiGLU take the kernels on the rank's BLAS threads; SHARDCOMPUTE_HOST_KERNELS=0 keeps them
    in MLX."""
    assert Kernels.for_device(mx.cpu).host_threads == _blas.loaded.threads
    monkeypatch.setenv("SHARDCOMPUTE_HOST_KERNELS", "0")
    assert Kernels.for_device(mx.cpu).host_threads == 0


def swiglu_reference(gate_up):
    g, u = np.split(np.array(gate_up, np.float64), 2, axis=-1)
    return g / (1 + np.exp(-g)) * u


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 256, 2 * 1536), (1, 37, 2 * 131), (2, 20, 2 * 5)])
def test_swiglu_equals_the_float64_reference(threads, shape):
    """Rows split between threads, units not a multiple of the vector width, gates from -90
    (e^90 would overflow a naive sigmoid) to +90: as close to float64 as MLX's own."""
    mx.random.seed(8)
    gate_up = mx.random.normal(shape) * 30
    gate_up[..., 0] = -90.0
    gate_up[..., 1] = 90.0
    want = swiglu_reference(gate_up)
    got = np.array(swiglu(gate_up, threads))
    g, u = mx.split(gate_up, 2, axis=-1)
    mlx_error = np.abs(np.array(nn.silu(g) * u) - want).max()
    assert got.shape == want.shape and np.isfinite(got).all()
    assert np.abs(got - want).max() <= max(2 * mlx_error, 1e-6 * np.abs(want).max())


def test_swiglu_reads_a_strided_projection():
    """A gate-and-up projection that is a view with rows apart (a slice of a wider buffer)."""
    mx.random.seed(9)
    wide = mx.random.normal((1, 40, 2 * 64 + 10))
    gate_up = wide[..., : 2 * 64]
    np.testing.assert_allclose(
        np.array(swiglu(gate_up, 2)), swiglu_reference(gate_up), rtol=1e-5, atol=1e-6
    )


def test_only_float32_prefill_passes_take_swiglu():
    gate_up = mx.zeros((1, MIN_ROWS, 64))
    assert swiglu_worth_it(gate_up)
    assert not swiglu_worth_it(mx.zeros((1, MIN_ROWS - 1, 64)))  # too few tokens
    assert not swiglu_worth_it(mx.zeros((64, 1, 64)))  # a decode step: one token per row
    assert not swiglu_worth_it(gate_up.astype(mx.bfloat16))
