"""SmolLM2-135M under real ranks (uneven world size 2, and 3) against the dense model."""

from __future__ import annotations

import pytest

from shardcompute.model.llama import collectives_per_forward
from shardcompute.model.loader import shard_checkpoint
from shardcompute.model_spec import ModelArgs
from tp_harness import dense_reference, print_bound, rel_error, run_ranks

PROMPT = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 7597, 314]  # "The capital of..."
TOKENS = 64


@pytest.fixture(scope="module", params=["float32", "quantized"])
def dtype_case(request, smollm2_gguf):
    dtype = request.param
    return dtype, dense_reference(smollm2_gguf, dtype, PROMPT, TOKENS)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_equals_dense(dtype_case, world_size, smollm2_gguf, tmp_path):
    dtype, ref = dtype_case
    case = {
        "model": str(smollm2_gguf),
        "world_size": world_size,
        "dtype": dtype,
        "prompt_ids": PROMPT,
        "max_tokens": TOKENS,
    }
    got = run_ranks(case, tmp_path)

    err = rel_error(got["logits"], ref["logits"])
    print_bound(f"smollm2 {dtype} world size {world_size} logits", err)
    assert err < 1e-4
    assert got["tokens"] == ref["tokens"]
    assert got["sampled"] == ref["sampled"]
    assert len(got["tokens"]) == TOKENS
    # Decoding with the KV cache equals recomputing the whole sequence.
    assert got["recomputed"] == got["tokens"]
    args = ModelArgs(
        **{
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_hidden_layers": 30,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "vocab_size": 49152,
        }
    )
    assert sum(got["counts"].values()) == collectives_per_forward(args) == 62
    assert got["counts"] == {"all_reduce": 60, "all_gather": 2}
    kv = [r["kv_heads"] for r in got["plan"]["ranks"]]
    assert sum(b - a for a, b in kv) == 3 and len(kv) == world_size


def test_weighted_preshared_plan_gives_same_tokens(smollm2_gguf, tmp_path):
    """--weights 2,1 from pre-made shard files decodes the same tokens as an even plan."""
    manifest = shard_checkpoint(smollm2_gguf, 2, tmp_path / "shards", weights=(2.0, 1.0))
    assert manifest.is_file()
    base = {"world_size": 2, "dtype": "float32", "prompt_ids": PROMPT, "max_tokens": TOKENS}
    weighted = run_ranks({**base, "shard_dir": str(tmp_path / "shards")}, tmp_path / "w")
    even = run_ranks({**base, "model": str(smollm2_gguf)}, tmp_path / "e")
    assert weighted["plan"] != even["plan"]
    assert weighted["plan"]["ranks"][0]["intermediate"] == [0, 1024]
    assert weighted["tokens"] == even["tokens"]
