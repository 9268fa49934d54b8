"""Run under N ranks: load this rank's share of a checkpoint and report its memory.

Writes --out/rank-R.json: the process's peak RSS (VmHWM) once the runtime is up and the group
formed (the baseline), and again after the model is loaded, with the shard's bytes."""

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import argparse
import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.model.loader import load_model


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    comm = Collectives(init_group("ring", a.world_size))
    mx.eval(comm.all_sum(mx.ones((4,))))  # the collective runtime up, as in a serving rank
    baseline = peak_rss()
    model = load_model(a.model, "float32", comm)
    loaded = peak_rss()
    shard = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    result = {"rank": comm.rank, "baseline": baseline, "peak": loaded, "shard_bytes": shard}
    Path(a.out, f"rank-{comm.rank}.json").write_text(json.dumps(result))
    comm.barrier()


if __name__ == "__main__":
    main()
