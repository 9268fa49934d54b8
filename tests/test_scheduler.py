"""The scheduler, in plain Python with a fake clock: admission, chunked prefill interleaved with
decode, the KV budget and preemption, first-in-first-out fairness; and the step plan's wire
form, which every rank reads."""

from __future__ import annotations

import pytest

from shardcompute.engine.scheduler import (
    MIN_CHUNK,
    Refused,
    Request,
    Sampling,
    Scheduler,
    SchedulerConfig,
    chunk_bound,
)
from shardcompute.engine.step_plan import Changes, PlanError, PrefillChunk, RowJoin, StepPlan
from shardcompute.kv_layout import (
    CAPACITY_STEP,
    WINDOW_STEP,
    attention_window,
    fit_shape,
    kv_shape,
    kv_tokens,
)

EOS = 2


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def req(name: str, prompt: int, max_tokens: int = 8, at: float = 0.0) -> Request:
    return Request(
        name,
        list(range(10, 10 + prompt)),
        Sampling(max_tokens, stop_token_ids=frozenset({EOS})),
        at,
    )


def make(clock=None, **config) -> Scheduler:
    config = {
        "max_batch_size": 4,
        "max_kv_tokens": 8 * CAPACITY_STEP,
        "prefill_chunk": 64,
        **config,
    }
    return Scheduler(SchedulerConfig(**config), clock or Clock())


def run_step(s: Scheduler, token: int = 7) -> tuple[StepPlan, list]:
    """Schedule a step and feed back one token for every row that produces one."""
    plan = s.schedule()
    produce = list(plan.decode) + [c.slot for c in plan.changes.prefill if c.last]
    return plan, s.update(dict.fromkeys(produce, token))


def test_a_request_prefills_then_decodes_to_max_tokens():
    s = make()
    s.add(req("a", prompt=5, max_tokens=3))
    plan, events = run_step(s)
    assert plan.changes.joins == [RowJoin(slot=0)]
    assert plan.changes.prefill == [PrefillChunk(slot=0, tokens=list(range(10, 15)), last=True)]
    assert plan.decode == [] and [e.token for e in events] == [7]
    plan, events = run_step(s)
    assert plan.decode == [0] and not plan.changes.prefill
    plan, events = run_step(s)
    assert events[-1].finish_reason == "length"
    plan, _ = run_step(s)  # the row is freed at the next step
    assert plan.changes.leaves == [0] and plan.decode == []
    assert s.schedule().kind == "idle" and s.idle


def test_a_stop_token_ends_the_request():
    s = make()
    s.add(req("a", prompt=3, max_tokens=50))
    run_step(s)
    _, events = run_step(s, token=EOS)
    assert events == [events[0]] and events[0].finish_reason == "stop"


def test_decode_comes_first_and_a_long_prompt_takes_one_chunk_per_step():
    """A 200-token prompt arriving while two requests decode: every step still decodes both,
    and the prompt goes in 64-token chunks, oldest first."""
    s = make()
    for name in "ab":
        s.add(req(name, prompt=4, max_tokens=100))
    run_step(s)
    s.add(req("long", prompt=200, max_tokens=4))
    chunks, done = [], 0
    while done < 200:
        plan, _ = run_step(s)
        assert plan.decode == [0, 1]  # every step still decodes both
        assert [c.slot for c in plan.changes.prefill] == [2]  # one chunk of the prompt
        chunks.append(len(plan.changes.prefill[0].tokens))
        assert chunks[-1] == min(200 - done, chunk_bound(done, 64))
        done += chunks[-1]
    assert chunks[0] == 64 and len(chunks) > 4
    plan, _ = run_step(s)
    assert plan.decode == [0, 1, 2]  # its first token came with its last chunk


def test_admission_is_bounded_by_the_batch_size_first_in_first_out():
    s = make(max_batch_size=2)
    for name in "abcd":
        s.add(req(name, prompt=2, max_tokens=2))
    plan, _ = run_step(s)
    assert [j.slot for j in plan.changes.joins] == [0, 1]
    assert [r.id for r in s.running] == ["a", "b"] and [r.id for r in s.waiting] == ["c", "d"]
    run_step(s)  # a and b finish (max_tokens=2)
    plan, _ = run_step(s)
    assert plan.changes.leaves == [0, 1] and [r.id for r in s.running] == ["c", "d"]
    assert [j.slot for j in plan.changes.joins] == [0, 1]  # the freed rows, reused


def test_chunks_shrink_deep_in_a_long_prompt_while_others_decode():
    """A chunk's attention reads every earlier position: deep in a prompt the chunk shrinks so
    each step that also decodes other rows costs about the same. A prompt alone stalls nobody
    and takes whole chunks (small ones cost more per token)."""
    assert [chunk_bound(o, 512) for o in (0, 512, 2048, 7500)] == [512, 316, 120, 34]
    assert chunk_bound(10**6, 512) == MIN_CHUNK
    s = make(prefill_chunk=64)
    s.add(req("short", prompt=2, max_tokens=200))
    run_step(s)
    s.add(req("long", prompt=400, max_tokens=1))
    sizes = []
    while any(r.id == "long" for r in [*s.running, *s.waiting]):
        plan, _ = run_step(s)
        assert plan.decode == [0]
        sizes += [len(c.tokens) for c in plan.changes.prefill]
    assert sum(sizes) == 400 and sizes[0] == 64 and sizes[-2] < 20
    assert all(n * (sum(sizes[:i]) + n) <= 64 * 64 or n == MIN_CHUNK for i, n in enumerate(sizes))
    alone = make(prefill_chunk=64)
    alone.add(req("long", prompt=400, max_tokens=1))
    sizes = []
    while alone.running or alone.waiting:
        plan, _ = run_step(alone)
        sizes += [len(c.tokens) for c in plan.changes.prefill]
    assert sizes == [64] * 6 + [16]


def test_prompts_finish_one_after_another_shortest_first():
    """Equal prompts are not prefilled side by side to finish together at the end: the oldest
    finishes first, and each prompt that a step finishes runs before the other chunks."""
    s = make(prefill_chunk=64)
    s.add(req("a", prompt=50))
    s.add(req("b", prompt=50))
    plan, _ = run_step(s)
    assert [(c.slot, len(c.tokens), c.last) for c in plan.changes.prefill] == [
        (0, 50, True),
        (1, 14, False),
    ]
    s = make(prefill_chunk=64)
    s.add(req("long", prompt=1000))
    s.add(req("short", prompt=10))
    plan, _ = run_step(s)  # the short prompt is done first; the long one takes the rest
    assert [(c.slot, len(c.tokens), c.last) for c in plan.changes.prefill] == [
        (1, 10, True),
        (0, 54, False),
    ]


def test_a_long_prompt_keeps_moving_while_short_ones_keep_arriving():
    """The oldest prompt gets a quarter of every step's budget however many shorter prompts
    arrive after it, so it is never starved."""
    s = make(prefill_chunk=64, max_batch_size=8, max_kv_tokens=64 * CAPACITY_STEP)
    s.add(req("long", prompt=300, max_tokens=1))
    done, steps = 0, 0
    while done < 300:
        s.add(req(f"short{steps}", prompt=40, max_tokens=1))
        plan, _ = run_step(s)
        chunk = {c.slot: len(c.tokens) for c in plan.changes.prefill}
        assert chunk[0] >= min(300 - done, 64 // 4)  # slot 0 is the long prompt
        done, steps = done + chunk[0], steps + 1
    assert steps <= 300 // 16 + 1


def test_a_request_that_could_never_fit_is_refused_with_the_numbers():
    s = make(max_kv_tokens=2 * CAPACITY_STEP)
    with pytest.raises(Refused, match=r"\(600 tokens\).*max_tokens \(8\).*768.*=512"):
        s.add(req("huge", prompt=600))
    assert s.idle


def test_the_newest_request_is_preempted_and_recomputed_with_its_tokens():
    """Two rows growing past a 2-row x 256 budget: the newer one gives way, waits at the head
    of the queue, and comes back with its prompt and tokens so far, and its random stream."""
    s = make(max_kv_tokens=2 * CAPACITY_STEP, max_batch_size=2)
    s.add(req("old", prompt=200, max_tokens=200))
    s.add(req("new", prompt=40, max_tokens=200))
    for _ in range(5):
        run_step(s)
    new = next(r for r in s.running if r.id == "new")
    made = list(new.generated)
    steps = 0
    while new.preemptions == 0:
        run_step(s)
        steps += 1
        assert steps < 100
    assert s.preemptions == 1 and s.waiting[0] is new and [r.id for r in s.running] == ["old"]
    # Back once the old request is done: prompt + its tokens (all but the last) prefilled.
    while s.running and s.running[0].id == "old":
        run_step(s)
    plan, _ = run_step(s)
    join = plan.changes.joins[0]
    assert join.skip == len(new.generated) and join.last_token == new.generated[-1]
    assert new.generated[: len(made)] == made
    assert [c.last for c in plan.changes.prefill] == [False]  # no second first token


def test_kv_accounting_is_the_cache_shape():
    assert kv_shape({}) == (0, 0)
    assert kv_shape({0: 10}) == (1, CAPACITY_STEP)
    assert kv_shape({0: 255}) == (1, CAPACITY_STEP)
    assert kv_shape({0: 256}) == (1, 2 * CAPACITY_STEP)  # one position free past the longest
    assert kv_shape({2: 10, 0: 300}) == (4, 2 * CAPACITY_STEP)
    assert kv_tokens({5: 1}) == 8 * CAPACITY_STEP
    # Grow at once; shrink only at half, so a row that comes and goes does not copy the cache.
    assert fit_shape((1, 256), {0: 10, 1: 10}, 10**6) == (2, 256)
    assert fit_shape((4, 512), {0: 10, 1: 10}, 10**6) == (2, 256)
    assert fit_shape((4, 512), {0: 10, 2: 300}, 10**6) == (4, 512)
    assert fit_shape((4, 512), {0: 10, 2: 10}, 2 * 512) == (4, 256)  # the budget comes first


def test_decode_attends_over_a_window_just_past_the_longest_row():
    cap = 1 << 20
    assert attention_window(1, cap) == attention_window(WINDOW_STEP, cap) == WINDOW_STEP
    assert attention_window(WINDOW_STEP + 1, cap) == 2 * WINDOW_STEP
    assert attention_window(300, 256) == 256  # never past the buffers
    windows = {attention_window(n, cap) for n in range(1, 32769)}
    assert len(windows) <= 64  # each is one trace of the decode step
    for n in range(1, 32769, 7):
        w = attention_window(n, cap)
        assert n <= w <= max(n + WINDOW_STEP - 1, n * 9 // 8 + 1), n


def test_aborts_free_rows_and_queue_places():
    s = make(max_batch_size=1)
    s.add(req("a", prompt=3, max_tokens=50))
    s.add(req("b", prompt=3))
    run_step(s)
    assert s.abort("b").id == "b" and not s.waiting  # waiting: gone
    assert s.abort("a").id == "a"
    plan = s.schedule()
    assert plan.changes.leaves == [0] and s.idle
    assert s.abort("a") is None


def test_queue_time_comes_with_the_first_token():
    clock = Clock()
    s = make(clock, max_batch_size=1)
    s.add(req("a", prompt=2, max_tokens=1, at=0.0))
    s.add(req("b", prompt=2, max_tokens=1, at=0.0))
    clock.now = 1.0
    _, events = run_step(s)
    assert events[0].queue_seconds == 1.0
    clock.now = 3.0  # a finished with its first token; b takes its row
    _, events = run_step(s)
    assert [e.request_id for e in events] == ["b"] and events[0].queue_seconds == 3.0


def test_idle_waits_back_off_and_reset():
    s = make(idle_min_seconds=0.01, idle_max_seconds=0.04)
    waits = [s.schedule().idle_seconds for _ in range(4)]
    assert waits == [0.01, 0.02, 0.04, 0.04]
    s.add(req("a", prompt=1, max_tokens=1))
    assert s.schedule().kind == "run"


# --- the plan on the wire --------------------------------------------------------------------


def test_plan_round_trip_and_a_plain_decode_step_has_no_payload():
    plan = StepPlan(
        step=9,
        decode=[0, 3],
        changes=Changes(
            leaves=[1],
            joins=[RowJoin(slot=1, temperature=0.7, top_k=5, seed=2**62, skip=3, last_token=4)],
            prefill=[PrefillChunk(slot=1, tokens=[5, 6, 7], last=False)],
        ),
        kv_rows=4,
        kv_capacity=512,
    )
    payload = plan.payload()
    header = plan.header(4, payload)
    assert StepPlan.from_wire(header, payload) == plan
    plain = StepPlan(step=10, decode=[0, 3], kv_rows=4, kv_capacity=512)
    assert plain.payload() == b"" and len(plain.header(4, b"")) == 8 + 4
    assert StepPlan.from_wire(plain.header(4, b""), b"") == plain
    idle = StepPlan(step=10, kind="idle", idle_seconds=0.05)
    assert StepPlan.from_wire(idle.header(4, b""), b"") == idle


def test_a_plan_of_another_version_is_refused():
    header = StepPlan(step=1).header(2, b"")
    header[0] = 99
    with pytest.raises(PlanError, match="version 99.*speaks version 1"):
        StepPlan.from_wire(header, b"")
