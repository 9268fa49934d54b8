"""The registry and health state machine, driven by a fake clock: no sleeping."""

import pytest

from shardcompute.config import load_config
from shardcompute.coordinator.bootstrap import Candidate, order_ranks, plan_weights
from shardcompute.coordinator.health import HealthTracker
from shardcompute.coordinator.http_errors import ApiError, Conflict, NotFound, NotReady
from shardcompute.coordinator.registry import Registry
from shardcompute.protocol import DeviceFacts, Heartbeat, LoadedReport, RegisterRequest


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def make_registry(world_size=2, **overrides):
    config = load_config(
        None,
        {
            "parallelism.tensor_parallel_size": world_size,
            "coordinator.heartbeat_interval_seconds": 1,
            "coordinator.heartbeat_timeout_seconds": 3,
            "worker.collective_port_base": 29500,
            **overrides,
        },
        env={},
    )
    clock = FakeClock()
    reg = Registry(config, clock, "http://coord:8000")
    states = []
    reg.listeners.append(lambda state, reason: states.append(state))
    return reg, clock, states


def join(reg, address="10.0.0.1", memory=8, **kw):
    facts = DeviceFacts(host=address, platform="test", memory_bytes=memory)
    return reg.register(RegisterRequest(facts=facts, address=address, **kw)).worker_id


def load_all(reg):
    for worker_id, a in reg.assignments.items():
        reg.mark_loaded(worker_id, LoadedReport(generation=a.generation, rank=a.rank))


def beat_all(reg, **kw):
    for worker_id in list(reg.workers):
        if reg.workers[worker_id].alive:
            reg.heartbeat(worker_id, Heartbeat(generation=reg.generation, **kw))


def test_forming_loading_ready():
    reg, _, states = make_registry()
    assert reg.state == "forming" and "0 registered" in reg.reason
    w0 = join(reg, "10.0.0.1")
    assert reg.state == "forming" and reg.heartbeat(w0, Heartbeat()).assignment is None
    w1 = join(reg, "10.0.0.2")
    assert reg.state == "loading" and reg.generation == 1
    a0 = reg.heartbeat(w0, Heartbeat()).assignment
    assert (a0.rank, a0.world_size, a0.plan_weights) == (0, 2, [1.0, 1.0])
    assert a0.hostfile == ["10.0.0.1:29500", "10.0.0.2:29501"]
    assert a0.coordinator_url == "http://coord:8000" and a0.model_name == "smollm2-135m"
    reg.mark_loaded(w0, LoadedReport(generation=1, rank=0))
    assert reg.state == "loading" and "1 of 2" in reg.reason
    reg.mark_loaded(w1, LoadedReport(generation=1, rank=1))
    assert reg.state == "ready" and reg.rank0_worker() == w0
    assert states == ["loading", "ready"]


def test_requested_ranks_and_explicit_ports():
    reg, _, _ = make_registry()
    w_late = join(reg, "10.0.0.9", requested_rank=1, collective_port=4000)
    w_first = join(reg, "10.0.0.8", requested_rank=0)
    assert reg.assignments[w_first].rank == 0 and reg.assignments[w_late].rank == 1
    assert reg.assignments[w_late].hostfile == ["10.0.0.8:29500", "10.0.0.9:4000"]


def test_bad_rank_requests_are_refused():
    reg, _, _ = make_registry()
    with pytest.raises(ApiError, match="requested rank 2 but parallelism.tensor_parallel_size=2"):
        join(reg, requested_rank=2)
    join(reg, requested_rank=0)
    with pytest.raises(Conflict, match="rank 0 is already held"):
        join(reg, requested_rank=0)


def test_heartbeat_loss_degrades_and_replacement_reforms():
    reg, clock, states = make_registry()
    w0, w1 = join(reg, "10.0.0.1"), join(reg, "10.0.0.2")
    load_all(reg)
    clock.advance(2.5)
    reg.heartbeat(w1, Heartbeat(generation=1))  # only rank 1 keeps beating
    clock.advance(1.0)
    reg.sweep()
    assert reg.state == "degraded" and f"rank 0 (worker {w0}) missed heartbeats" in reg.reason
    assert [v.alive for v in reg.worker_views()] == [False, True]
    with pytest.raises(NotFound, match="register again"):
        reg.heartbeat(w0, Heartbeat(generation=1))
    w2 = join(reg, "10.0.0.3")  # the lost agent comes back under a new id
    assert reg.state == "loading" and reg.generation == 2
    assert reg.assignments[w1].rank == 1 and reg.assignments[w2].rank == 0  # survivor stays
    assert w0 not in reg.workers
    load_all(reg)
    assert states == ["loading", "ready", "degraded", "loading", "ready"]


def test_beating_workers_never_expire():
    reg, clock, _ = make_registry()
    join(reg), join(reg)
    load_all(reg)
    for _ in range(10):
        clock.advance(2.9)
        beat_all(reg, engine_state="running")
        reg.sweep()
    assert reg.state == "ready"


def test_spare_takes_over_a_dead_rank():
    reg, clock, _ = make_registry()
    w0, w1 = join(reg), join(reg)
    load_all(reg)
    spare = join(reg, "10.0.0.7")
    assert reg.state == "ready" and spare not in reg.assignments
    clock.advance(2.0)
    reg.heartbeat(w0, Heartbeat(generation=1))
    reg.heartbeat(spare, Heartbeat())
    clock.advance(1.5)
    reg.sweep()  # w1 is dead: the spare steps in at once
    assert reg.state == "loading" and reg.assignments[spare].rank == 1
    assert reg.assignments[w0].rank == 0 and w1 not in reg.workers


def test_engine_exit_restarts_the_group_up_to_the_limit():
    reg, _, states = make_registry(**{"coordinator.max_engine_restarts": 2})
    join(reg), join(reg)
    load_all(reg)
    for generation in (2, 3):
        worker = next(iter(reg.assignments))
        reg.heartbeat(
            worker, Heartbeat(generation=reg.generation, engine_state="exited", engine_exit_code=1)
        )
        assert reg.state == "loading" and reg.generation == generation
    worker = next(iter(reg.assignments))
    reg.heartbeat(worker, Heartbeat(generation=3, engine_state="exited", engine_exit_code=1))
    assert reg.state == "degraded" and "gave up after 2 engine restarts" in reg.reason
    assert reg.generation == 3
    assert states.count("degraded") == 3


def test_stale_and_unknown_reports():
    reg, _, _ = make_registry()
    w0, _ = join(reg), join(reg)
    with pytest.raises(Conflict, match="generation 0"):
        reg.mark_loaded(w0, LoadedReport(generation=0, rank=0))
    # Newer than any this coordinator made: not stale, it restarted; the engine must retry.
    with pytest.raises(NotReady, match="generation 7 is newer"):
        reg.mark_loaded(w0, LoadedReport(generation=7, rank=0))
    with pytest.raises(Conflict, match="reported rank 1 but holds rank 0"):
        reg.mark_loaded(w0, LoadedReport(generation=1, rank=1))
    with pytest.raises(NotFound):
        reg.heartbeat("nobody", Heartbeat())
    with pytest.raises(Conflict, match="not rank 0"):
        reg.check_rank0(next(w for w in reg.assignments if w != w0), 1)


def test_memory_weighted_plan():
    reg, _, _ = make_registry(**{"model.weights": "memory"})
    join(reg, memory=16), join(reg, memory=8)
    assert next(iter(reg.assignments.values())).plan_weights == [2.0, 1.0]
    with pytest.raises(Exception, match="report its memory"):
        plan_weights("memory", [8, 0])
    assert plan_weights([3, 1], [1, 1]) == [3.0, 1.0]


def test_order_ranks_is_stable():
    def c(wid, order, req=None, prev=None):
        return Candidate(wid, req, prev, order, "h", None, 1)

    ranked = order_ranks([c("a", 1), c("b", 2, prev=0), c("d", 4, req=2), c("e", 5)], 3)
    assert [x.worker_id for x in ranked] == ["b", "a", "d"]
    assert order_ranks([c("a", 1, req=1)], 2) == []


def test_health_tracker():
    clock = FakeClock()
    h = HealthTracker(clock, 3.0)
    h.beat("a")
    clock.advance(2)
    h.beat("b")
    clock.advance(1.5)
    assert h.expired() == ["a"] and h.age("b") == 1.5
    h.forget("a")
    assert h.expired() == [] and h.age("a") == float("inf")


# --- a restarted coordinator adopts the group its workers' engines still run ---------------


def running_group(generation_bumps=1):
    """A first coordinator's ready group after `generation_bumps` engine crashes, as
    {worker_id: assignment}; the registry is then thrown away, as a killed one would be."""
    reg, _, _ = make_registry()
    join(reg, "10.0.0.1"), join(reg, "10.0.0.2")
    for _ in range(generation_bumps):
        worker = next(iter(reg.assignments))
        reg.heartbeat(worker, Heartbeat(generation=reg.generation, engine_state="exited"))
    load_all(reg)
    assert reg.state == "ready"
    return dict(reg.assignments)


def rejoin(reg, a, loaded=True, **kw):
    facts = DeviceFacts(host=a.hostfile[a.rank], platform="test", memory_bytes=8)
    address = a.hostfile[a.rank].split(":")[0]
    req = RegisterRequest(
        facts=facts, address=address, worker_id=a.worker_id, running=a, loaded=loaded, **kw
    )
    return reg.register(req).worker_id


def test_restarted_coordinator_adopts_the_running_group_unchanged():
    group = running_group()
    a0, a1 = sorted(group.values(), key=lambda a: a.rank)
    reg, _, states = make_registry()
    assert rejoin(reg, a1) == a1.worker_id
    assert (
        reg.state == "forming" and "generation 2's ranks" in reg.reason and "1 of 2" in reg.reason
    )
    # Meanwhile its agent is told to keep its engine, and the engine's calls are "retry".
    reply = reg.heartbeat(a1.worker_id, Heartbeat(generation=2, engine_state="running"))
    assert reply.assignment == a1 and reply.loaded
    with pytest.raises(NotReady, match="generation 2 is newer"):
        reg.check_rank0(a0.worker_id, 2)
    assert rejoin(reg, a0) == a0.worker_id
    assert (reg.state, reg.generation) == ("ready", 2)
    assert {w: a.rank for w, a in reg.assignments.items()} == {w: a.rank for w, a in group.items()}
    assert all(reg.assignments[w].hostfile == a.hostfile for w, a in group.items())
    reg.check_rank0(a0.worker_id, 2)  # rank 0's engine takes work again
    assert reg.heartbeat(a0.worker_id, Heartbeat(generation=2)).loaded
    assert states == ["ready"]  # never "loading": nothing reloads
    # The counter continues: the next re-form is generation 3.
    reg.heartbeat(a1.worker_id, Heartbeat(generation=2, engine_state="exited"))
    assert (reg.state, reg.generation) == ("loading", 3)


def test_a_group_that_does_not_come_back_whole_is_replaced_in_a_later_generation():
    a0, a1 = sorted(running_group(2).values(), key=lambda a: a.rank)
    reg, clock, _ = make_registry()
    rejoin(reg, a0)
    clock.advance(2.0)
    reg.heartbeat(a0.worker_id, Heartbeat(generation=3, engine_state="running"))
    reg.sweep()
    assert reg.state == "forming" and "register again" in reg.reason  # still waiting
    clock.advance(1.5)  # past the heartbeat timeout (3 s) since the first claim
    reg.heartbeat(a0.worker_id, Heartbeat(generation=3, engine_state="running"))
    newcomer = join(reg, "10.0.0.9")
    assert (reg.state, reg.generation) == ("loading", 4)  # past the claimed generation
    assert reg.assignments[a0.worker_id].rank == 0 and reg.assignments[newcomer].rank == 1
    with pytest.raises(Conflict, match="generation 3"):
        reg.check_rank0(a0.worker_id, 3)  # the old engine is told its group is over


def test_a_rank_not_known_to_have_loaded_is_confirmed_by_rank_0_polling():
    a0, a1 = sorted(running_group().values(), key=lambda a: a.rank)
    reg, _, states = make_registry()
    rejoin(reg, a0, loaded=False)  # its agent never heard back before the coordinator died
    rejoin(reg, a1)
    assert (reg.state, reg.generation) == ("loading", 2) and "1 of 2" in reg.reason
    assert not reg.heartbeat(a0.worker_id, Heartbeat(generation=2)).loaded
    with pytest.raises(Conflict, match="not rank 0"):
        reg.check_rank0(a1.worker_id, 2)
    assert reg.state == "loading"
    reg.check_rank0(a0.worker_id, 2)  # rank 0 polls only after its whole group ran a step
    assert reg.state == "ready" and states == ["loading", "ready"]
    assert reg.heartbeat(a0.worker_id, Heartbeat(generation=2)).loaded


def test_an_engine_that_asks_for_another_rank_is_replaced():
    a0, a1 = sorted(running_group().values(), key=lambda a: a.rank)
    reg, clock, _ = make_registry()
    rejoin(reg, a1)
    w0 = rejoin(reg, a0, requested_rank=1)
    assert w0 != a0.worker_id  # registered afresh
    clock.advance(3.5)  # past the heartbeat timeout: rank 1 alone is no group to adopt
    reg.heartbeat(w0, Heartbeat())
    reg.heartbeat(a1.worker_id, Heartbeat(generation=2, engine_state="running"))
    assert (reg.state, reg.generation) == ("loading", 3)


def test_a_group_from_another_config_or_a_live_coordinator_is_not_adopted():
    group = running_group()
    a0, a1 = sorted(group.values(), key=lambda a: a.rank)
    reg, _, _ = make_registry(**{"model.name": "other-model"})
    assert rejoin(reg, a0) != a0.worker_id and rejoin(reg, a1) != a1.worker_id
    assert (reg.state, reg.generation) == ("loading", 3)
    # A coordinator that already formed a group takes no claims, however new they say they are.
    late = a0.model_copy(update={"generation": 9, "worker_id": "w-late"})
    assert rejoin(reg, late) != "w-late"
    assert reg.generation == 3 and reg.state == "loading"


def test_inconsistent_claims_are_not_adopted():
    a0, a1 = sorted(running_group().values(), key=lambda a: a.rank)
    reg, clock, _ = make_registry()
    rejoin(reg, a0)
    other_hostfile = ["10.0.0.1:29500", "10.0.0.3:29501"]
    rejoin(reg, a1.model_copy(update={"hostfile": other_hostfile}))
    assert reg.state == "forming" and reg.generation == 0
    clock.advance(3.5)
    beat_all(reg, engine_state="running")
    assert (reg.state, reg.generation) == ("loading", 3)
