"""The decode fast path against the plain forward pass: compiled steps over fixed-capacity KV
buffers, and q/k/v + gate/up fused into single matmuls, must compute the same model."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from shardcompute.dtypes import QuantSpec
from shardcompute.model.cache import BatchKVCache
from shardcompute.model.llama import Model
from shardcompute.model_spec import ModelArgs
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


def random_model(
    seed: int = 0, quant: dict | None = None, compiled: bool = True, host_threads: int = 0
) -> Model:
    mx.random.seed(seed)
    kernels = Kernels.for_device()
    kernels = Kernels(kernels.fused_rope, compiled, host_threads)
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
    first = model.prefill(mx.array([ids[:250]]), cache, 0)[:, -1:]
    assert close(first, model.hidden(mx.array([ids[:250]]))[:, -1:])
    for n in range(250, 262):
        h = model.decode({0: ids[n]}, cache)
        assert close(h, model.hidden(mx.array([ids[: n + 1]]))[:, -1:]), f"position {n}"
    assert cache.lengths == {0: 262} and cache.capacity == 512


@pytest.mark.parametrize("compiled", [True, False])
def test_a_batch_of_rows_each_at_its_own_position(compiled):
    """Rows of different lengths, prefilled in chunks of one row at a time, then decoded
    together (with an idle row between them): each row equals its own sequence alone."""
    model = random_model(compiled=compiled)
    rng = np.random.default_rng(2)
    seqs = {0: 300, 2: 7, 3: 40}
    seqs = {slot: rng.integers(0, ARGS.vocab_size, n).tolist() for slot, n in seqs.items()}
    cache = model.make_cache()
    for slot, ids in seqs.items():
        for start in range(0, len(ids) - 1, 128):  # chunks that read only the used positions
            chunk = ids[start : min(start + 128, len(ids) - 1)]
            h = model.prefill(mx.array([chunk]), cache, slot)
            want = model.hidden(mx.array([ids[: start + len(chunk)]]))[:, -len(chunk) :]
            assert close(h, want), (slot, start)
    for step in range(3):
        tokens = {slot: ids[-1] if step == 0 else 5 + step for slot, ids in seqs.items()}
        if step:
            seqs = {slot: ids + [tokens[slot]] for slot, ids in seqs.items()}
        h = model.decode(tokens, cache)
        for i, ids in enumerate(seqs.values()):
            assert close(h[i : i + 1], model.hidden(mx.array([ids]))[:, -1:]), (step, i)
    assert cache.rows == 4  # rows come in powers of two; row 1 sat idle


@pytest.mark.parametrize("host_threads", [0, 2])
def test_packed_chunks_of_several_rows_in_one_pass(host_threads):
    """Chunks of three rows at different depths (one starting, two part-way, one long enough
    for the tiled attention kernel) in one pass: each chunk's hidden states equal its row's
    sequence alone, and the cache holds what separate prefills would have stored, so the rows
    then decode together to their own sequences' states. With the host kernels, the model's
    projections are fused (SwiGLU takes its kernel only then), against the plain model in MLX."""
    model, reference = random_model(host_threads=host_threads), random_model()
    if host_threads:
        model.fuse_projections()
    rng = np.random.default_rng(4)
    seqs = {0: 600, 1: 9, 3: 150}
    seqs = {slot: rng.integers(0, ARGS.vocab_size, n).tolist() for slot, n in seqs.items()}
    cache = model.make_cache()
    model.prefill(mx.array([seqs[0][:330]]), cache, 0)  # rows 0 and 3 part-way already
    model.prefill(mx.array([seqs[3][:20]]), cache, 3)
    done = {0: 330, 1: 0, 3: 20}
    chunks = [(slot, ids[done[slot] :]) for slot, ids in seqs.items()]
    hs = model.prefill_packed(chunks, cache)
    assert cache.lengths == {slot: len(ids) for slot, ids in seqs.items()}
    for (slot, chunk), h in zip(chunks, hs, strict=True):
        want = reference.hidden(mx.array([seqs[slot]]))[:, -len(chunk) :]
        assert h.shape == want.shape and close(h, want), slot
    h = model.decode({slot: 7 for slot in seqs}, cache)
    for i, ids in enumerate(seqs.values()):
        assert close(h[i : i + 1], reference.hidden(mx.array([ids + [7]]))[:, -1:]), i
    with pytest.raises(ValueError, match="one chunk per row"):
        model.prefill_packed([(1, [1, 2]), (1, [3])], cache)


def test_long_prefill_chunks_in_the_host_kernels():
    """Chunks of a prompt take parallel/host_kernels.py (attention and SwiGLU): the same hidden
    states as the plain model's uncached forward in MLX over the whole prompt."""
    model = random_model(host_threads=2)
    model.fuse_projections()
    ids = np.random.default_rng(3).integers(0, ARGS.vocab_size, 520).tolist()
    want = random_model().hidden(mx.array([ids]))
    cache = model.make_cache()
    for start in (0, 260):  # the second chunk: 4 heads x 260 queries x 520 positions
        got = model.prefill(mx.array([ids[start : start + 260]]), cache, 0)
        assert close(got, want[:, start : start + 260]), start


def test_compiled_step_is_traced_once_per_shape():
    """The point of fixed-capacity buffers: one trace serves every position of a shape."""
    traces = []
    model = random_model()
    graph = model._decode_graph
    model._decode_graph = lambda *a: traces.append(1) or graph(*a)
    cache = model.make_cache()
    model.prefill(mx.array([[1, 2, 3]]), cache, 0)
    for t in range(20):
        mx.eval(model.decode({0: t}, cache))
    assert len(traces) == 1
    model.prefill(mx.array([[4]]), cache, 1)  # a second row: the next bucket, one more trace
    for t in range(5):
        mx.eval(model.decode({0: t, 1: t}, cache))
    assert len(traces) == 2


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
    plain.prefill(ids, ca, 0), fused.prefill(ids, cb, 0)
    assert close(fused.decode({0: 7}, cb), plain.decode({0: 7}, ca))


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


def test_cache_reports_its_size_and_keeps_rows_through_resizes():
    cache = BatchKVCache(num_layers=2, kv_heads=2, head_dim=16, dtype=mx.float32)
    assert cache.capacity == 0 and cache.nbytes == 0
    cache.reserve({0: 10})
    assert (cache.rows, cache.capacity) == (1, 256)
    assert cache.nbytes == 2 * 2 * (1 * 2 * 256 * 16 * 4)
    cache.layers[0].keys[0, :, :10, :] = 1.0
    cache.lengths[0] = 10
    cache.resize(4, 512)
    cache.resize(2, 256)
    assert mx.all(cache.layers[0].keys[0, :, :10, :] == 1.0).item()
    with pytest.raises(ValueError, match="do not fit"):
        cache.resize(1, 8)
