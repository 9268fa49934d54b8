"""A thin, counted wrapper over an `mx.distributed.Group`.

Every op is counted per call (collectives are graph ops: the count is per forward pass, not
per evaluation). A size-1 group makes every op the identity, so layers are tested in-process.
With `profile=True` each op evaluates its input and output, so its wall time is the time
spent communicating; that serializes the graph and is for benchmarks only.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

BACKENDS = ("ring", "mpi", "nccl", "jaccl", "any")


def init_group(backend: str = "ring", world_size: int = 1) -> mx.distributed.Group | None:
    """Join the distributed group described by MLX_RANK / MLX_HOSTFILE, or None for one rank."""
    if world_size == 1:
        return None
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() != world_size:
        from shardcompute.errors import CollectiveError

        raise CollectiveError(
            f"backend {backend!r} formed a group of {group.size()} ranks, expected {world_size}"
        )
    return group


class Collectives:
    """Counted all-reduce / all-gather / broadcast over one group (or none: a single rank)."""

    def __init__(
        self,
        group: mx.distributed.Group | None = None,
        profile: bool = False,
        reduce_dtype: mx.Dtype | None = None,
    ):
        self.group = group
        self.rank = group.rank() if group is not None else 0
        self.size = group.size() if group is not None else 1
        self.profile = profile
        # All-reduces in this dtype and back (e.g. float32 sums of bf16 partials); None: as is.
        self.reduce_dtype = reduce_dtype
        self.counts: Counter[str] = Counter()
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.bytes: Counter[str] = Counter()

    @classmethod
    def pending(cls, rank: int, size: int, profile: bool = False) -> Collectives:
        """Collectives whose group is joined later (`join`): a ring engine loads its slice,
        which needs only its rank, before the group forms (see `rendezvous`)."""
        comm = cls(None, profile)
        comm.rank, comm.size = rank, size
        return comm

    def join(self, group: mx.distributed.Group | None) -> None:
        """Take the formed group; it must be the rank and size this was made for."""
        ranks = (group.rank(), group.size()) if group is not None else (0, 1)
        if ranks != (self.rank, self.size):
            from shardcompute.errors import CollectiveError

            raise CollectiveError(
                f"the group formed as rank {ranks[0]} of {ranks[1]}, "
                f"expected rank {self.rank} of {self.size}"
            )
        self.group = group

    def reset_stats(self) -> None:
        self.counts.clear()
        self.seconds.clear()
        self.bytes.clear()

    def stats(self) -> dict[str, Any]:
        """Counts, seconds and bytes per op, as plain JSON-able data."""
        return {
            "counts": dict(self.counts),
            "seconds": dict(self.seconds),
            "bytes": dict(self.bytes),
        }

    def all_sum(self, x: mx.array) -> mx.array:
        """Sum `x` over all ranks (the row-parallel all-reduce), in `reduce_dtype` if set."""
        wire = self.reduce_dtype
        if wire is None or wire == x.dtype or self.size == 1:
            return self._run("all_reduce", x, lambda a: mx.distributed.all_sum(a, group=self.group))
        summed = self._run(
            "all_reduce", x.astype(wire), lambda a: mx.distributed.all_sum(a, group=self.group)
        )
        return summed.astype(x.dtype)

    def all_gather(self, x: mx.array, axis: int = -1, sizes: Sequence[int] | None = None):
        """Concatenate every rank's `x` along `axis`.

        `sizes[r]` is rank r's extent along `axis` when the split is uneven: shorter parts are
        zero-padded to the largest for the wire and trimmed after, since MLX gathers equal shapes.
        """
        return self._run("all_gather", x, lambda a: self._gather(a, axis, sizes))

    def control_sum(self, x: mx.array) -> mx.array:
        """An all-reduce of control data (step plans), counted apart from the model's."""
        return self._run("control", x, lambda a: mx.distributed.all_sum(a, group=self.group))

    def control_broadcast(self, x: mx.array, root: int = 0) -> mx.array:
        """`broadcast` of control data, counted apart from the model's collectives."""
        return self.broadcast(x, root, name="control")

    def broadcast(self, x: mx.array, root: int = 0, name: str = "broadcast") -> mx.array:
        """Every rank gets root's `x` (same shape and dtype on all ranks)."""

        def op(a: mx.array) -> mx.array:
            # Non-roots send zeros, but after computing `a`: every rank must run the
            # collectives inside `a`'s graph before this one, in the same order.
            mine = a if self.rank == root else mx.depends([mx.zeros_like(a)], [a])[0]
            return mx.distributed.all_sum(mine, group=self.group)

        return self._run(name, x, op)

    def broadcast_object(self, obj: Any = None, root: int = 0) -> Any:
        """Send a small JSON-able control message from root to every rank; returns it."""
        if self.size == 1:
            self.counts["control"] += 1
            return obj
        payload = json.dumps(obj).encode() if self.rank == root else b""
        length = self.control_broadcast(mx.array([len(payload)], dtype=mx.int32), root)
        n = int(length.item())
        data = mx.array(list(payload), dtype=mx.uint8) if self.rank == root else None
        data = self.control_broadcast(data if data is not None else mx.zeros((n,), mx.uint8), root)
        return json.loads(bytes(data.tolist()).decode())

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        mx.eval(self.all_sum(mx.array([1.0])))

    def _run(self, name: str, x: mx.array, op) -> mx.array:
        self.counts[name] += 1
        self.bytes[name] += x.nbytes
        if self.size == 1:
            return x
        if self.group is None:  # MLX would form a default group of its own here
            raise RuntimeError(f"{name} before this rank joined its group (Collectives.join)")
        if not self.profile:
            return op(x)
        mx.eval(x)
        start = time.perf_counter()
        out = op(x)
        mx.eval(out)
        self.seconds[name] += time.perf_counter() - start
        return out

    def _gather(self, x: mx.array, axis: int, sizes: Sequence[int] | None) -> mx.array:
        x = mx.moveaxis(x, axis, 0)
        n = x.shape[0]
        width = max(sizes) if sizes else n
        if width > n:
            x = mx.concatenate([x, mx.zeros((width - n, *x.shape[1:]), x.dtype)])
        full = mx.distributed.all_gather(x, group=self.group)
        if sizes and any(s != width for s in sizes):
            parts = [full[r * width : r * width + s] for r, s in enumerate(sizes)]
            full = mx.concatenate(parts)
        return mx.moveaxis(full, 0, axis)
