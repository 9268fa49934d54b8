"""Pure functions that turn registered workers into a group: ranks, plan weights, hostfile."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardcompute.errors import ConfigError


@dataclass(frozen=True)
class Candidate:
    """A live worker that can take a rank, with what decides its place."""

    worker_id: str
    requested_rank: int | None  # from --rank; must be honoured exactly
    previous_rank: int | None  # keeps survivors in place when the cluster re-forms
    order: int  # registration order breaks the remaining ties
    address: str
    collective_port: int | None
    memory_bytes: int


def order_ranks(candidates: Sequence[Candidate], world_size: int) -> list[Candidate]:
    """Pick `world_size` candidates in rank order, or none when some rank has no taker.

    Requested ranks are fixed; survivors of the last group keep their previous rank; the
    rest fill the free ranks in registration order. So the same workers get the same ranks.
    """
    slots: list[Candidate | None] = [None] * world_size
    by_order = sorted(candidates, key=lambda c: c.order)
    for c in by_order:
        if c.requested_rank is not None and c.requested_rank < world_size:
            slots[c.requested_rank] = slots[c.requested_rank] or c
    free = [c for c in by_order if c.requested_rank is None]
    for c in list(free):
        rank = c.previous_rank
        if rank is not None and rank < world_size and slots[rank] is None:
            slots[rank] = c
            free.remove(c)
    for i in range(world_size):
        if slots[i] is None and free:
            slots[i] = free.pop(0)
    return [] if None in slots else [c for c in slots if c is not None]


def plan_weights(mode: str | Sequence[float], memories: Sequence[int]) -> list[float]:
    """Per-rank weights: equal, proportional to memory, or the configured list."""
    n = len(memories)
    if mode == "even":
        return [1.0] * n
    if mode == "memory":
        if any(m <= 0 for m in memories):
            raise ConfigError(
                "model.weights=memory needs every worker to report its memory; got "
                f"{list(memories)} bytes"
            )
        smallest = min(memories)
        return [round(m / smallest, 4) for m in memories]
    return [float(w) for w in mode]


def build_hostfile(ranked: Sequence[Candidate], port_base: int) -> list[str]:
    """Each rank's ring endpoint: its address and its own port, or base + rank."""
    return [f"{c.address}:{c.collective_port or port_base + rank}" for rank, c in enumerate(ranked)]
