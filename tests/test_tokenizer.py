"""Tokenizers built from GGUF metadata give the same ids as transformers' own GGUF loader."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest
from tokenizers import SentencePieceBPETokenizer
from transformers import AutoTokenizer

import shardcompute.model.tokenizer as tokenizer_mod
from shardcompute.errors import ModelFormatError
from shardcompute.model.tokenizer import CACHE_SUFFIX, load_tokenizer, read_gguf_metadata

TEXTS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces\n\n\ttabs and trailing   ",
    "12345 3.14159 1,000,000 and 2024-06-01",
    "naïve café — 日本語のテキスト, Ελληνικά, русский 🤖🚀 emoji",
    "def f(x):\n    return x**2  # comment\n\n\nclass A:\n\tpass\n",
    "It's we'll they've I'M don't",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "a\r\nb\r\n\r\n",
    "",
    " ",
    "     \n",
    "unbelievably antidisestablishmentarianism",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2? Answer in one word."},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
]


def write_gguf(path: Path, meta: dict) -> Path:
    """A GGUF holding only metadata and one dummy tensor."""
    mx.save_gguf(str(path), {"dummy": mx.zeros((4,))}, meta)
    return path


def hf_gguf_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def smol_copy(smollm2_gguf, tmp_path_factory) -> Path:
    """A link to the GGUF in a fresh directory, so the first load builds (not the shared cache)."""
    link = tmp_path_factory.mktemp("smol") / "smol.gguf"
    link.symlink_to(smollm2_gguf)
    return link


@pytest.fixture(scope="module")
def built(smol_copy):
    assert not smol_copy.with_name(smol_copy.name + CACHE_SUFFIX).exists()
    return load_tokenizer(smol_copy)


@pytest.fixture(scope="module")
def cached(smol_copy, built):
    assert smol_copy.with_name(smol_copy.name + CACHE_SUFFIX).is_dir()
    return load_tokenizer(smol_copy)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return hf_gguf_tokenizer(smollm2_gguf)


@pytest.mark.parametrize("which", ["built", "cached"])
def test_smollm2_ids_match_transformers(request, reference, which):
    ours = request.getfixturevalue(which)
    for text in TEXTS:
        assert ours(text).input_ids == reference(text).input_ids, repr(text)
        assert ours.decode(ours(text).input_ids) == text


@pytest.mark.parametrize("which", ["built", "cached"])
def test_smollm2_chat_template(request, reference, which):
    ours = request.getfixturevalue(which)
    for messages in (MESSAGES, MESSAGES[1:2]):
        text = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == reference.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        assert text.endswith("<|im_start|>assistant\n")
        assert ours(text).input_ids == reference(text).input_ids
    first_turn = ours.apply_chat_template(MESSAGES[1:2], tokenize=False)
    assert first_turn.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("which", ["built", "cached"])
def test_smollm2_special_tokens(request, smollm2_gguf, which):
    ours = request.getfixturevalue(which)
    meta = read_gguf_metadata(smollm2_gguf)
    assert ours.bos_token_id == meta["tokenizer.ggml.bos_token_id"] == 1
    assert ours.eos_token_id == meta["tokenizer.ggml.eos_token_id"] == 2
    assert ours.pad_token_id == meta["tokenizer.ggml.padding_token_id"]
    assert ours.convert_tokens_to_ids("<|endoftext|>") == 0
    assert not ours.add_bos_token  # the file says so: no BOS before the text
    assert ours("hi").input_ids[0] != ours.bos_token_id
    assert len(ours) == len(meta["tokenizer.ggml.tokens"])


def test_cache_is_used_and_refreshed(smol_copy, built, cached, monkeypatch):
    cache = smol_copy.with_name(smol_copy.name + CACHE_SUFFIX)
    assert (cache / "tokenizer.json").is_file() and (cache / "tokenizer_config.json").is_file()

    def no_build(*_a, **_k):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setattr(tokenizer_mod, "tokenizer_from_gguf_metadata", no_build)
    load_tokenizer(smol_copy)
    monkeypatch.undo()
    # A changed file (here only its mtime) invalidates the cache: the next load rebuilds it.
    st = os.stat(smol_copy)
    os.utime(smol_copy, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    monkeypatch.setattr(tokenizer_mod, "tokenizer_from_gguf_metadata", no_build)
    with pytest.raises(AssertionError, match="rebuilt"):
        load_tokenizer(smol_copy)


def test_unwritable_directory_still_loads(smollm2_gguf, tmp_path, monkeypatch, reference):
    link = tmp_path / "m.gguf"
    link.symlink_to(smollm2_gguf)

    def read_only(*_a, **_k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(tokenizer_mod.tempfile, "mkdtemp", read_only)
    ours = load_tokenizer(link)
    assert not link.with_name(link.name + CACHE_SUFFIX).exists()
    assert ours(TEXTS[4]).input_ids == reference(TEXTS[4]).input_ids


def test_hf_directory(built, tmp_path):
    built.save_pretrained(str(tmp_path))
    ours = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert ours(text).input_ids == built(text).input_ids
    assert ours.chat_template == built.chat_template


def smollm_meta_with_pre(smollm2_gguf, pre: str) -> dict:
    _, meta = mx.load(str(smollm2_gguf), return_metadata=True)
    meta = {k: v for k, v in meta.items() if k.startswith(("tokenizer.", "general.architecture"))}
    return {**meta, "tokenizer.ggml.pre": pre}


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_regex_pre_tokenizers_match_transformers(smollm2_gguf, tmp_path, pre):
    """The Llama 3 and Qwen2 split rules, on SmolLM2's vocabulary."""
    path = write_gguf(tmp_path / "t.gguf", smollm_meta_with_pre(smollm2_gguf, pre))
    ours, reference = load_tokenizer(path), hf_gguf_tokenizer(path)
    for text in TEXTS:
        assert ours(text).input_ids == reference(text).input_ids, repr(text)


def sentencepiece_meta() -> dict:
    """A Llama-2-style SentencePiece vocabulary (unk, bos, eos, 256 byte tokens, BPE pieces
    with scores), trained here on some Python source since no real one is available offline."""
    corpus = [inspect.getsource(m) for m in (json, argparse, textwrap)]
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(corpus, vocab_size=600, min_frequency=2, show_progress=False)
    pieces = [t for t, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": mx.array(scores, dtype=mx.float32),
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.bos_token_id": mx.array(1, dtype=mx.uint32),
        "tokenizer.ggml.eos_token_id": mx.array(2, dtype=mx.uint32),
        "tokenizer.ggml.unknown_token_id": mx.array(0, dtype=mx.uint32),
    }


def test_sentencepiece_matches_transformers(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", sentencepiece_meta())
    reference = hf_gguf_tokenizer(path)
    for ours in (load_tokenizer(path), load_tokenizer(path)):  # built, then cached
        assert ours.add_bos_token
        for text in TEXTS + ["<s>inside</s> text", "parse_args(self, args=None)"]:
            ids = ours(text).input_ids
            assert ids == reference(text).input_ids, repr(text)
            assert ids[0] == 1  # BOS
            assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
                ids, skip_special_tokens=True
            )


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ModelFormatError, match="nope.gguf"):
        load_tokenizer(tmp_path / "nope.gguf")


def test_unreadable_gguf_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00 this is not a gguf file")
    with pytest.raises(ModelFormatError, match="broken.gguf"):
        load_tokenizer(bad)


def test_gguf_without_tokenizer(tmp_path):
    path = write_gguf(tmp_path / "bare.gguf", {"general.architecture": "llama"})
    with pytest.raises(ModelFormatError, match="bare.gguf.*no tokenizer"):
        load_tokenizer(path)


def test_unsupported_tokenizer_model_is_named(tmp_path):
    meta = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["[PAD]", "a"]}
    with pytest.raises(ModelFormatError, match="'bert'"):
        load_tokenizer(write_gguf(tmp_path / "b.gguf", meta))


def test_unsupported_pre_tokenizer_is_named(tmp_path):
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "falcon",
        "tokenizer.ggml.tokens": ["a", "b", "ab"],
        "tokenizer.ggml.merges": ["a b"],
    }
    with pytest.raises(ModelFormatError, match="'falcon'"):
        load_tokenizer(write_gguf(tmp_path / "f.gguf", meta))


def test_not_a_tokenizer(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelFormatError, match="weights.bin"):
        load_tokenizer(tmp_path / "weights.bin")
    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
