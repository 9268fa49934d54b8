"""A bad GGUF file gives a ModelFormatError naming it, never a crash of the process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

from shardcompute.errors import ModelFormatError
from shardcompute.model.gguf_file import check_gguf, load_gguf, read_metadata


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory) -> Path:
    """A few KB of GGUF: string, int, float and array metadata and three tensors."""
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    tensors = {
        "a": mx.arange(64, dtype=mx.float32).reshape(8, 8),
        "b": mx.ones((32,), dtype=mx.float16),
        "c": mx.zeros((4, 4, 2), dtype=mx.float32),
    }
    meta = {
        "general.architecture": "llama",
        "llama.block_count": mx.array(2, dtype=mx.uint32),
        "llama.rope.freq_base": mx.array(10000.0, dtype=mx.float32),
        "tokenizer.ggml.tokens": [f"tok{i}" for i in range(300)],
        "tokenizer.ggml.token_type": mx.ones((300,), dtype=mx.int32),
    }
    mx.save_gguf(str(path), tensors, meta)
    return path


def test_sound_file_loads(small_gguf, smollm2_gguf):
    check_gguf(smollm2_gguf)
    tensors, meta = load_gguf(small_gguf)
    assert set(tensors) == {"a", "b", "c"} and len(meta["tokenizer.ggml.tokens"]) == 300


def test_metadata_read_without_mlx_equals_mlx(small_gguf, smollm2_gguf):
    for path in (small_gguf, smollm2_gguf):
        _, reference = mx.load(str(path), return_metadata=True)
        reference = {k: v.tolist() if isinstance(v, mx.array) else v for k, v in reference.items()}
        ours = read_metadata(path)
        assert ours == reference
        assert all(type(ours[k]) is type(v) for k, v in reference.items())
    assert ours["llama.context_length"] == 8192 and len(ours["tokenizer.ggml.merges"]) > 40000


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04" + bytes(40), "no GGUF magic"),
        (b"GGUF\x07\x00\x00\x00" + bytes(40), "version 7"),
        # What once crashed MLX: text where the counts belong.
        (b"GGUF\x03\x00\x00\x00 this is not a gguf file at all", "cannot fit"),
    ],
)
def test_garbage_is_named(tmp_path, content, message):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(ModelFormatError, match=f"bad.gguf.*{message}"):
        load_gguf(bad)


@pytest.mark.parametrize("keep", [30, 200, -300, -1])
def test_truncated_is_named(small_gguf, tmp_path, keep):
    data = small_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ModelFormatError, match="cut.gguf.*(truncated|past the end)"):
        load_gguf(cut)
    with pytest.raises(ModelFormatError, match="cut.gguf.*(truncated|past the end)"):
        read_metadata(cut)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFormatError, match="absent.gguf"):
        load_gguf(tmp_path / "absent.gguf")


FUZZ_SCRIPT = """
import json, sys
from shardcompute.errors import ModelFormatError
from shardcompute.model.gguf_file import load_gguf, read_metadata
outcomes = {"loaded": 0, "refused": 0}
for path in sys.argv[1:]:
    try:
        load_gguf(path)
        outcomes["loaded"] += 1
    except ModelFormatError:
        outcomes["refused"] += 1
    try:  # the MLX-free reader: any other exception ends the script with a traceback
        read_metadata(path)
    except ModelFormatError:
        pass
print(json.dumps(outcomes))
"""


def test_corrupted_headers_never_crash(small_gguf, tmp_path):
    """Random byte flips in the counts and first keys (half the files) or anywhere in the
    metadata: each file loads or is refused, and the process survives. Without check_gguf,
    MLX segfaults on about a third of the first kind."""
    data = small_gguf.read_bytes()
    rng = random.Random(0)
    files = []
    for i in range(60):
        bad = bytearray(data)
        end = 64 if i % 2 else 4000
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(4, end)] = rng.randrange(256)
        files.append(tmp_path / f"f{i}.gguf")
        files[-1].write_bytes(bytes(bad))
    proc = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, *map(str, files)], capture_output=True, text=True
    )
    assert proc.returncode == 0, f"crashed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    outcomes = json.loads(proc.stdout)
    assert outcomes["loaded"] + outcomes["refused"] == len(files)
    print(f"[fuzz] {outcomes}")
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0
