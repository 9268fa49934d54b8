"""Shared fixtures: the real SmolLM2 GGUF, and tiny random HF checkpoints per model family."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The test process computes float32 in-process: IEEE float32 (no TF32 on CUDA), set before MLX
# loads, and on the CPU the fast BLAS, as every rank process gets them.
os.environ.setdefault("MLX_ENABLE_TF32", "0")
import shardcompute.rank_setup  # noqa: E402, F401  (before anything imports mlx.core)
from shardcompute.model.download import DEFAULT_MODEL, resolve_model  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 GGUF, fetched into the model cache on first use.

    The cache is $SHARDCOMPUTE_MODEL_CACHE or ~/.cache/shardcompute/models.
    """
    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def greedy_chat_reply(smollm2_gguf) -> Callable[[str, int], str]:
    """Factory: `greedy_chat_reply(question, max_tokens)` -> the greedy reply of the dense,
    single-process SmolLM2 (float32) to one user message through its chat template."""
    from shardcompute.engine.generate import stream_generate
    from shardcompute.engine.job import ModelSpec
    from shardcompute.engine.params import SamplingParams
    from shardcompute.engine.rank_main import encode_prompt, stop_ids, tokenizer_for
    from shardcompute.model.loader import load_model

    model = load_model(smollm2_gguf, "float32")
    tokenizer = tokenizer_for(ModelSpec(model=str(smollm2_gguf)))

    def reply(question: str, max_tokens: int) -> str:
        ids = encode_prompt(tokenizer, question, chat=True)
        stops = stop_ids(tokenizer, model)
        params = SamplingParams(max_tokens=max_tokens, temperature=0, stop_token_ids=stops)
        return "".join(r.text for r in stream_generate(model, tokenizer, ids, params))

    return reply


# Small enough to build in milliseconds, shaped for sharding at world sizes 2 and 4: 4 KV
# heads, and every split dimension (heads * head_dim, intermediate, vocab) a multiple of 4 * 32,
# so quantized weights (group 32) split too. initializer_range is large so attention is sharp
# and RoPE errors show in the logits.
TINY_COMMON: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=512,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
TINY_FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3: GQA (8 query heads on 4 KV heads) and llama3 rope scaling.
    "llama3": ("LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    # The same, with config.json in the pre-transformers-5 layout the Hub's Llama 3 repos use.
    "llama3-legacy": ("LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    # Qwen2: q/k/v biases, rms eps 1e-6, large rope theta.
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=1000000.0, rms_norm_eps=1e-6)),
    "mistral": ("MistralForCausalLM", dict(rope_theta=1000000.0, sliding_window=None)),
    # Tied embeddings (no lm_head.weight in the file), plain multi-head attention, head_dim 32.
    "llama-tied": (
        "LlamaForCausalLM",
        dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    ),
    # Wide enough to quantize with group 64 at world sizes 2 (uneven: 3 KV heads) and 3.
    "llama-g64": (
        "LlamaForCausalLM",
        dict(
            hidden_size=384,
            intermediate_size=768,
            num_attention_heads=6,
            num_key_value_heads=3,
            vocab_size=512,
        ),
    ),
}


def make_tiny_hf_model(family: str, out: Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny random HF checkpoint (config.json + model.safetensors) of `family` in out."""
    import torch
    import transformers

    arch, extra = TINY_FAMILIES[family]
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**{**TINY_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    _randomize_norms_and_biases(model)
    model.save_pretrained(out)
    if family == "llama3-legacy":
        _legacy_rope_config(out / "config.json")
    return out


def _randomize_norms_and_biases(model) -> None:
    """HF initializes norms to 1 and biases to 0, which would hide a missing norm or bias."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))


def _legacy_rope_config(config_file: Path) -> None:
    """Rewrite transformers 5's `rope_parameters` as top-level rope_theta + rope_scaling."""
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    config_file.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory) -> Callable[..., Path]:
    """Factory: `tiny_hf_model(family)` -> directory of a tiny random HF checkpoint.

    Families: llama3, llama3-legacy, qwen2, mistral, llama-tied, llama-g64. Built once per
    session.
    """
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in TINY_FAMILIES:
            raise KeyError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}")
        if family not in built:
            out = tmp_path_factory.mktemp(f"tiny-{family}")
            built[family] = make_tiny_hf_model(family, out)
        return built[family]

    return get
