"""`shardcompute bench` end to end on a tiny checkpoint, and the BLAS routing under it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from shardcompute import _blas

ROW_FIELDS = {"model", "world_size", "dtype", "prefill_tok_s", "decode_tok_s", "step_s"}


def test_bench_rows(tiny_hf_model, tmp_path):
    model = tiny_hf_model("llama3")
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "shardcompute.cli", "bench", "--model", str(model)]
    cmd += ["--world-sizes", "1,2", "--prompt-tokens", "8", "--max-tokens", "6"]
    cmd += ["--trials", "1", "--backend", "ring", "--json", str(out), "--threads", "auto,1"]
    cmd += ["--plot", str(tmp_path / "plot.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    # Each world size with its share of the cores ("auto"), and with 1 thread where that differs.
    share = {ws: max(1, (os.cpu_count() or 1) // ws) for ws in (1, 2)}
    cells = [(ws, t) for ws in (1, 2) for t in dict.fromkeys((share[ws], 1))]
    assert [(r["world_size"], r["blas_threads"]) for r in rows] == cells
    if _blas.loaded:  # the ranks really ran with the threads asked for
        assert all(f"{r['blas_threads']} thread(s)" in r["blas"] for r in rows)
    rows = [r for r in rows if r["threads_asked"] == "auto"]
    for row in rows:
        assert ROW_FIELDS | {"collective_s_per_token", "bound_tok_s"} <= row.keys()
        # float32: every rank started with TF32 off (MLX_ENABLE_TF32=0 from the launcher).
        assert row["tf32_per_rank"] == ["off"] * row["world_size"]
        assert row["decode_tok_s"] > 0 and row["step_s"] == pytest.approx(1 / row["decode_tok_s"])
        assert len(row["streamed_bytes_per_rank"]) == row["world_size"]
    config = json.loads((model / "config.json").read_text())
    # Per token: 2 all-reduces per layer, the embedding's gather, the token choice's gather.
    assert rows[1]["collectives_per_token"] == 2 * config["num_hidden_layers"] + 2
    assert rows[1]["collectives_by_op"]["all_gather"] == 2
    assert set(rows[1]["allreduce_us_by_bytes"]) >= {"4", "16384"}
    # Each rank streams about half the weights.
    one, two = rows[0]["streamed_bytes_per_rank"][0], rows[1]["streamed_bytes_per_rank"]
    assert sum(two) == pytest.approx(one, rel=0.05)
    assert (tmp_path / "plot.png").stat().st_size > 0


def _transposed(x: np.ndarray) -> mx.array:
    """x as a transposed view (MLX passes those to BLAS as transposed; an array made from a
    numpy transpose keeps its memory order, hence the copy)."""
    return mx.array(np.ascontiguousarray(x.T)).T


def _layouts(a: np.ndarray, b: np.ndarray) -> list[tuple[mx.array, mx.array]]:
    """a @ b's operands: row-major, and each as a transposed view."""
    return [
        (mx.array(a), mx.array(b)),
        (mx.array(a), _transposed(b)),
        (_transposed(a), mx.array(b)),
    ]


@pytest.mark.skipif(not (_blas.loaded and _blas.loaded.routed), reason="no sgemv routing here")
@pytest.mark.parametrize(
    "shape",
    [
        (1, 64, 96),
        (1, 96, 64),
        (5, 64, 96),
        (64, 96, 1),
        (4, 96, 640),
        (3, 2000, 700),
        (16, 37, 13),  # small_nt's tails: k not a multiple of 8, n not of 4
        (7, 576, 1538),
        (17, 64, 200),  # one row too many for small_nt: the transposed route
        (300, 200, 500),  # sgemm split between OpenMP's threads by columns of C
        (500, 200, 300),  # ... and by rows
    ],
)
def test_routed_matmul_matches_numpy(shape):
    """Every operand layout of a single-row (or column) product, routed to sgemv, of a few rows
    against a weight stored as rows (x @ w.T, the decode step's projections), routed to
    small_nt, and of a few rows against a wide matrix, routed transposed (the last in panels of
    columns)."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    bias = rng.standard_normal((m, n), np.float32)
    before = _blas.loaded.routed_calls()

    for x, y in _layouts(a, b):
        np.testing.assert_allclose(np.array(x @ y), a @ b, rtol=1e-4, atol=1e-4)
    for y in (mx.array(b), _transposed(b)):  # alpha and beta, in both layouts of b
        got = mx.addmm(mx.array(bias), mx.array(a), y, alpha=0.5, beta=2.0)
        np.testing.assert_allclose(np.array(got), 0.5 * a @ b + 2 * bias, rtol=1e-4, atol=1e-4)
    routed = _blas.loaded.routed_calls() - before
    if 1 in (m, n) or (m <= 32 and n > 128):
        assert routed == 5  # every product
    else:  # only the two with b stored as rows, which small_nt takes
        assert routed == (2 if m <= 16 else 0)


@pytest.mark.skipif(
    not (_blas.loaded and _blas.loaded.handle and _blas.loaded.handle.gemv_route_pooled()),
    reason="no OpenMP pool here",
)
@pytest.mark.parametrize("shape", [(300, 200, 500), (500, 200, 300), (20, 576, 3000)])
def test_the_pool_computes_what_openblas_threads_compute(shape):
    """A large product split between OpenMP's threads, blocks of C on OpenBLAS's single
    thread, is OpenBLAS's own threaded product (within float32 rounding: its blocking may
    differ), in every layout, with 2 threads whatever this machine has."""
    m, k, n = shape
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    handle, threads = _blas.loaded.handle, _blas.loaded.threads
    products = {}
    try:
        _blas.loaded.set_threads(2)
        for pool in (1, 0):
            handle.gemv_route_set_split(pool)
            products[pool] = [np.array(x @ y) for x, y in _layouts(a, b)]
    finally:
        handle.gemv_route_set_split(1)
        _blas.loaded.set_threads(threads)
    for pooled, threaded in zip(products[1], products[0], strict=True):
        # Rounding of a k-term float32 sum, in another order: a few ulps of the largest output.
        scale = float(np.abs(threaded).max())
        np.testing.assert_allclose(pooled, threaded, rtol=1e-5, atol=2e-6 * scale)
        np.testing.assert_allclose(pooled, a @ b, rtol=1e-4, atol=1e-4)


def test_mlx_lm_peer_gets_the_same_model(smollm2_gguf, tmp_path):
    """`--compare` times mlx-lm on an HF export of our dense weights. The export must be the
    same model: read back as an HF directory, it gives the GGUF's logits."""
    import mlx.core as mx

    from shardcompute.bench.mlx_lm_peer import export_hf_dir
    from shardcompute.model.loader import load_model

    out = export_hf_dir(str(smollm2_gguf), tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_hidden_layers"] == 30
    assert (out / "tokenizer.json").exists()
    ids = mx.array([[1, 504, 3458, 282, 4649, 314]])
    exported = load_model(out, "float32")(ids)
    original = load_model(smollm2_gguf, "float32")(ids)
    assert mx.allclose(exported, original, atol=1e-5).item()


@pytest.mark.parametrize("tokens", [32, 128, 4000])
def test_the_http_benchmark_prompt_has_about_the_tokens_asked(smollm2_gguf, tokens):
    """The sweep's prompts are as long as asked (they were 3x too long: 4-digit numbers)."""
    from shardcompute.bench.http_bench import make_prompt
    from shardcompute.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_gguf)
    for start in (1, 1001, 7001):
        got = len(tokenizer.encode(make_prompt(tokens, start)))
        assert 0.9 * tokens <= got <= tokens, (start, got)
