"""Run a model under N real rank processes and compare with the dense single process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

from shardcompute.dtypes import DtypeRequest
from shardcompute.engine.generate import generate_tokens
from shardcompute.engine.job import dtype_request
from shardcompute.engine.launch import launch_local
from shardcompute.model.loader import load_model

RANK_SCRIPT = str(Path(__file__).parent / "ranks" / "forward_case.py")
RANK_TIMEOUT = float(os.environ.get("SHARDCOMPUTE_TEST_RANK_TIMEOUT", 240))


def run_ranks(case: dict, out: Path) -> dict:
    """Launch forward_case.py under case['world_size'] ranks; rank 0's results."""
    out.mkdir(parents=True, exist_ok=True)
    launch_local(
        [RANK_SCRIPT, "--case", json.dumps({"sample": SAMPLE, **case}), "--out", str(out)],
        case["world_size"],
        timeout=RANK_TIMEOUT,
    )
    result = json.loads((out / "result.json").read_text())
    result["logits"] = np.load(out / "logits.npy")
    result["full_logits"] = np.load(out / "full_logits.npy")
    return result


def dense_reference(
    model_src, dtype, prompt: list[int], max_tokens: int = 64, sample: bool = True
) -> dict:
    """The same measurements from the whole model in this process. `dtype`: a name, or the
    fields of a DtypeRequest."""
    model = load_model(model_src, DtypeRequest.model_validate(dtype_request(dtype)))
    logits = np.array(model(mx.array([prompt]))[0].astype(mx.float32))
    tokens = generate_tokens(model, prompt, max_tokens=max_tokens)
    sampled = sampled_tokens(model, prompt) if sample else []
    return {"logits": logits, "tokens": tokens, "sampled": sampled}


def greedy_prefix(tokens: list[int], ref: list[int]) -> int:
    """How many greedy tokens agree before the first difference."""
    return next((i for i, (a, b) in enumerate(zip(tokens, ref, strict=True)) if a != b), len(ref))


# Seeded temperature sampling must give the same tokens at every world size (Gumbel-max).
SAMPLE = {"max_tokens": 16, "temperature": 0.8, "seed": 1234}


def sampled_tokens(model, prompt: list[int]) -> list[int]:
    return generate_tokens(model, prompt, **SAMPLE)


def rel_error(a: np.ndarray, ref: np.ndarray) -> float:
    """Max abs difference as a fraction of the reference logit range."""
    return float(np.abs(a - ref).max() / (ref.max() - ref.min()))


def print_bound(label: str, err: float) -> None:
    print(f"[bound] {label}: max|diff|/range = {err:.2e}", file=sys.stderr)
