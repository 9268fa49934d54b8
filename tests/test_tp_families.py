"""Tiny random Llama-3 (rope scaling), Qwen2 (q/k/v bias) and Mistral checkpoints:
sharded equals dense at world sizes 2 and 4, as real ranks."""

from __future__ import annotations

import pytest

from tp_harness import dense_reference, print_bound, rel_error, run_ranks

PROMPT = [3, 17, 42, 99, 7, 128, 5, 250, 61]
TOKENS = 16


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_family_sharded_equals_dense(family, world_size, tiny_hf_model, tmp_path):
    path = tiny_hf_model(family)
    ref = dense_reference(path, "float32", PROMPT, TOKENS)
    case = {
        "model": str(path),
        "world_size": world_size,
        "dtype": "float32",
        "prompt_ids": PROMPT,
        "max_tokens": TOKENS,
    }
    got = run_ranks(case, tmp_path)
    err = rel_error(got["logits"], ref["logits"])
    print_bound(f"{family} world size {world_size} logits", err)
    assert err < 1e-4
    assert got["tokens"] == ref["tokens"]
    assert got["recomputed"] == got["tokens"]
    assert got["counts"] == {"all_reduce": 2 * 2, "all_gather": 2}  # 2 layers
