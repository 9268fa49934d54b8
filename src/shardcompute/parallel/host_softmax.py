"""Prefill attention on the CPU with its softmax in numpy.

A prompt chunk's attention exponentiates (chunk x positions seen) scores per head: 2.2 billion
of them over a 4000-token prompt of SmolLM2. MLX's CPU backend computes `exp` one element at
a time on one thread, about 60-70M/s on x86; numpy's vectorized `exp` does 500M/s and more,
and releases the GIL, so the rows can be split between this process's cores. So a chunk's
scores are computed by MLX (a matmul), masked and softmaxed in place in float32 by numpy,
through a view of the same memory, and multiplied with the values by MLX. The result equals
`mx.fast.scaled_dot_product_attention` up to float32 rounding.

Only eager passes use it (a prefill chunk runs op by op; the compiled decode step does not),
only in float32, and only when the chunk's scores are many (MIN_SCORES): below that MLX's own
kernel costs less than the round trip. Chosen by device in parallel/kernels.py.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np

MIN_SCORES = 1 << 18  # scores per step below which MLX's own attention is as fast

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="softmax")
    return _pools[threads]


def worth_it(q: mx.array, k: mx.array, mask) -> bool:
    """Whether `chunk_attention` should take this pass: a float32 chunk of several queries
    with an explicit mask, and enough scores to pay for the round trip."""
    _, heads, length, _ = q.shape
    return (
        isinstance(mask, mx.array)
        and length > 1
        and q.dtype == mx.float32
        and heads * length * k.shape[2] >= MIN_SCORES
    )


def chunk_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array, threads: int
) -> mx.array:
    """q (B, H, L, D), k and v (B, Hkv, T, D), mask (L, T) bool (True: may attend) -> the
    attention output (B, H, L, D). Query heads h*rep .. h*rep+rep-1 share KV head h (GQA)."""
    b, heads, length, dim = q.shape
    kv_heads, positions = k.shape[1], k.shape[2]
    rep = heads // kv_heads
    grouped = (q * scale).reshape(b, kv_heads, rep * length, dim)
    scores = grouped @ k.swapaxes(-1, -2)  # (B, Hkv, rep * L, T)
    mx.eval(scores, mask)
    # A numpy view of the scores' own buffer (MLX shares memory with numpy views of evaluated
    # arrays): they become the probabilities in place, and no copy goes either way. Nothing
    # else holds this fresh array.
    probs = np.asarray(scores).reshape(b, kv_heads, rep, length, positions)
    allowed = np.asarray(mask)
    # Columns every query may see need no masking: for a causal chunk, all but the last L.
    seen_by_all = allowed.all(axis=0)
    first_masked = positions if seen_by_all.all() else int(np.argmin(seen_by_all))

    def softmax_rows(l0: int, l1: int) -> None:
        rows = probs[:, :, :, l0:l1]
        if first_masked < positions:
            hidden = ~allowed[l0:l1, first_masked:]
            np.copyto(rows[..., first_masked:], -np.inf, where=hidden)
        np.subtract(rows, rows.max(axis=-1, keepdims=True), out=rows)
        np.exp(rows, out=rows)
        np.divide(rows, rows.sum(axis=-1, keepdims=True), out=rows)

    bounds = np.linspace(0, length, min(threads, length) + 1).astype(int)
    parts = list(zip(bounds[:-1], bounds[1:], strict=True))
    if len(parts) == 1:
        softmax_rows(*parts[0])
    else:
        for done in [_pool(len(parts)).submit(softmax_rows, *p) for p in parts]:
            done.result()
    return (scores @ v).reshape(b, heads, length, dim)
