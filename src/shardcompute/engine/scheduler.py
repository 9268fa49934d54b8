"""Rank 0's scheduler: which requests run next, as rows of one batch. Plain Python, no MLX.

Requests wait first in, first out, and run as rows: at most `max_batch_size` at once, within a
KV budget of `max_kv_tokens` positions counted as the cache allocates them (rows x capacity,
see kv_layout). Each step:
- every running request that has its first token decodes one more: decode comes first;
- prompts are prefilled in chunks, `prefill_chunk` tokens per step in all: the oldest prompt
  being prefilled always gets a quarter of them (so a long prompt is never starved), the rest
  goes to the prompts with the fewest tokens left (so prompts finish one after another, each
  with its first token, rather than all together at the end, and a short prompt is not held
  behind a long one); chunks are smaller deep in a long prompt (a chunk's attention grows
  with its position), so a long prompt delays the running requests by at most about one
  first chunk's time per step;
- waiting requests are admitted oldest first while a row is free and their prompt fits;
- when the running requests' growth would pass the budget, the newest is preempted: its row is
  freed and it waits again at the head of the queue, to be recomputed (prompt and the tokens
  it has) once it fits;
- a request that could not fit even alone is refused when it arrives, with the numbers.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from shardcompute.engine.step_plan import Changes, PrefillChunk, RowJoin, StepPlan
from shardcompute.kv_layout import fit_shape, kv_tokens

Clock = Callable[[], float]


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8
    max_kv_tokens: int = 65536
    prefill_chunk: int = 512
    idle_min_seconds: float = 0.005  # an idle engine waits this long, doubling up to the max
    idle_max_seconds: float = 0.2


@dataclass(frozen=True)
class Sampling:
    """How a request's tokens are chosen, and when it ends."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: frozenset[int] = frozenset()


@dataclass
class Request:
    """One request's life in the scheduler."""

    id: str
    prompt: list[int]
    sampling: Sampling
    arrival: float
    generated: list[int] = field(default_factory=list)
    slot: int | None = None
    computed: int = 0  # positions its row holds
    first_scheduled: float | None = None
    preemptions: int = 0

    @property
    def target(self) -> list[int]:
        """What its row must hold before it decodes: the prompt, and after a preemption the
        tokens it had, but the last (the next decode's input)."""
        return self.prompt + self.generated[:-1]

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.target)

    def needed(self, chunk: int = 0) -> int:
        """Positions its row holds after this step: a prefill chunk, or one decoded token."""
        return self.computed + (chunk if self.prefilling else 1)


@dataclass(frozen=True)
class Event:
    """A request's news after a step: a token, its end, or both."""

    request_id: str
    token: int | None = None
    finish_reason: str | None = None  # stop | length | cancelled | error
    error: str | None = None
    queue_seconds: float | None = None  # with a request's first token: arrival to first step


class Refused(ValueError):
    """A request this engine can never run; the message names the numbers."""


MIN_CHUNK = 16
OLDEST_SHARE = 4  # the oldest prompt being prefilled gets 1/4 of each step's budget


def chunk_bound(offset: int, chunk: int) -> int:
    """The most prompt tokens a row at `offset` may prefill in a step that also decodes other
    rows: a chunk's attention reads every position before it, so deep in a long prompt the
    chunk shrinks to keep tokens x (offset + tokens) within chunk x chunk, and their step costs
    about the same at position 7000 as at 0 (at least MIN_CHUNK tokens, so it always moves).
    Small chunks cost more per token, so a prompt that no other row waits for is not bound."""
    area = chunk * chunk
    fits = int((math.sqrt(offset * offset + 4 * area) - offset) / 2)
    return max(MIN_CHUNK, min(chunk, fits))


class Scheduler:
    def __init__(self, config: SchedulerConfig, clock: Clock = time.monotonic):
        self.config, self.clock = config, clock
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # in admission order: the newest is last
        self.step = 0
        self.shape = (0, 0)  # the KV cache's (rows, capacity)
        self.preemptions = 0
        # Decode rows per step, for metrics: a reporter thread drains it (deque: thread-safe).
        self.batch_sizes: deque[int] = deque(maxlen=100_000)
        self._leaves: list[int] = []
        self._idle = 0.0

    # --- requests in and out ---------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; Refused if it could not fit the KV budget even alone."""
        need = kv_tokens({0: len(request.prompt) + request.sampling.max_tokens})
        if need > self.config.max_kv_tokens:
            raise Refused(
                f"the prompt ({len(request.prompt)} tokens) and max_tokens "
                f"({request.sampling.max_tokens}) need {need} KV positions, over the engine's "
                f"budget of engine.max_kv_tokens={self.config.max_kv_tokens}"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is (its row is freed at the next step)."""
        for r in self.waiting:
            if r.id == request_id:
                self.waiting.remove(r)
                return r
        for r in self.running:
            if r.id == request_id:
                self._free(r)
                return r
        return None

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # --- the next step -------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """The next step's plan. Its rows' positions are counted as held from now on."""
        joins = self._admit()
        chunks = self._chunks()
        needs = {r.slot: r.needed(chunks.get(r.slot, 0)) for r in self.running}
        while self.running and kv_tokens(needs) > self.config.max_kv_tokens:
            victim = self.running[-1]
            self._preempt(victim)
            joins = [j for j in joins if j.slot != victim.slot]
            chunks.pop(victim.slot, None)
            needs = {r.slot: r.needed(chunks.get(r.slot, 0)) for r in self.running}
        leaves, self._leaves = self._leaves, []
        if not self.running and not leaves:
            return self._idle_plan()
        self._idle = 0.0
        decode = [r.slot for r in self.running if not r.prefilling]
        by_slot = {r.slot: r for r in self.running}
        prefill = [self._take_chunk(by_slot[slot], n) for slot, n in chunks.items()]
        for r in self.running:
            if r.slot in decode:
                r.computed += 1
        self.shape = fit_shape(self.shape, needs, self.config.max_kv_tokens)
        self.step += 1
        if decode:
            self.batch_sizes.append(len(decode))
        changes = Changes(leaves=leaves, joins=joins, prefill=prefill)
        rows, capacity = self.shape
        return StepPlan(
            step=self.step, decode=decode, changes=changes, kv_rows=rows, kv_capacity=capacity
        )

    def update(self, tokens: dict[int, int]) -> list[Event]:
        """Take the step's tokens ({slot: token}); the events they make."""
        events = []
        by_slot = {r.slot: r for r in self.running}
        for slot, token in tokens.items():
            r = by_slot[slot]
            r.generated.append(token)
            reason = self._finish_reason(r, token)
            waited = r.first_scheduled - r.arrival if len(r.generated) == 1 else None
            events.append(Event(r.id, token, reason, queue_seconds=waited))
            if reason is not None:
                self._free(r)
        return events

    def kv_usage(self) -> tuple[int, int]:
        """(positions allocated, budget)."""
        rows, capacity = self.shape
        return rows * capacity, self.config.max_kv_tokens

    # --- internals ---------------------------------------------------------------------------

    def _admit(self) -> list[RowJoin]:
        joins = []
        while self.waiting and len(self.running) < self.config.max_batch_size:
            r = self.waiting[0]
            slot = min(set(range(self.config.max_batch_size)) - {x.slot for x in self.running})
            needs = {x.slot: x.needed() for x in self.running} | {slot: len(r.target) + 1}
            if self.running and kv_tokens(needs) > self.config.max_kv_tokens:
                break  # it waits for rows to finish; first in, first out
            self.waiting.popleft()
            r.slot, r.computed = slot, 0
            r.first_scheduled = r.first_scheduled or self.clock()
            self.running.append(r)
            joins.append(self._join(r))
        return joins

    def _join(self, r: Request) -> RowJoin:
        s = r.sampling
        return RowJoin(
            slot=r.slot,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
            skip=len(r.generated),
            last_token=r.generated[-1] if r.generated else None,
        )

    def _chunks(self) -> dict[int, int]:
        """Prefill tokens per prefilling row this step, in the order they run: the oldest
        prompt's guaranteed share first, then the rest of the budget to the prompts with the
        fewest tokens left (oldest first among equals). Prompts that this step finishes run
        first, so their first tokens go out before the other chunks' work. Every chunk is
        also bounded by its attention (see `chunk_bound`) while other rows decode: alone, a long
        prompt takes whole chunks, and stalls nobody."""
        prefilling = [r for r in self.running if r.prefilling]
        if not prefilling:
            return {}
        budget = self.config.prefill_chunk
        left = {r.slot: len(r.target) - r.computed for r in prefilling}
        decoding = len(prefilling) < len(self.running)
        bound = chunk_bound if decoding else lambda offset, chunk: chunk
        room = {r.slot: min(left[r.slot], bound(r.computed, budget)) for r in prefilling}
        oldest = prefilling[0].slot
        chunks = dict.fromkeys(room, 0)
        chunks[oldest] = min(room[oldest], max(MIN_CHUNK, budget // OLDEST_SHARE))
        for slot in sorted(room, key=left.__getitem__):  # stable: oldest first among equals
            chunks[slot] += max(0, min(room[slot] - chunks[slot], budget - sum(chunks.values())))
        order = sorted(room, key=lambda slot: (chunks[slot] < left[slot], left[slot]))
        return {slot: chunks[slot] for slot in order if chunks[slot] > 0}

    def _take_chunk(self, r: Request, n: int) -> PrefillChunk:
        tokens = r.target[r.computed : r.computed + n]
        r.computed += n
        last = r.computed == len(r.target) and not r.generated  # the first token comes next
        return PrefillChunk(slot=r.slot, tokens=tokens, last=last)

    def _preempt(self, r: Request) -> None:
        self._free(r)
        r.computed, r.preemptions = 0, r.preemptions + 1
        self.preemptions += 1
        self.waiting.appendleft(r)

    def _free(self, r: Request) -> None:
        self.running.remove(r)
        self._leaves.append(r.slot)
        r.slot = None

    def _finish_reason(self, r: Request, token: int) -> str | None:
        if token in r.sampling.stop_token_ids:
            return "stop"
        if len(r.generated) >= r.sampling.max_tokens:
            return "length"
        return None

    def _idle_plan(self) -> StepPlan:
        c = self.config
        self._idle = min(c.idle_max_seconds, max(c.idle_min_seconds, self._idle * 2))
        rows, capacity = self.shape
        return StepPlan(
            step=self.step, kind="idle", idle_seconds=self._idle, kv_rows=rows,
            kv_capacity=capacity,
        )  # fmt: skip
