"""Safetensors read in slices and written as a stream, against the safetensors library and
numpy; and random weights made per slice, against the full random tensor."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from shardcompute.errors import ModelFormatError
from shardcompute.model.dummy import BLOCK, DummyTensor
from shardcompute.model.tensor_io import SafetensorsWriter, open_safetensors

RNG = np.random.default_rng(0)
MATRIX = RNG.standard_normal((300, 70)).astype(np.float32)
SLICES = [
    np.s_[:],
    np.s_[10:200],
    np.s_[:, 5:41],
    np.s_[17:18, 69:70],
    np.s_[250:, :33],
    np.s_[0:0],
]


def test_lazy_slices_equal_numpy_slices(tmp_path, monkeypatch):
    """Row and column slices read only what they cover, in chunks of whole rows."""
    monkeypatch.setattr("shardcompute.model.tensor_io.CHUNK_BYTES", 7 * 70 * 4)  # 7 rows a chunk
    file = tmp_path / "t.safetensors"
    save_file({"m": MATRIX, "v": MATRIX[:, 0].copy(), "u": MATRIX.view(np.uint32)}, str(file))
    tensors = open_safetensors(file)
    assert tensors["m"].shape == (300, 70) and tensors["m"].dtype == mx.float32
    for index in SLICES:
        np.testing.assert_array_equal(np.array(tensors["m"][index]), MATRIX[index])
    np.testing.assert_array_equal(np.array(tensors["v"][40:90]), MATRIX[40:90, 0])
    np.testing.assert_array_equal(np.array(tensors["u"][:, 3:9]), MATRIX.view(np.uint32)[:, 3:9])


def test_bfloat16_round_trips_through_the_writer(tmp_path):
    """bf16 (which safetensors' own numpy slicing cannot return) written by the streaming
    writer, read back by MLX and by our slices; other dtypes by the safetensors library."""
    w = mx.array(MATRIX).astype(mx.bfloat16)
    file = tmp_path / "w.safetensors"
    with SafetensorsWriter(file, ["b", "f", "q"], metadata={"rank": "0"}) as writer:
        writer.add("f", mx.array(MATRIX))
        writer.add("b", w)
        writer.add("q", mx.array(MATRIX.view(np.uint32)))
    loaded = mx.load(str(file))
    assert loaded["b"].dtype == mx.bfloat16 and mx.array_equal(loaded["b"], w).item()
    assert mx.array_equal(open_safetensors(file)["b"][:, 7:50], w[:, 7:50]).item()
    with safe_open(str(file), framework="numpy") as library:
        assert library.metadata() == {"rank": "0"}
        np.testing.assert_array_equal(library.get_tensor("f"), MATRIX)
        np.testing.assert_array_equal(library.get_tensor("q"), MATRIX.view(np.uint32))


def test_a_truncated_file_is_named(tmp_path):
    file = tmp_path / "t.safetensors"
    save_file({"m": MATRIX}, str(file))
    file.write_bytes(file.read_bytes()[:-400])
    with pytest.raises(ModelFormatError, match="t.safetensors.*'m' is truncated"):
        open_safetensors(file)["m"][:]
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelFormatError, match="junk.safetensors: unreadable safetensors header"):
        open_safetensors(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("name", ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"])
def test_dummy_slices_equal_the_full_tensor(name):
    """Either split axis, a slice along it and a slice across it (a tied LM head reading the
    embedding's rows) equal the full tensor's slices, in the dtype asked for."""
    t = DummyTensor(name, (3 * BLOCK + 5, 2 * BLOCK + 3), seed=7, dtype=mx.bfloat16)
    full = t[:]
    assert full.dtype == mx.bfloat16 and full.shape == t.shape
    for index in [np.s_[BLOCK - 3 : 2 * BLOCK + 9], np.s_[:, 5 : BLOCK + 1], np.s_[2:4, 100:]]:
        assert mx.array_equal(t[index], full[index]).item(), index
    other = DummyTensor(name, t.shape, seed=8, dtype=mx.bfloat16)
    assert not mx.array_equal(other[:], full).item()
