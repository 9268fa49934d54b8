"""Measure what tensor parallelism does to low-precision output: for each dtype, the dense
model against float32 dense, and N real ranks against the dense model in the same dtype, as
the logit difference (max |diff| / range over the prompt) and the greedy prefix that agrees.

Uses the test suite's harness (tests/tp_harness.py: real ranks on 127.0.0.1). The figures in
docs/performance.md and the bounds in tests/test_tp_*.py come from runs of this script:

    python scripts/tp_precision.py --dtypes bfloat16,float16 --world-sizes 2,3 \\
        --reduce-dtype float32 --json out/tp_precision.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import shardcompute.rank_setup  # noqa: E402, F401  (before anything imports mlx.core)
from tp_harness import dense_reference, greedy_prefix, rel_error, run_ranks  # noqa: E402

PROMPT = [504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 7597, 314]  # "The capital of..."


def compare(got: dict, ref: dict) -> dict:
    return {
        "logit_diff": rel_error(got["logits"], ref["logits"]),
        "greedy_prefix": greedy_prefix(got["tokens"], ref["tokens"]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--world-sizes", default="2,3")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reduce-dtype", help="also run the ranks with this all-reduce dtype")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    from shardcompute.model.download import resolve_model

    model = str(resolve_model(a.model)) if not Path(a.model).exists() else a.model
    f32 = dense_reference(model, "float32", PROMPT, a.tokens, sample=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in a.dtypes.split(","):
            dense = dense_reference(model, dtype, PROMPT, a.tokens, sample=False)
            rows.append({"dtype": dtype, "world_size": 1, "against": "float32 dense",
                         **compare(dense, f32)})  # fmt: skip
            variants = [{"dtype": dtype}]
            if a.reduce_dtype:
                variants.append({"dtype": dtype, "reduce_dtype": a.reduce_dtype})
            for ws in (int(w) for w in a.world_sizes.split(",")):
                for request in variants:
                    case = {"model": model, "world_size": ws, "dtype": request, "sample": None}
                    got = run_ranks({**case, "prompt_ids": PROMPT, "max_tokens": a.tokens},
                                    Path(tmp) / f"{dtype}-{ws}-{len(request)}")  # fmt: skip
                    rows.append({**request, "world_size": ws, "against": f"{dtype} dense",
                                 **compare(got, dense)})  # fmt: skip
                    print(json.dumps(rows[-1]), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
