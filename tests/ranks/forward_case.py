"""Run under N ranks: load a model shard, then record what rank 0 sees.

Writes to --out: logits.npy (full forward of the prompt), cached/recomputed greedy tokens,
last-step logits both ways, and the collective counts of one forward.
"""

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import argparse
import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.dtypes import DtypeRequest
from shardcompute.engine.generate import generate_tokens
from shardcompute.engine.job import dtype_request
from shardcompute.model.loader import load_model


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--case", required=True, help="JSON: model, dtype, weights, shard_dir, ...")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    case = json.loads(a.case)
    comm = Collectives(init_group(case.get("backend", "ring"), case["world_size"]))
    model = load_model(
        case.get("model"),
        DtypeRequest.model_validate(dtype_request(case.get("dtype", "float32"))),
        comm,
        case.get("weights"),
        case.get("shard_dir"),
    )
    prompt = case["prompt_ids"]
    comm.reset_stats()
    logits = model(mx.array([prompt]))
    counts = dict(comm.counts)
    logits = np.array(logits[0].astype(mx.float32))
    tokens = generate_tokens(model, prompt, max_tokens=case.get("max_tokens", 64))
    sampled = generate_tokens(model, prompt, **case["sample"]) if case["sample"] else []
    full = model(mx.array([prompt + tokens]))
    recomputed = np.array(full[0].argmax(-1)).tolist()[len(prompt) - 1 : -1]
    if comm.rank == 0:
        out = Path(a.out)
        np.save(out / "logits.npy", logits)
        np.save(out / "full_logits.npy", np.array(full[0].astype(mx.float32)))
        (out / "result.json").write_text(
            json.dumps(
                {
                    "tokens": tokens,
                    "recomputed": recomputed,
                    "sampled": sampled,
                    "counts": counts,
                    "plan": model.plan.to_dict(),
                }
            )
        )


if __name__ == "__main__":
    main()
