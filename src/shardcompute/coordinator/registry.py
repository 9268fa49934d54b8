"""The worker registry and the cluster state machine: forming -> loading -> ready, or degraded.

A restarted coordinator adopts the group its workers' engines still run: agents register
again announcing their assignment, and once every rank of that generation is back and
consistent, it becomes the current group unchanged (no reload). If they do not all come back
within the heartbeat timeout, a new group forms in a later generation. A rank whose agent
had not yet heard that its engine loaded counts as loaded once rank 0 polls for work: rank 0
takes work only after its whole group has loaded and run a step together.

All time comes from an injected clock, so every transition is tested without sleeping.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from shardcompute.config import ClusterConfig
from shardcompute.coordinator.bootstrap import Candidate, build_hostfile, order_ranks, plan_weights
from shardcompute.coordinator.health import Clock, HealthTracker
from shardcompute.coordinator.http_errors import ApiError, Conflict, NotFound, NotReady
from shardcompute.errors import ConfigError
from shardcompute.protocol import (
    Assignment,
    ClusterState,
    EngineState,
    FailureReport,
    Heartbeat,
    HeartbeatResponse,
    LoadedReport,
    RegisterRequest,
    RegisterResponse,
    WorkerMetrics,
    WorkerView,
)

log = logging.getLogger("shardcompute.coordinator")

StateListener = Callable[[ClusterState, str], None]


@dataclass
class WorkerRecord:
    """One registered worker and what its heartbeats and engine have told us."""

    worker_id: str
    request: RegisterRequest
    order: int
    alive: bool = True
    previous_rank: int | None = None
    engine_state: EngineState = "idle"
    engine_generation: int | None = None
    engine_pid: int | None = None
    loaded_generation: int | None = None
    loaded_report: LoadedReport | None = None
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    engine_restarts: int = 0
    claim: Assignment | None = None  # the running group it announced when registering again

    def note_engine(self, state: EngineState, generation: int | None) -> None:
        """Take the engine's state; a new generation after an earlier one is a restart."""
        if generation is not None and self.engine_generation not in (None, generation):
            self.engine_restarts += 1
        self.engine_state, self.engine_generation = state, generation


class Registry:
    """Registers workers, hands out assignments, and derives the cluster state."""

    def __init__(self, config: ClusterConfig, clock: Clock, coordinator_url: str = ""):
        self._config = config
        self._clock = clock
        self._health = HealthTracker(clock, config.coordinator.heartbeat_timeout_seconds)
        self._claims_since: float | None = None  # when the first claim of a running group came
        self._highest_seen = 0  # the newest generation any agent announced: never reused
        self._adopted = 0  # the generation this coordinator adopted rather than formed
        self._coordinator_url = coordinator_url
        self._order = 0
        self._crashes = 0  # engine crashes since the cluster was last ready
        self.workers: dict[str, WorkerRecord] = {}
        self.assignments: dict[str, Assignment] = {}  # worker_id -> assignment, this generation
        self.generation = 0
        self.state: ClusterState = "forming"
        self.reason = ""
        self.listeners: list[StateListener] = []
        self._reconcile()

    @property
    def world_size(self) -> int:
        return self._config.parallelism.tensor_parallel_size

    # --- messages from agents and engines ------------------------------------------------

    def register(self, req: RegisterRequest) -> RegisterResponse:
        """Add a worker; it gets an assignment once enough workers are live, or keeps the one
        its engine runs if this coordinator can adopt that group."""
        self._check_requested_rank(req.requested_rank)
        self._order += 1
        claim = self._claim_of(req)
        worker_id = req.worker_id if claim else f"w{self._order}-{secrets.token_hex(3)}"
        rec = self.workers[worker_id] = WorkerRecord(worker_id, req, self._order, claim=claim)
        self._health.beat(worker_id)
        log.info("worker %s registered from %s (%s)", worker_id, req.address, req.facts.host)
        if claim is not None:
            rec.engine_state, rec.engine_generation = "running", claim.generation
            rec.loaded_generation = claim.generation if req.loaded else None
            if self._claims_since is None:
                self._claims_since = self._clock()
        self._reconcile()
        coord = self._config.coordinator
        return RegisterResponse(
            worker_id=worker_id,
            heartbeat_interval_seconds=coord.heartbeat_interval_seconds,
            heartbeat_timeout_seconds=coord.heartbeat_timeout_seconds,
            cluster_state=self.state,
        )

    def heartbeat(self, worker_id: str, hb: Heartbeat) -> HeartbeatResponse:
        """Note a worker is alive and its engine's state; reply with its assignment."""
        rec = self._live(worker_id)
        self._health.beat(worker_id)
        rec.note_engine(hb.engine_state, hb.generation)
        rec.engine_pid = hb.engine_pid
        if hb.metrics is not None:
            rec.metrics = hb.metrics
        self._reconcile()
        assignment = self.assignments.get(worker_id)
        if assignment is None and rec.claim is not None:
            assignment = rec.claim  # waiting for the rest of its group: its engine runs on
        loaded = assignment is not None and rec.loaded_generation == assignment.generation
        return HeartbeatResponse(cluster_state=self.state, assignment=assignment, loaded=loaded)

    def mark_loaded(self, worker_id: str, report: LoadedReport) -> None:
        """An engine of the current generation has loaded its shard."""
        rec = self._live(worker_id)
        assignment = self._current(worker_id, report.generation)
        if report.rank != assignment.rank:
            raise Conflict(
                f"worker {worker_id} reported rank {report.rank} but holds rank {assignment.rank}",
                param="rank",
            )
        rec.loaded_generation, rec.loaded_report = report.generation, report
        rec.note_engine("running", report.generation)
        if report.metrics is not None:
            rec.metrics = report.metrics
        log.info("worker %s (rank %d) loaded in %.1fs", worker_id, report.rank, report.load_seconds)
        self._reconcile()

    def update_metrics(self, worker_id: str, generation: int, metrics: WorkerMetrics) -> None:
        """Keep an engine's latest running totals."""
        rec = self._live(worker_id)
        self._current(worker_id, generation)
        rec.metrics = metrics

    def mark_failed(self, worker_id: str, report: FailureReport) -> None:
        """An engine of the current generation says it is exiting: as if its agent had seen
        it exit (the group is replaced), without waiting for the next heartbeat."""
        rec = self._live(worker_id)
        self._current(worker_id, report.generation)
        log.warning("worker %s's engine is exiting: %s", worker_id, report.reason)
        rec.note_engine("exited", report.generation)
        self._reconcile()

    def sweep(self) -> None:
        """Declare workers dead whose heartbeats stopped, and update the state."""
        for worker_id in self._health.expired():
            rec = self.workers[worker_id]
            rec.alive = False
            self._health.forget(worker_id)
            log.warning(
                "worker %s missed heartbeats for over %.1fs: dead",
                worker_id,
                self._config.coordinator.heartbeat_timeout_seconds,
            )
        self._reconcile()

    # --- lookups --------------------------------------------------------------------------

    def rank0_worker(self) -> str | None:
        """The worker whose engine takes requests in the current generation."""
        return next((w for w, a in self.assignments.items() if a.rank == 0), None)

    def check_rank0(self, worker_id: str, generation: int) -> None:
        """Refuse work polls from anything but the current generation's rank 0."""
        self._current(worker_id, generation)
        if worker_id != self.rank0_worker():
            raise Conflict(f"worker {worker_id} is not rank 0; only rank 0 takes work")
        if self.state == "loading" and self.generation == self._adopted:
            self._group_serves()

    def _group_serves(self) -> None:
        # Rank 0 polls only once every rank has loaded; an adopted rank's loaded report may
        # have gone to the coordinator that died.
        for worker_id in self.assignments:
            self.workers[worker_id].loaded_generation = self.generation
        log.info("rank 0 of generation %d polls for work: every rank has loaded", self.generation)
        self._reconcile()

    def loaded_report(self) -> LoadedReport | None:
        """The current generation's load report, rank 0's first: they share one plan."""
        for worker_id, _ in sorted(self.assignments.items(), key=lambda item: item[1].rank):
            report = self.workers[worker_id].loaded_report
            if report is not None and report.generation == self.generation:
                return report
        return None

    def worker_views(self) -> list[WorkerView]:
        """Every known worker, in registration order, for /cluster."""
        return [self._view(rec) for rec in sorted(self.workers.values(), key=lambda r: r.order)]

    def _view(self, rec: WorkerRecord) -> WorkerView:
        a = self.assignments.get(rec.worker_id)
        return WorkerView(
            worker_id=rec.worker_id,
            rank=a.rank if a else None,
            alive=rec.alive,
            engine_state=rec.engine_state,
            loaded=a is not None and rec.loaded_generation == self.generation,
            address=rec.request.address,
            seconds_since_heartbeat=round(min(self._health.age(rec.worker_id), 1e9), 3),
            facts=rec.request.facts,
            metrics=rec.metrics,
            engine_restarts=rec.engine_restarts,
            agent_pid=rec.request.agent_pid,
            engine_pid=rec.engine_pid if rec.engine_state == "running" else None,
        )

    def _live(self, worker_id: str) -> WorkerRecord:
        rec = self.workers.get(worker_id)
        if rec is None or not rec.alive:
            raise NotFound(
                f"worker {worker_id} is unknown or was declared dead; register again",
                code="unknown_worker",
            )
        return rec

    def _current(self, worker_id: str, generation: int) -> Assignment:
        if generation > self.generation:
            # Not stale: this coordinator restarted and has not adopted that group yet.
            raise NotReady(
                f"generation {generation} is newer than this coordinator's ({self.generation}): "
                "it restarted and waits for that group's workers to register again; retry",
                code="generation_unknown",
            )
        assignment = self.assignments.get(worker_id)
        if assignment is None or generation != self.generation:
            raise Conflict(
                f"worker {worker_id} speaks for generation {generation}, but the cluster is "
                f"at generation {self.generation}"
                + ("" if assignment else " and has no assignment for it"),
                code="stale_generation",
            )
        return assignment

    def _check_requested_rank(self, rank: int | None) -> None:
        if rank is None:
            return
        if rank >= self.world_size:
            raise ApiError(
                f"requested rank {rank} but parallelism.tensor_parallel_size={self.world_size}",
                param="requested_rank",
            )
        for rec in self.workers.values():
            if rec.alive and rec.request.requested_rank == rank:
                raise Conflict(
                    f"rank {rank} is already held by live worker {rec.worker_id}",
                    param="requested_rank",
                )

    # --- the state machine ---------------------------------------------------------------

    def _reconcile(self) -> None:
        """Derive the state from the facts, re-forming the group when it can."""
        problem = self._member_problem()
        if problem is not None:
            self._set("degraded", problem)
            crashed = self._member_problem_is_crash()
            limit = self._config.coordinator.max_engine_restarts
            if crashed and self._crashes >= limit:
                self._set("degraded", f"{problem}; gave up after {limit} engine restarts")
                return
            if not self._try_form():
                return
            self._crashes += crashed
        elif not self.assignments and not self._adopt_or_form():
            return
        self._set_progress()

    def _set_progress(self) -> None:
        """Loading until every member has loaded this generation, then ready."""
        waiting = sum(
            self.workers[w].loaded_generation != self.generation for w in self.assignments
        )
        if waiting:
            self._set("loading", f"waiting for {waiting} of {self.world_size} ranks to load")
        else:
            self._crashes = 0
            self._set("ready", f"{self.world_size} ranks loaded")

    # --- adopting the group a restarted coordinator's workers still run ---------------------

    def _claim_of(self, req: RegisterRequest) -> Assignment | None:
        """The running assignment `req` announces, if this coordinator could adopt it."""
        a = req.running
        if a is None or req.worker_id is None:
            return None
        self._highest_seen = max(self._highest_seen, a.generation)
        why = self._unadoptable(req, a)
        if why is not None:
            log.info(
                "worker %s's engine (generation %d, rank %d) will be replaced: %s",
                req.worker_id,
                a.generation,
                a.rank,
                why,
            )
            return None
        return a

    def _unadoptable(self, req: RegisterRequest, a: Assignment) -> str | None:
        """Why the engine `req` announces cannot join an adopted group, or None."""
        if self.assignments or a.generation <= self.generation:
            return f"this coordinator already formed generation {self.generation}"
        if a.worker_id != req.worker_id or req.worker_id in self.workers:
            return f"worker id {req.worker_id} does not fit its assignment or is taken"
        if req.requested_rank is not None and req.requested_rank != a.rank:
            return f"it asks for rank {req.requested_rank} but runs rank {a.rank}"
        cfg = self._config
        wanted = {
            "world_size": self.world_size,
            "model_name": cfg.model.name,
            "model_path": cfg.model.path,
            "dtype": cfg.model.dtype_request(),
            "engine": cfg.engine,
            "backend": cfg.parallelism.topology,
        }
        diffs = [f"{k}={getattr(a, k)!r}" for k, v in wanted.items() if getattr(a, k) != v]
        return f"the config differs: it runs {', '.join(diffs)}" if diffs else None

    def _adopt_or_form(self) -> bool:
        """With no group: adopt the running one claimants announce once it is whole, wait
        for the rest of it up to the heartbeat timeout, or else form a new group."""
        claims = [r.claim for r in self.workers.values() if r.alive and r.claim is not None]
        if claims:
            newest = max(c.generation for c in claims)
            group = [c for c in claims if c.generation == newest]
            if _is_whole(group):
                self._adopt(group)
                return True
            waited = self._clock() - (self._claims_since or self._clock())
            if waited <= self._config.coordinator.heartbeat_timeout_seconds:
                self._set(
                    "forming",
                    f"the coordinator restarted: waiting for generation {newest}'s ranks to "
                    f"register again ({len(group)} of {group[0].world_size})",
                )
                return False
            log.warning(
                "not adopting generation %d: %d of its ranks came back; forming a new group",
                newest,
                len(group),
            )
            self._drop_claims()
        return self._try_form()

    def _adopt(self, group: list[Assignment]) -> None:
        """Make `group` the current generation as it runs: same ranks, hostfile and plan."""
        self._forget_dead()
        self.generation = self._adopted = group[0].generation
        # The agent's URL and CA path are its own; the coordinator's view keeps its own URL.
        update = {"coordinator_url": self._coordinator_url, "tls_ca": None}
        self.assignments = {
            a.worker_id: a.model_copy(update=update) for a in sorted(group, key=lambda a: a.rank)
        }
        for a in group:
            self.workers[a.worker_id].previous_rank = a.rank
        self._drop_claims()
        log.info(
            "generation %d adopted as it runs (ranks %s, hostfile %s): engines keep their weights",
            self.generation,
            list(self.assignments),
            group[0].hostfile,
        )

    def _drop_claims(self) -> None:
        """Forget every claim (the claimants' agents replace their engines when told)."""
        for rec in self.workers.values():
            rec.claim = None
        self._claims_since = None

    def _member_problem(self) -> str | None:
        """Why the current generation cannot serve, or None when it can."""
        for worker_id, a in self.assignments.items():
            rec = self.workers[worker_id]
            if not rec.alive:
                return f"rank {a.rank} (worker {worker_id}) missed heartbeats"
            if rec.engine_state == "exited" and rec.engine_generation == self.generation:
                return f"rank {a.rank} (worker {worker_id}) engine exited"
        return None

    def _try_form(self) -> bool:
        """Assign ranks to live workers when there are enough; else stay forming/degraded."""
        live = [r for r in self.workers.values() if r.alive]
        ranked = order_ranks([self._candidate(r) for r in live], self.world_size)
        if not ranked:
            if self.state != "degraded":
                self._set(
                    "forming",
                    f"waiting for {self.world_size} workers ({len(live)} registered)",
                )
            return False
        try:
            weights = plan_weights(self._config.model.weights, [c.memory_bytes for c in ranked])
        except ConfigError as e:
            self._set("degraded" if self.assignments else "forming", str(e))
            return False
        self._assign(ranked, weights)
        return True

    def _member_problem_is_crash(self) -> bool:
        """Whether a member's engine died while its agent lives (a restart may fix it)."""
        return any(
            self.workers[w].alive
            and self.workers[w].engine_state == "exited"
            and self.workers[w].engine_generation == self.generation
            for w in self.assignments
        )

    def _candidate(self, rec: WorkerRecord) -> Candidate:
        a = self.assignments.get(rec.worker_id)
        return Candidate(
            worker_id=rec.worker_id,
            requested_rank=rec.request.requested_rank,
            previous_rank=a.rank if a else rec.previous_rank,
            order=rec.order,
            address=rec.request.address,
            collective_port=rec.request.collective_port,
            memory_bytes=rec.request.facts.memory_bytes,
        )

    def _assign(self, ranked: list[Candidate], weights: list[float]) -> None:
        # Past every generation an engine may still run, so none mistakes the new one for its.
        self.generation = max(self.generation, self._highest_seen) + 1
        self._forget_dead()
        hostfile = build_hostfile(ranked, self._config.worker.collective_port_base)
        self.assignments = {
            c.worker_id: self._assignment(rank, c, hostfile, weights)
            for rank, c in enumerate(ranked)
        }
        for rank, c in enumerate(ranked):
            self.workers[c.worker_id].previous_rank = rank
        log.info(
            "generation %d: ranks %s, hostfile %s",
            self.generation,
            [c.worker_id for c in ranked],
            hostfile,
        )

    def _forget_dead(self) -> None:
        # A dead worker must register again; keeping its record would only clutter /cluster.
        for worker_id in [w for w, r in self.workers.items() if not r.alive]:
            del self.workers[worker_id]

    def _assignment(
        self, rank: int, c: Candidate, hostfile: list[str], weights: list[float]
    ) -> Assignment:
        cfg = self._config
        shard_dir = self.workers[c.worker_id].request.shard_dir or cfg.model.shard_dir
        return Assignment(
            generation=self.generation,
            worker_id=c.worker_id,
            rank=rank,
            world_size=len(hostfile),
            hostfile=hostfile,
            plan_weights=weights,
            model_name=cfg.model.name,
            model_path=cfg.model.path,
            dtype=cfg.model.dtype_request(),
            engine=cfg.engine,
            shard_dir=shard_dir,
            coordinator_url=self._coordinator_url,
            backend=cfg.parallelism.topology,
            stall_seconds=cfg.worker.stall_seconds,
        )

    def _set(self, state: ClusterState, reason: str) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        changed = state != self.state
        self.state, self.reason = state, reason
        if changed:
            log.log(
                logging.WARNING if state == "degraded" else logging.INFO,
                "cluster %s: %s",
                state,
                reason,
            )
            for listener in self.listeners:
                listener(state, reason)


def _is_whole(group: list[Assignment]) -> bool:
    """Whether `group` holds each rank once and agrees on the hostfile and the plan."""
    first = group[0]
    return sorted(a.rank for a in group) == list(range(first.world_size)) and all(
        (a.world_size, a.hostfile, a.plan_weights)
        == (first.world_size, first.hostfile, first.plan_weights)
        for a in group
    )
