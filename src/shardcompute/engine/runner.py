"""Executes step plans on this rank's model: the one place in the engine that runs MLX.

`StepLoop` is the SPMD loop every rank runs, for `generate`, the benchmark and the serving
engine alike: rank 0's leader plans, the plan is exchanged (one small collective when nothing
changes), every rank executes it on its own shard, and every rank gets the same tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import mlx.core as mx

from shardcompute.collectives.group import Collectives
from shardcompute.engine.sampling import RowSampler, VocabParallelChooser
from shardcompute.engine.step_plan import HEADER_FIELDS, StepPlan, exit_votes, payload_length
from shardcompute.model.llama import Model


class Runner:
    """This rank's rows: the batched KV cache, each row's sampler and last token."""

    def __init__(self, model: Model):
        self.model = model
        self.cache = model.make_cache()
        self.chooser = VocabParallelChooser(model.lm_head)
        self.rows: dict[int, RowSampler] = {}
        self.last: dict[int, int] = {}  # the token each decoding row feeds next

    def execute(
        self, plan: StepPlan, on_tokens: Callable[[dict[int, int]], None] = lambda t: None
    ) -> dict[int, int]:
        """Run one step; the tokens it chose, {slot: token}: one per decoding row, and a first
        one for each row whose prompt ends in this step's prefill. `on_tokens` gets each group
        as soon as it is chosen (the decoding rows', then each prompt's first), so a request
        need not wait for the rest of the step's prefills."""
        changes = plan.changes
        for slot in changes.leaves:
            self.cache.free(slot)
            self.rows.pop(slot, None)
            self.last.pop(slot, None)
        for j in changes.joins:
            self.rows[j.slot] = RowSampler.joining(j.temperature, j.top_k, j.top_p, j.seed, j.skip)
            if j.last_token is not None:
                self.last[j.slot] = j.last_token
        self.cache.resize(plan.kv_rows, plan.kv_capacity)
        tokens = {}
        if plan.decode:
            h = self.model.decode({s: self.last[s] for s in plan.decode}, self.cache)
            chosen = self.chooser(h, [self.rows[s] for s in plan.decode])
            self._chose(dict(zip(plan.decode, chosen.tolist(), strict=True)), tokens, on_tokens)
        if changes.prefill:  # every chunk in one pass; the prompts that end get a first token
            chunks = [(c.slot, c.tokens) for c in changes.prefill]
            hs = self.model.prefill_packed(chunks, self.cache)
            ending = [
                (c.slot, h[:, -1:]) for c, h in zip(changes.prefill, hs, strict=True) if c.last
            ]
            if ending:
                last = mx.concatenate([h for _, h in ending], axis=0)
                first = self.chooser(last, [self.rows[slot] for slot, _ in ending]).tolist()
                self._chose(
                    dict(zip([s for s, _ in ending], first, strict=True)), tokens, on_tokens
                )
            else:
                mx.eval(hs)  # a chunk's cost stays in its own step
        return tokens

    def _chose(self, chosen: dict[int, int], tokens: dict[int, int], on_tokens) -> None:
        self.last.update(chosen)
        tokens.update(chosen)
        on_tokens(chosen)


class Leader(Protocol):
    """Rank 0's side of the loop (engine/leader.py)."""

    def next_plan(self) -> StepPlan: ...

    def take_tokens(self, tokens: dict[int, int]) -> None: ...

    def wait(self, seconds: float) -> None: ...


def exchange(comm: Collectives, plan: StepPlan | None, slots: int, leave: bool) -> StepPlan:
    """Rank 0's plan to every rank. The header is summed, so followers add their wish to
    `leave` (any rank's exit ends every rank together) and nothing else."""
    payload = plan.payload() if plan is not None else b""
    if plan is not None:
        header = plan.header(slots, payload, exit_votes=int(leave))
    else:
        header = [0] * (HEADER_FIELDS + slots)
        header[5] = int(leave)
    summed = comm.control_sum(mx.array(header, mx.int32)).tolist()
    if exit_votes(summed):
        return StepPlan(step=summed[2], kind="exit")
    n = payload_length(summed)
    if n:
        data = mx.array(list(payload), mx.uint8) if plan is not None else mx.zeros((n,), mx.uint8)
        payload = bytes(comm.control_broadcast(data).tolist())
    return StepPlan.from_wire(summed, payload)


PROFILE_EVERY = 100  # serving: one decode step in this many times its collectives (~1% slower)


@dataclass
class CollectiveSample:
    """What the sampled decode steps spent: in collectives, and in all."""

    steps: int = 0
    collective_seconds: float = 0.0
    step_seconds: float = 0.0


class StepLoop:
    """Every rank: exchange a plan, execute it, hand the tokens on, until a plan says exit.

    With `profile_every` (the serving engine's), the first plain decode step after every that
    many steps runs op by op with each collective evaluated and timed on its own (every rank
    picks the same steps: they execute the same plans), so a serving cluster reports the time
    in its collectives without slowing every step."""

    def __init__(
        self,
        runner: Runner,
        slots: int,
        leader: Leader | None = None,
        profile_every: int = 0,
    ):
        self.runner, self.slots, self.leader = runner, slots, leader
        self.comm = runner.model.comm
        self.on_progress: Callable[[], None] = lambda: None  # a watchdog's pet
        self.profile_every = profile_every
        self.sample = CollectiveSample()
        self._since_sample = 0  # steps executed since the last sampled one

    def steps(self, should_leave: Callable[[], bool] = lambda: False) -> Iterator[dict]:
        """Yield each step's tokens ({slot: token}, the same on every rank)."""
        while True:
            mine = self.leader.next_plan() if self.leader is not None else None
            plan = exchange(self.comm, mine, self.slots, should_leave())
            self.on_progress()
            if plan.kind == "exit":
                return
            if plan.kind == "idle":
                self._idle(plan.idle_seconds)
                continue
            take = self.leader.take_tokens if self.leader is not None else lambda t: None
            self._since_sample += 1
            if self._sampled(plan):
                tokens = self._profiled(plan, take)
            else:
                tokens = self.runner.execute(plan, take)
            self.on_progress()
            yield tokens

    def _sampled(self, plan: StepPlan) -> bool:
        """The first plain decode step once `profile_every` steps have run since the last."""
        plain = plan.decode and not plan.changes.prefill
        due = self.profile_every and self._since_sample >= self.profile_every
        if plain and due and self.comm.size > 1:
            self._since_sample = 0
            return True
        return False

    def _profiled(self, plan: StepPlan, take) -> dict[int, int]:
        before = sum(self.comm.seconds.values())
        self.comm.profile = True
        start = time.perf_counter()
        try:
            tokens = self.runner.execute(plan, take)
        finally:
            self.comm.profile = False
        self.sample.steps += 1
        self.sample.step_seconds += time.perf_counter() - start
        self.sample.collective_seconds += sum(self.comm.seconds.values()) - before
        return tokens

    def _idle(self, seconds: float) -> None:
        """Wait without a collective in flight: nothing spins. Rank 0 wakes early if work
        comes; the others are back in the next exchange by then."""
        if self.leader is not None:
            self.leader.wait(seconds)
        else:
            time.sleep(seconds)
