"""`shard` records quantization and compute dtype, and a rank refuses shards quantized other
than it was asked: bits and group size are part of what a shard is."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from shardcompute.dtypes import DtypeRequest, QuantSpec, resolve
from shardcompute.errors import ShardFileError
from shardcompute.model.loader import load_model, shard_checkpoint
from shardcompute.model.sharder import read_shard

G64 = DtypeRequest(dtype="quantized", group_size=64, compute_dtype="bfloat16")


@pytest.fixture(scope="module")
def quantized_shards(tiny_hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("q64")
    shard_checkpoint(tiny_hf_model("llama3"), 1, out, dtype=G64)
    return out


def test_the_manifest_records_bits_group_and_compute_dtype(quantized_shards):
    manifest = json.loads((quantized_shards / "manifest.json").read_text())
    assert manifest["quantization"] == {"group_size": 64, "bits": 4}
    assert manifest["compute_dtype"] == "bfloat16"
    assert all(q == {"group_size": 64, "bits": 4} for q in manifest["quant"].values())
    assert len(manifest["quant"]) == 2 * 7 + 2  # every projection, the embedding, the LM head


def test_quantized_shards_load_as_the_same_model(quantized_shards, tiny_hf_model):
    """Quantized when sharded, or quantized at load from the checkpoint: the same weights."""
    ids = mx.array([[3, 17, 42, 99, 7]])
    from_shards = load_model(shard_dir=quantized_shards, dtype=G64)
    direct = load_model(tiny_hf_model("llama3"), G64)
    qkv = from_shards.model.layers[0].self_attn.qkv_proj
    assert qkv.quant == QuantSpec(64, 4) and qkv.scales.dtype == mx.bfloat16
    assert mx.array_equal(from_shards(ids), direct(ids)).item()


@pytest.mark.parametrize(
    "asked, message",
    [
        (DtypeRequest(dtype="quantized", bits=8), "quantized with bits 4, group size 64.*bits 8"),
        (DtypeRequest(dtype="quantized", group_size=32), "group size 64, but bits.*group size 32"),
    ],
)
def test_other_quantization_is_refused_with_the_numbers(quantized_shards, asked, message):
    with pytest.raises(ShardFileError, match=message):
        read_shard(quantized_shards, 0, 1, resolve(asked, "cpu"))


def test_float_shards_asked_for_a_quantization_are_refused(tiny_hf_model, tmp_path):
    shard_checkpoint(tiny_hf_model("llama3"), 1, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["quantization"] is None and manifest["compute_dtype"] == "float32"
    asked = resolve(DtypeRequest(dtype="quantized", group_size=64), "cpu")
    with pytest.raises(ShardFileError, match="hold float weights.*--dtype quantized"):
        read_shard(tmp_path, 0, 1, asked)
    # Without bits or a group size asked, float shards quantize at load (mlx-lm's default).
    model = load_model(shard_dir=tmp_path, dtype="quantized")
    assert model.model.layers[0].mlp.gate_up_proj.quant == QuantSpec(64, 4)


def test_gguf_keeps_its_32_groups(smollm2_gguf, tmp_path):
    """A Q4_1 GGUF shards as stored: its own 32-groups, float16 scales."""
    shard_checkpoint(smollm2_gguf, 2, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["quantization"] == {"group_size": 32, "bits": 4}
    assert manifest["compute_dtype"] == "float16"
