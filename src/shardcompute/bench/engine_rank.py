"""One rank of `shardcompute bench`: load the shard, time generation, measure collectives.

Every rank runs the same steps (SPMD); rank 0 writes the rows to `--out` as JSON. EOS is not a
stop token here, so each trial makes exactly the asked-for number of tokens.
"""

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from pydantic import BaseModel, ConfigDict

from shardcompute import _blas
from shardcompute.collectives.group import Collectives, init_group
from shardcompute.dtypes import tf32_state
from shardcompute.engine.generate import generate_step
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.rank_main import load_spec
from shardcompute.model.llama import Model
from shardcompute.runtime import compute_description, mlx_device

SWEEP_TRIALS = 200


class BenchJob(BaseModel):
    """One grid cell (model, dtype, world size) and the shapes to time in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    world_size: int
    backend: str
    spec: ModelSpec
    prompt_tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]
    trials: int = 3
    warmup: int = 1
    seed: int = 0
    blas_threads: int | None = None  # per rank; None: its share of the cores (see `_blas`)
    sweep_bytes: tuple[int, ...] = (4, 2304, 16384, 262144, 1048576)


def streamed_bytes(model: Model) -> int:
    """Weight bytes one decode step reads on this rank: all but the embedding table, of which
    a step reads one row."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    embed = sum(v.nbytes for _, v in tree_flatten(model.model.embed_tokens.parameters()))
    return total - embed


def time_generation(model: Model, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds to the first token, seconds for the remaining max_tokens - 1)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)  # no stop ids: EOS never ends
    start = time.perf_counter()
    first = start
    n = 0
    for n, _ in enumerate(generate_step(model, prompt, params), 1):
        if n == 1:
            first = time.perf_counter()
    if n != max_tokens:
        raise RuntimeError(f"made {n} tokens, expected {max_tokens}")
    return first - start, time.perf_counter() - first


def collective_profile(model: Model, prompt: list[int], max_tokens: int) -> dict:
    """Collectives per token and seconds in them per token, from one profiled run (each
    collective's inputs are evaluated first, so its time is communication and waiting). The
    model's collectives are counted apart from the step plans' ("control")."""
    comm = model.comm
    comm.reset_stats()
    comm.profile = True
    try:
        ttft, rest = time_generation(model, prompt, max_tokens)
    finally:
        comm.profile = False
    per_token = {k: v / max_tokens for k, v in comm.counts.items() if k != "control"}
    seconds = sum(v for k, v in comm.seconds.items() if k != "control")
    return {
        "collectives_per_token": sum(per_token.values()),
        "collectives_by_op": per_token,
        "collective_s_per_token": seconds / max_tokens,
        "control_per_token": comm.counts["control"] / max_tokens,
        "control_s_per_token": comm.seconds["control"] / max_tokens,
        "profiled_step_s": (ttft + rest) / max_tokens,
    }


def allreduce_sweep(comm: Collectives, sizes: tuple[int, ...]) -> dict[str, float]:
    """Median microseconds of one float32 all_sum, by message size in bytes."""
    if comm.size == 1:
        return {}
    out = {}
    for size in sizes:
        x = mx.ones((max(1, size // 4),))
        times = []
        for i in range(SWEEP_TRIALS + 10):
            start = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=comm.group))
            if i >= 10:
                times.append(time.perf_counter() - start)
        out[str(size)] = statistics.median(times) * 1e6
    return out


def run(job: BenchJob) -> tuple[int, list[dict]]:
    """(this rank, the rows: one per prompt length x generation length)."""
    if job.blas_threads and _blas.loaded:
        _blas.loaded.set_threads(job.blas_threads)
    comm = Collectives(init_group(job.backend, job.world_size))
    model = load_spec(job.spec, comm)
    rng = np.random.default_rng(job.seed)
    rows = []
    for prompt_tokens in job.prompt_tokens:
        prompt = rng.integers(0, model.args.vocab_size, prompt_tokens).tolist()
        for max_tokens in job.max_tokens:
            for _ in range(job.warmup):
                time_generation(model, prompt, max_tokens)
            trials = [time_generation(model, prompt, max_tokens) for _ in range(job.trials)]
            ttft = statistics.median(t for t, _ in trials)
            decode_s = statistics.median(r for _, r in trials)
            step_s = decode_s / max(max_tokens - 1, 1)
            rows.append(
                {
                    "prompt_tokens": prompt_tokens,
                    "max_tokens": max_tokens,
                    "ttft_s": ttft,
                    "prefill_tok_s": prompt_tokens / ttft,
                    "decode_tok_s": 1 / step_s,
                    "step_s": step_s,
                    **collective_profile(model, prompt, max_tokens),
                }
            )
    sweep = allreduce_sweep(comm, job.sweep_bytes)
    # Per-rank facts, gathered: bytes streamed per step, peak MLX memory, peak RSS, TF32 off.
    mine = [
        streamed_bytes(model),
        mx.get_peak_memory(),
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        tf32_state(os.environ) == "off",
    ]
    facts = np.array(comm.all_gather(mx.array(mine, mx.float32)[None], axis=0)).tolist()
    for row in rows:
        row.update(
            model=job.spec.model,
            world_size=job.world_size,
            dtype=model.policy.name,
            policy=model.policy.describe(),
            device=mlx_device(),
            backend=job.backend if job.world_size > 1 else "none",
            blas=compute_description(),
            tf32_per_rank=["off" if f[3] else "allowed" for f in facts],
            weights=list(job.spec.weights) if job.spec.weights else None,
            streamed_bytes_per_rank=[int(f[0]) for f in facts],
            gb_s_per_rank=[f[0] * row["decode_tok_s"] / 1e9 for f in facts],
            peak_memory_bytes_per_rank=[int(f[1]) for f in facts],
            peak_rss_bytes_per_rank=[int(f[2]) for f in facts],
            allreduce_us_by_bytes=sweep,
        )
    return comm.rank, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardcompute.bench.engine_rank")
    p.add_argument("--job", required=True, help="BenchJob JSON file")
    p.add_argument("--out", required=True, help="rank 0 writes its rows here (JSON)")
    a = p.parse_args(argv)
    job = BenchJob.model_validate_json(Path(a.job).read_text())
    rank, rows = run(job)
    if rank == 0:
        Path(a.out).write_text(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
