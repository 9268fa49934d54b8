"""A prefill chunk's attention and SwiGLU activation on the CPU, in the routing library.

MLX's CPU attention writes a chunk's whole score matrix per head, exponentiates it one element
at a time on one thread (60-70M/s on x86), and reads it again for the values: over a 4000-token
prompt of SmolLM2 that is 2.2 billion scores. `csrc/attention.c` walks the keys in tiles that
stay in cache instead, with a vectorized exp and the online softmax of FlashAttention, on the
process's OpenMP threads (the pool that runs its projections). The result equals
`mx.fast.scaled_dot_product_attention` up to float32 rounding. MLX's `silu(gate) * up` is one
thread with a scalar exp as well; `csrc/swiglu.c` splits the rows between the threads.

Only prefill takes them, in float32: a cached chunk's attention (query i at offset + i sees
positions 0 .. offset + i) with at least MIN_SCORES scores, and SwiGLU over at least MIN_ROWS
tokens of a pass. Decode runs as one compiled graph (one token per row, never these), and the
uncached pass's attention stays on MLX as the reference the tests compare with. Chosen by
device in parallel/kernels.py; they need the routing library (a C compiler, Linux).
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from shardcompute import _blas

MIN_SCORES = 1 << 14  # scores per chunk below which MLX's own attention costs as little
MIN_ROWS = 16  # tokens per pass below which MLX's own SwiGLU costs as little

_LONGS = ctypes.c_long * 3


def kernel() -> ctypes.CDLL | None:
    """The loaded routing library, if it has these kernels."""
    handle = _blas.loaded.handle if _blas.loaded else None
    if handle is None or not hasattr(handle, "swiglu_rows"):
        return None
    if handle.swiglu_rows.argtypes is None:  # declared once: chunks call this every layer
        _declare(handle)
    return handle


def _declare(handle: ctypes.CDLL) -> None:
    strided = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_long)]
    handle.attention_prefill.argtypes = (
        [ctypes.c_int] * 8 + [ctypes.c_float] + strided * 3 + [ctypes.c_void_p]
    )
    handle.swiglu_rows.argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_void_p]
    handle.swiglu_rows.argtypes += [ctypes.c_long, ctypes.c_void_p]


def worth_it(q: mx.array, k: mx.array) -> bool:
    """Whether a chunk's attention should take the kernel: float32, several queries, and
    enough scores to pay for leaving the graph."""
    _, heads, length, _ = q.shape
    f32 = q.dtype == k.dtype == mx.float32
    return length > 1 and f32 and heads * length * k.shape[2] >= MIN_SCORES


def _rows(x: mx.array) -> tuple[np.ndarray, _LONGS]:
    """A numpy view of an evaluated (B, H, T, D) array, and its strides in elements (B, H, T);
    copied only if its rows are not contiguous."""
    view = np.asarray(x)
    if view.strides[-1] != view.itemsize:
        view = np.ascontiguousarray(view)
    return view, _LONGS(*(s // view.itemsize for s in view.strides[:3]))


def chunk_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, offset: int, threads: int
) -> mx.array:
    """q (B, H, L, D), k and v (B, Hkv, offset + L, D), query i seeing positions
    0 .. offset + i -> the attention output (B, L, H * D). Query heads h*rep .. h*rep+rep-1
    share KV head h (GQA)."""
    handle = kernel()
    assert handle is not None, "chunk_attention needs the routing library"
    b, heads, length, dim = q.shape
    kv_heads, positions = k.shape[1], k.shape[2]
    mx.eval(q, k, v)
    (qn, qs), (kn, ks), (vn, vs) = (_rows(x) for x in (q, k, v))
    out = np.empty((b, length, heads * dim), np.float32)
    shape = (b, heads, kv_heads, length, positions, dim, offset)
    done = handle.attention_prefill(
        threads, *shape, scale, qn.ctypes.data, qs, kn.ctypes.data, ks, vn.ctypes.data, vs,
        out.ctypes.data,
    )  # fmt: skip
    if done == -1:
        raise MemoryError(f"attention of a {length}-token chunk at {offset}: out of memory")
    if done != 0:
        raise ValueError(f"attention kernel refused q {q.shape}, k {k.shape}, offset {offset}")
    return mx.array(out)


def swiglu_worth_it(gate_up: mx.array) -> bool:
    """Whether a pass's (B, L, 2 * units) gate-and-up projection should take the kernel:
    float32, several tokens per row (so never a decode step's graph), enough of them."""
    rows = gate_up.size // gate_up.shape[-1]
    return gate_up.shape[1] > 1 and gate_up.dtype == mx.float32 and rows >= MIN_ROWS


def swiglu(gate_up: mx.array, threads: int) -> mx.array:
    """(B, L, 2 * units), gate then up in each row -> silu(gate) * up, (B, L, units)."""
    handle = kernel()
    assert handle is not None, "swiglu needs the routing library"
    mx.eval(gate_up)
    gu = np.ascontiguousarray(np.asarray(gate_up))  # a view unless it came strided
    *lead, width = gu.shape
    units = width // 2
    out = np.empty((*lead, units), np.float32)
    handle.swiglu_rows(threads, gu.size // width, units, gu.ctypes.data, width, out.ctypes.data)
    return mx.array(out)
