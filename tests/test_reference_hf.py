"""Single process SmolLM2-135M from the GGUF against HF transformers loading the same GGUF
(dequantized to float32): logits within 1e-3 of the logit range, 32 identical greedy tokens.

transformers' GGUF loader is independent of ours: its own reader, dequantization and Q/K
un-permutation. Loading it takes ~20 s on a 2-core CPU, so it is loaded once per module.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import LlamaForCausalLM

from shardcompute.engine.generate import generate_tokens
from shardcompute.model.loader import load_model
from shardcompute.model.tokenizer import load_tokenizer

TOLERANCE = 1e-3  # of the reference logit range
GREEDY_TOKENS = 32
RAW_PROMPTS = {
    "fact": "The capital of France is",
    "code": "def fibonacci(n):\n    if n < 2:\n        return n\n",
}
CHAT = [{"role": "user", "content": "Write a short poem about the sea and the wind."}]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> dict[str, list[int]]:
    ids = {name: tokenizer(text).input_ids for name, text in RAW_PROMPTS.items()}
    ids["chat"] = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"]
    return ids


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    return LlamaForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def our_model(smollm2_gguf):
    return load_model(smollm2_gguf, dtype="float32")


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens with HF's KV cache; also the smallest top-1/top-2 logit gap met."""
    tokens, margin = [], float("inf")
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            last = out.logits[0, -1]
            top2 = torch.topk(last, 2).values
            margin = min(margin, float(top2[0] - top2[1]))
            tokens.append(int(last.argmax()))
            step = torch.tensor([[tokens[-1]]])
            out = model(step, past_key_values=out.past_key_values, use_cache=True)
    return tokens, margin


@pytest.mark.parametrize("name", ["fact", "code", "chat"])
def test_logits_match_hf(hf_model, our_model, prompts, name):
    ids = prompts[name]
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].numpy()  # (L, vocab)
    ours = np.array(our_model(mx.array([ids]))[0].astype(mx.float32))  # (L, vocab)
    assert ours.shape == ref.shape
    err = float(np.abs(ours - ref).max() / (ref.max() - ref.min()))
    print(f"[bound] smollm2 vs HF, {name} ({len(ids)} tokens): max|diff|/range = {err:.2e}")
    assert err < TOLERANCE, f"{name}: logits differ from HF by {err:.2e} of the range"


@pytest.mark.parametrize("name", ["fact", "chat"])
def test_greedy_tokens_match_hf(hf_model, our_model, prompts, tokenizer, name):
    ids = prompts[name]
    ref, margin = hf_greedy(hf_model, ids, GREEDY_TOKENS)
    ours = generate_tokens(our_model, ids, max_tokens=GREEDY_TOKENS, temperature=0.0)
    print(f"[greedy] {name}: smallest top-1/top-2 gap {margin:.3f}: {tokenizer.decode(ref)!r}")
    assert ours == ref
