"""The control plane reads a model's args and tokenizer without MLX, and gets what the engine
gets: the same ModelArgs as MLX's reading of the checkpoint, the same prompt ids."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import pytest

from processes import child_env
from shardcompute.engine.rank_main import encode_prompt
from shardcompute.errors import ModelFormatError
from shardcompute.model.loader import shard_checkpoint
from shardcompute.model.metadata import read_model_info
from shardcompute.model.tokenizer import ByteTokenizer, encode_chat, encode_text, load_tokenizer
from shardcompute.model_spec import ModelArgs, dummy_args

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is the capital of France?"},
]


def test_gguf_args_and_ids_match_the_engines(smollm2_gguf):
    info = read_model_info(str(smollm2_gguf))
    _, meta = mx.load(str(smollm2_gguf), return_metadata=True)  # MLX's reading: the reference
    assert info.args == ModelArgs.from_gguf_metadata(meta, "mlx")
    assert info.context_length == 8192
    text = "The capital of France is"
    assert encode_text(info.tokenizer, text) == encode_prompt(info.tokenizer, text, chat=False)
    assert encode_chat(info.tokenizer, MESSAGES) == encode_prompt(
        load_tokenizer(smollm2_gguf), MESSAGES, chat=True
    )


def test_short_name_is_resolved(smollm2_gguf):
    assert read_model_info("smollm2-135m").source == str(smollm2_gguf)


def test_dummy_model_has_its_config_and_the_byte_tokenizer():
    info = read_model_info("dummy:llama-3-8b")
    assert info.args == dummy_args("llama-3-8b") and info.context_length == 8192
    assert isinstance(info.tokenizer, ByteTokenizer)
    assert encode_chat(info.tokenizer, MESSAGES) == list(
        b"Be brief.\nWhat is the capital of France?"
    )
    with pytest.raises(ModelFormatError, match="unknown dummy model 'nope'"):
        read_model_info("dummy:nope")


def test_hf_dir_args_come_from_config_json(tiny_hf_model, smollm2_gguf):
    model = tiny_hf_model("llama3")
    load_tokenizer(smollm2_gguf).save_pretrained(str(model))  # any tokenizer will do here
    info = read_model_info(str(model))
    config = json.loads((model / "config.json").read_text())
    assert info.args == ModelArgs.from_hf_config(config)
    assert info.context_length == config["max_position_embeddings"] == 512


def test_shard_dir_gives_its_manifest_args_and_saved_tokenizer(
    tiny_hf_model, smollm2_gguf, tmp_path
):
    model = tiny_hf_model("qwen2")
    shard_checkpoint(model, 2, tmp_path)
    load_tokenizer(smollm2_gguf).save_pretrained(str(tmp_path / "tokenizer"))
    info = read_model_info("unused-name", tmp_path)
    config = json.loads((model / "config.json").read_text())
    assert info.args == ModelArgs.from_hf_config(config) and info.args.model_type == "qwen2"
    assert info.source == str(tmp_path)
    assert info.tokenizer.encode("hello") == load_tokenizer(smollm2_gguf).encode("hello")


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="manifest.json: not valid JSON"):
        read_model_info("dummy-free", tmp_path)
    with pytest.raises(ModelFormatError, match="not found"):
        read_model_info(str(tmp_path / "absent.gguf"))


NO_MLX = """
import sys
from shardcompute.coordinator.app import create_app
from shardcompute.model.metadata import read_model_info
from shardcompute.model.tokenizer import encode_chat
info = read_model_info(sys.argv[1])
encode_chat(info.tokenizer, [{"role": "user", "content": "hi"}])
print(sorted(m for m in sys.modules if m.split(".")[0] in ("mlx", "torch")))
"""


def test_reading_a_gguf_model_imports_no_mlx(smollm2_gguf):
    out = subprocess.run(
        [sys.executable, "-c", NO_MLX, str(smollm2_gguf)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"  # neither MLX nor (through transformers) torch
