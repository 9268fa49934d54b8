"""The decode fast path against the plain forward pass: compiled steps over fixed-capacity KV
buffers, and q/k/v + gate/up fused into single matmuls, must compute the same model."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from shardcompute.dtypes import QuantSpec
from shardcompute.model.args import ModelArgs
from shardcompute.model.cache import KVCache
from shardcompute.model.llama import Model
from shardcompute.parallel.kernels import Kernels
from shardcompute.parallel.plan import make_plan

ARGS = ModelArgs(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    rope_theta=500.0,
)


def random_model(seed: int = 0, quant: dict | None = None, compiled: bool = True) -> Model:
    mx.random.seed(seed)
    kernels = Kernels.for_device()
    kernels = Kernels(fused_rope=kernels.fused_rope, compiled_decode=compiled)
    model = Model(ARGS, make_plan(ARGS, 1), mx.float32, kernels=kernels)
    model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.2, model.parameters()))
    if quant:
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                w, s, b = mx.quantize(proj.weight, 32, 4)
                proj.quant = QuantSpec(32, 4)
                proj.weight, proj.scales, proj.biases = w, s, b
    mx.eval(model.parameters())
    return model


def close(a: mx.array, b: mx.array, tol: float = 1e-4) -> bool:
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max()) < tol


@pytest.mark.parametrize("compiled", [True, False])
def test_cached_decode_matches_the_full_forward(compiled):
    """Prefill 250 tokens, then decode one at a time across the 256-slot growth of the
    buffers: each step's hidden state equals the uncached forward over the whole sequence."""
    model = random_model(compiled=compiled)
    ids = np.random.default_rng(1).integers(0, ARGS.vocab_size, 262).tolist()
    cache = model.make_cache()
    first = model.last_hidden(mx.array([ids[:250]]), cache)
    assert close(first, model.hidden(mx.array([ids[:250]]))[:, -1:])
    for n in range(250, 262):
        h = model.last_hidden(mx.array([[ids[n]]]), cache)
        assert close(h, model.hidden(mx.array([ids[: n + 1]]))[:, -1:]), f"position {n}"
    assert cache.offset == 262 and cache.capacity == 512


def test_compiled_step_is_traced_once_per_capacity(monkeypatch):
    """The point of fixed-capacity buffers: one trace serves every position."""
    traces = []
    model = random_model()
    graph = model._decode_graph
    monkeypatch.setattr(model, "_decode_graph", lambda *a: traces.append(1) or graph(*a))
    cache = model.make_cache()
    model.last_hidden(mx.array([[1, 2, 3]]), cache)
    for t in range(20):
        mx.eval(model.last_hidden(mx.array([[t]]), cache))
    assert len(traces) == 1


def test_fused_projections_compute_the_same_model():
    plain, fused = random_model(), random_model()
    fused.fuse_projections()
    names = {k for k, _ in tree_flatten(fused.parameters())}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    assert "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(".q_proj." in k or ".gate_proj." in k for k in names)
    ids = mx.array([[5, 17, 99, 3, 64]])
    assert close(fused(ids), plain(ids), 1e-5)
    ca, cb = plain.make_cache(), fused.make_cache()
    plain.last_hidden(ids, ca), fused.last_hidden(ids, cb)
    assert close(fused.last_hidden(mx.array([[7]]), cb), plain.last_hidden(mx.array([[7]]), ca))


def test_fusion_keeps_quantized_weights_quantized():
    plain, fused = random_model(quant=True), random_model(quant=True)
    fused.fuse_projections()
    qkv = fused.model.layers[0].self_attn.qkv_proj
    assert qkv.quant == QuantSpec(32, 4) and qkv.weight.dtype == mx.uint32
    ids = mx.array([[5, 17, 99, 3, 64]])
    assert close(fused(ids), plain(ids), 1e-5)


def test_parts_that_cannot_share_a_matmul_stay_apart():
    model = random_model()
    attn = model.model.layers[0].self_attn
    attn.q_proj.bias = mx.zeros((attn.q_proj.weight.shape[0],))  # q has a bias, k and v not
    attn.fuse()
    assert "q_proj" in attn and "qkv_proj" not in attn


def test_cache_reports_its_size():
    cache = KVCache(num_layers=2, kv_heads=2, head_dim=16, dtype=mx.float32)
    assert cache.capacity == 0 and cache.nbytes == 0
    cache.reserve(1, 10)
    assert cache.capacity == 256
    assert cache.nbytes == 2 * 2 * (2 * 256 * 16 * 4)
