"""Bad input gets a clear error naming the thing: never a hang or a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shardcompute.dtypes import resolve
from shardcompute.errors import ModelFormatError, PlanError, ShardFileError
from shardcompute.model.checkpoint import read_checkpoint
from shardcompute.model.loader import shard_checkpoint
from shardcompute.model.sharder import read_shard
from shardcompute.model_spec import dummy_args
from shardcompute.parallel.plan import make_plan, parse_weights

FLOAT32 = resolve("float32", "cpu")


@pytest.fixture(scope="module")
def shards(tiny_hf_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    shard_checkpoint(tiny_hf_model("llama3"), 2, out)
    return out


def test_shards_for_another_world_size(shards):
    with pytest.raises(ShardFileError, match="made for world size 2.*world size 3"):
        read_shard(shards, 0, 3, FLOAT32)


def test_missing_truncated_and_altered_shard(shards, tmp_path):
    import shutil

    for name, damage, message in [
        ("missing", lambda f: f.unlink(), "shard file is missing"),
        ("truncated", lambda f: f.write_bytes(f.read_bytes()[:-100]), "truncated"),
        ("altered", lambda f: f.write_bytes(_flip(f.read_bytes())), "sha256"),
    ]:
        d = tmp_path / name
        shutil.copytree(shards, d)
        damage(d / "rank-1.safetensors")
        with pytest.raises(ShardFileError, match=message) as e:
            read_shard(d, 1, 2, FLOAT32)
        assert "rank-1.safetensors" in str(e.value)
    assert read_shard(shards, 1, 2, FLOAT32)[2] is not None  # the intact copy still loads


def _flip(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def test_unknown_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "hidden_size": 64})
    )
    with pytest.raises(ModelFormatError, match="unsupported architecture.*GPT2LMHeadModel"):
        read_checkpoint(tmp_path)


def test_plan_that_cannot_split():
    args = dummy_args("smollm2-135m")  # 3 KV heads
    with pytest.raises(PlanError, match="world size 4 exceeds num_key_value_heads=3"):
        make_plan(args, 4)
    with pytest.raises(PlanError, match="cannot split num_key_value_heads=3 into multiples of 4"):
        make_plan(args, 2, quant_group=256)
    with pytest.raises(PlanError, match="3 entries for world size 2"):
        parse_weights("1,2,3", 2)


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 40)
    with pytest.raises(ModelFormatError, match="broken.gguf"):
        read_checkpoint(bad)


def test_cli_reports_wrong_world_size_without_traceback(shards):
    """Through real rank processes: every rank stops, and the message names the numbers."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardcompute.cli",
            "generate",
            "--shard-dir",
            str(shards),
            "--world-size",
            "3",
            "--prompt",
            "hi",
            "--timeout",
            "120",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 2
    assert "made for world size 2" in proc.stderr and "world size 3" in proc.stderr
    assert "Traceback" not in proc.stderr
