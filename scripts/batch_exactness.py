"""What batching does to exactness: one row's logits decoded alone against the same row decoded
beside others (batches of 2, 4 and 8 rows of different prompts and lengths), as
max |diff| / logit range over a few decode steps, and whether the greedy token ever differs.
The batch's prompts are prefilled one row at a time, and packed into one pass as the engine
does when they arrive together (`Model.prefill_packed`).

    python scripts/batch_exactness.py [--model smollm2-135m] [--dtype float32] [--steps 16]
"""

from __future__ import annotations

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU process sets up its BLAS before MLX)
# isort: on

import argparse
import json

import mlx.core as mx
import numpy as np

from shardcompute.model.loader import load_model


def logits_of(model, prompts: list[list[int]], steps: int, packed: bool) -> list[np.ndarray]:
    """Row 0's logits after its prompt and at each decode step, with every prompt as a row of
    the batch; every row is fed its own greedy token, so row 0 sees exactly what it would
    alone."""
    cache = model.make_cache()
    if packed:
        hs = model.prefill_packed(list(enumerate(prompts)), cache)
    else:
        hs = [model.prefill(mx.array([ids]), cache, slot) for slot, ids in enumerate(prompts)]
    first = [model.lm_head(h[:, -1:])[0, -1].astype(mx.float32) for h in hs]
    last = {slot: int(f.argmax().item()) for slot, f in enumerate(first)}
    out = [np.array(first[0])]
    for _ in range(steps):
        h = model.decode(dict(last), cache)
        logits = model.lm_head(h)[:, -1].astype(mx.float32)  # (rows, vocab)
        out.append(np.array(logits[0]))
        last = dict(zip(last, logits.argmax(-1).tolist(), strict=True))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=16)
    a = p.parse_args()
    model = load_model(a.model, a.dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.args.vocab_size, n).tolist() for n in (40, 7, 300, 90)]
    prompts += [rng.integers(0, model.args.vocab_size, n).tolist() for n in (12, 150, 64, 5)]
    alone = logits_of(model, prompts[:1], a.steps, packed=False)
    rows = []
    for batch, packed in [(b, p) for p in (False, True) for b in (2, 4, 8)]:
        together = logits_of(model, prompts[:batch], a.steps, packed)
        diff = max(
            np.abs(x - y).max() / (y.max() - y.min()) for x, y in zip(together, alone, strict=True)
        )
        flips = sum(int(x.argmax() != y.argmax()) for x, y in zip(together, alone, strict=True))
        row = {"batch": batch, "prefill": "packed" if packed else "by row"}
        row |= {"max_logit_diff_of_range": float(diff), "argmax_flips": flips}
        rows.append(row)
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
