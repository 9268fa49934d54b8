"""The one dtype policy: how requests resolve, and that a bf16, fp16 or quantized SmolLM2 on the
CPU computes every tensor of a forward pass in its compute dtype."""

from __future__ import annotations

from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn
import pytest

from shardcompute.collectives.group import Collectives
from shardcompute.dtypes import TF32_ENV, DtypeRequest, QuantSpec, policy_env, resolve
from shardcompute.errors import ConfigError
from shardcompute.model.llama import LlamaBody, TransformerBlock
from shardcompute.model.loader import load_model
from shardcompute.parallel.attention import ParallelAttention
from shardcompute.parallel.embedding import HiddenParallelEmbedding
from shardcompute.parallel.linear import ColumnParallelLinear, RowParallelLinear
from shardcompute.parallel.mlp import ParallelMLP
from shardcompute.parallel.rope import RoPE

GGUF_Q41 = QuantSpec(group_size=32, bits=4)


def test_auto_is_float32_on_the_cpu_and_bf16_quantized_on_a_gpu():
    cpu, gpu = resolve("auto", "cpu"), resolve("auto", "gpu")
    assert (cpu.compute, cpu.quantized) == ("float32", False)
    assert (gpu.compute, gpu.quantized) == ("bfloat16", True)
    assert "auto" in cpu.describe() and "TF32 off" in cpu.describe()


def test_quantized_defaults_and_the_checkpoints_own_groups():
    q = resolve("quantized", "gpu")
    assert q.target_quant(None) == QuantSpec(64, 4)  # float weights: mlx-lm's default
    assert q.target_quant(GGUF_Q41) == GGUF_Q41  # GGUF keeps its 32-groups
    asked = resolve(DtypeRequest(dtype="quantized", group_size=128, bits=8), "gpu")
    assert asked.target_quant(GGUF_Q41) == QuantSpec(128, 8)
    assert resolve(DtypeRequest(dtype="quantized", group_size=64), "gpu").target_quant(
        GGUF_Q41
    ) == QuantSpec(64, 4)  # bits from the checkpoint, group as asked
    assert resolve("quantized", "cpu").compute == "float32"  # MLX's bf16 CPU kernels are slow
    assert resolve(DtypeRequest(dtype="quantized", compute_dtype="float16"), "cpu").compute == (
        "float16"
    )
    assert resolve("bfloat16", "gpu").target_quant(GGUF_Q41) is None


@pytest.mark.parametrize(
    "request_, message",
    [
        (DtypeRequest(dtype="float32", bits=8), "bits=8 apply to dtype 'quantized'"),
        (DtypeRequest(dtype="bfloat16", group_size=64), "group_size=64 apply to dtype"),
        (DtypeRequest(dtype="float16", compute_dtype="float32"), "compute_dtype=float32"),
    ],
)
def test_options_that_do_not_fit_the_dtype_are_refused(request_, message):
    with pytest.raises(ConfigError, match=message):
        resolve(request_, "cpu")


def test_tf32_is_switched_off_only_for_float32():
    env = {"KEEP": "1", TF32_ENV: "1"}
    assert policy_env(resolve("float32", "gpu"), env)[TF32_ENV] == "0"
    allowed = policy_env(resolve(DtypeRequest(dtype="float32", allow_tf32=True), "gpu"), env)
    assert TF32_ENV not in allowed and allowed["KEEP"] == "1"
    assert TF32_ENV not in policy_env(resolve("bfloat16", "gpu"), env)
    quantized_f32 = resolve(DtypeRequest(dtype="quantized", compute_dtype="float32"), "gpu")
    assert policy_env(quantized_f32, {})[TF32_ENV] == "0"


# --- every tensor of a forward pass ---------------------------------------------------------

MODULES = (
    ColumnParallelLinear,
    RowParallelLinear,
    HiddenParallelEmbedding,
    ParallelAttention,
    ParallelMLP,
    TransformerBlock,
    LlamaBody,
    nn.RMSNorm,
)


@pytest.fixture
def seen(monkeypatch) -> dict[str, set]:
    """Record the dtype of every module output, rotated q/k, and collective payload."""
    dtypes: dict[str, set] = defaultdict(set)

    def record(name: str, call):
        def wrapped(self, *args, **kwargs):
            out = call(self, *args, **kwargs)
            dtypes[name].add(out.dtype)
            return out

        return wrapped

    for cls in MODULES:
        monkeypatch.setattr(cls, "__call__", record(cls.__name__, cls.__call__))
    rotation = RoPE.rotation

    def recorded_rotation(self, offset, length):
        rotate = rotation(self, offset, length)
        return lambda x: (out := rotate(x), dtypes["rope"].add(out.dtype))[0]

    monkeypatch.setattr(RoPE, "rotation", recorded_rotation)
    run = Collectives._run

    def recorded_run(self, name, x, op):
        dtypes[f"payload {name}"].add(x.dtype)
        return run(self, name, x, op)

    monkeypatch.setattr(Collectives, "_run", recorded_run)
    return dtypes


CASES = {
    "bfloat16": (DtypeRequest(dtype="bfloat16"), mx.bfloat16),
    "float16": (DtypeRequest(dtype="float16"), mx.float16),
    "quantized": (DtypeRequest(dtype="quantized", compute_dtype="bfloat16"), mx.bfloat16),
    "quantized-cpu-default": (DtypeRequest(dtype="quantized"), mx.float32),
}
PROMPT = [504, 3575, 282, 4649, 314, 7042]


@pytest.mark.parametrize("case", list(CASES))
def test_every_tensor_is_in_the_compute_dtype(case, smollm2_gguf, seen):
    request, dtype = CASES[case]
    model = load_model(smollm2_gguf, request)
    assert model.policy.quantized == (request.dtype == "quantized")
    ids = mx.array([PROMPT])
    comm = model.comm
    comm.reset_stats()
    hidden = model.hidden(ids)  # the uncached forward, (1, L, hidden)
    mx.eval(hidden)
    # One all-reduce payload per layer and projection: 2 bytes (bf16) per hidden unit per token.
    per_token = comm.bytes["all_reduce"] / comm.counts["all_reduce"] / len(PROMPT)
    assert per_token == dtype.size * model.args.hidden_size
    cache = model.make_cache()
    model.prefill(ids, cache, 0)  # cached prefill of one row
    h = model.decode({0: PROMPT[-1]}, cache)  # one compiled decode step
    logits = model.lm_head.local_logits(h)  # what the chooser samples from, before its upcast
    mx.eval(logits)
    assert hidden.dtype == h.dtype == logits.dtype == dtype
    assert {a.dtype for a in cache.arrays()} == {dtype}
    for name, found in seen.items():
        assert found == {dtype}, f"{case}: {name} produced {found}, expected {dtype}"
    assert {"rope", "payload all_reduce", "payload all_gather", "RMSNorm"} <= seen.keys()
    if model.policy.quantized:
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.quant == GGUF_Q41 and qkv.scales.dtype == qkv.biases.dtype == dtype
