"""The request queue and the request metrics, with a fake clock (asyncio.run, no plugin)."""

import asyncio

import pytest

from shardcompute.coordinator.http_errors import QueueFull
from shardcompute.coordinator.metrics import Metrics, TokenRate
from shardcompute.coordinator.queue import Job, RequestQueue
from shardcompute.protocol import ClusterView, GenerationEvent, GenerationRequest


class FakeClock:
    def __init__(self):
        self.now = 50.0

    def __call__(self):
        return self.now


def request(i):
    return GenerationRequest(request_id=f"r{i}", kind="completion", prompt="p", max_tokens=4)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 5))


def test_fifo_take_and_timeout():
    async def go():
        q = RequestQueue(8, FakeClock())
        for i in range(3):
            await q.submit(request(i))
        taken = [(await q.take(0.01))[0].request_id for _ in range(3)]
        assert taken == ["r0", "r1", "r2"] and q.depth == 0 and q.in_flight == 3
        assert await q.take(0.01) == []

    run(go())


def test_take_up_to_the_free_rows_oldest_first():
    async def go():
        q = RequestQueue(8, FakeClock())
        for i in range(5):
            await q.submit(request(i))
        assert [j.request_id for j in await q.take(0.01, most=3)] == ["r0", "r1", "r2"]
        assert await q.take(0.01, most=0) == [] and q.depth == 2  # no free rows: nothing taken
        assert [j.request_id for j in await q.take(0.01, most=8)] == ["r3", "r4"]
        assert q.in_flight == 5

    run(go())


def test_cancelled_active_requests_are_told_once():
    async def go():
        q = RequestQueue(8, FakeClock())
        await q.submit(request(1))
        await q.submit(request(2))
        await q.take(0.01, most=1)
        q.cancel("r1")  # taken by the engine: it is told at its next poll
        q.cancel("r2")  # still pending: the engine never sees it
        assert q.take_cancelled() == ["r1"] and q.take_cancelled() == []

    run(go())


def test_take_wakes_when_work_arrives():
    async def go():
        q = RequestQueue(8, FakeClock())
        waiter = asyncio.create_task(q.take(2.0))
        await asyncio.sleep(0)
        await q.submit(request(1))
        assert [j.request_id for j in await waiter] == ["r1"]

    run(go())


def test_queue_full_is_429():
    async def go():
        q = RequestQueue(2, FakeClock())
        await q.submit(request(1))
        await q.submit(request(2))
        with pytest.raises(QueueFull, match="max_queued_requests=2"):
            await q.submit(request(3))

    run(go())


def test_events_flow_and_the_last_frees_the_slot():
    async def go():
        q = RequestQueue(8, FakeClock())
        job = await q.submit(request(1))
        await q.take(0.01)
        assert q.post("r1", [GenerationEvent(text="a")]) is False
        assert q.post("r1", [GenerationEvent(text="b", finish_reason="stop")]) is True
        assert q.in_flight == 0 and q.is_cancelled("r1")
        assert [job.events.get_nowait().text for _ in range(2)] == ["a", "b"]
        assert q.post("r1", [GenerationEvent(text="late")]) is True

    run(go())


def test_cancel_frees_pending_and_active_slots():
    async def go():
        q = RequestQueue(8, FakeClock())
        await q.submit(request(1))
        await q.submit(request(2))
        await q.take(0.01)
        q.cancel("r1")  # active: the engine learns on its next post
        q.cancel("r2")  # pending: it never reaches the engine
        assert (q.depth, q.in_flight) == (0, 0)
        assert q.post("r1", [GenerationEvent(text="x")]) is True
        assert await q.take(0.01) == []

    run(go())


def test_fail_all_ends_every_request_with_the_reason():
    async def go():
        q = RequestQueue(8, FakeClock())
        jobs = [await q.submit(request(i)) for i in range(2)]
        await q.take(0.01)
        q.fail_all("rank 1 lost")
        events = [j.events.get_nowait() for j in jobs]
        assert all(e.finish_reason == "error" and e.error == "rank 1 lost" for e in events)
        assert (q.depth, q.in_flight) == (0, 0)

    run(go())


def empty_view():
    return ClusterView(
        state="ready",
        reason="",
        generation=1,
        world_size=1,
        model="m",
        plan_weights=[],
        hostfile=[],
        workers=[],
        queue_depth=0,
        in_flight=0,
        requests_total=0,
        tokens_per_second=0.0,
    )


def test_metrics_time_first_token_and_gaps():
    clock = FakeClock()
    m = Metrics(clock, empty_view)
    job = Job(request(1), created=clock.now)
    m.observe_event(job, GenerationEvent(text="a", token_ids=[1]), clock.now + 0.5)
    m.observe_event(job, GenerationEvent(text="bc", token_ids=[2, 3]), clock.now + 0.7)
    m.observe_event(job, GenerationEvent(finish_reason="stop"), clock.now + 0.8)
    text = m.render().decode()
    assert "shardcompute:time_to_first_token_seconds_sum 0.5" in text
    assert "shardcompute:inter_token_latency_seconds_count 2.0" in text
    assert 'shardcompute_cluster_state{state="ready"} 1.0' in text


def test_token_rate_window():
    clock = FakeClock()
    rate = TokenRate(clock, window_seconds=10)
    rate.add(50)
    clock.now += 5
    rate.add(30)
    assert rate.rate() == 8.0
    clock.now += 6
    assert rate.rate() == 3.0
