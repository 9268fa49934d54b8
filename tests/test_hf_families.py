"""Architecture variants against HF transformers: tiny random checkpoints saved by transformers
(safetensors + config.json), loaded by our loader, logits compared with HF's own forward."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from shardcompute.model.loader import load_model

TOLERANCE = 1e-4  # of the reference logit range, float32
SEQ_LEN = 48


def rel_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference as a fraction of the reference logit range."""
    return float(np.abs(ours - ref).max() / (ref.max() - ref.min()))


def prompt_ids(vocab: int = 256) -> list[int]:
    return np.random.default_rng(1).integers(0, vocab, SEQ_LEN).tolist()


def hf_logits(model_dir, ids: list[int], **config_overrides) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **config_overrides
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (L, vocab)


@pytest.mark.parametrize("family", ["llama3", "llama3-legacy", "qwen2", "mistral", "llama-tied"])
def test_logits_match_hf(tiny_hf_model, family):
    path = tiny_hf_model(family)
    ids = prompt_ids()
    ref = hf_logits(path, ids)
    ours = np.array(load_model(path, dtype="float32")(mx.array([ids]))[0])  # (L, vocab)
    assert ours.shape == ref.shape
    err = rel_error(ours, ref)
    print(f"[bound] {family}: max|diff|/range = {err:.2e}")
    assert err < TOLERANCE, f"{family}: logits differ from HF by {err:.2e} of the range"


def test_rope_scaling_changes_the_logits(tiny_hf_model):
    """The llama3 case can fail: dropping its rope scaling moves the logits far past tolerance."""
    path = tiny_hf_model("llama3")
    ids = prompt_ids()
    scaled = hf_logits(path, ids)
    unscaled = hf_logits(path, ids, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert rel_error(unscaled, scaled) > 100 * TOLERANCE
