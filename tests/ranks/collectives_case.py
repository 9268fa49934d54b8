"""Run under N ranks: exercise every collective and write what rank 0 got.

With a fourth argument `meet`, the ring forms as an engine forms it: after a rendezvous
(collectives/rendezvous.py) that the ranks reach at different times, rank 0 last, as when it
loads longest, into Collectives made before the group."""

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import json
import os
import sys
import time

import mlx.core as mx

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.collectives.rendezvous import Rendezvous


def meet_then_form(backend: str, world_size: int) -> Collectives:
    rank = int(os.environ["MLX_RANK"])
    with open(os.environ["MLX_HOSTFILE"]) as f:
        hostfile = [entries[0] for entries in json.load(f)]
    meeting = Rendezvous(hostfile, rank, generation=7, timeout=60)
    meeting.open()
    comm = Collectives.pending(rank, world_size)
    time.sleep(0.3 * (world_size - 1 - rank))  # "loading": the last rank is done first
    meeting.meet()
    comm.join(init_group(backend, world_size))
    return comm


def main() -> None:
    backend, world_size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if sys.argv[4:] == ["meet"]:
        comm = meet_then_form(backend, world_size)
    else:
        comm = Collectives(init_group(backend, world_size))
    r = comm.rank
    summed = comm.all_sum(mx.full((3,), float(r + 1)))
    sizes = [r_ + 1 for r_ in range(world_size)]  # uneven: rank r holds r + 1 columns
    gathered = comm.all_gather(mx.full((2, r + 1), float(r)), axis=-1, sizes=sizes)
    token = comm.broadcast(mx.array([41 + r, 7], mx.int32))
    obj = comm.broadcast_object({"from": r, "text": "héllo"} if r == 0 else None)
    comm.barrier()
    result = {
        "sum": summed.tolist(),
        "gathered": gathered.tolist(),
        "token": token.tolist(),
        "obj": obj,
        "counts": dict(comm.counts),
    }
    if r == 0:
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
