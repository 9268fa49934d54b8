"""Messages that cross a process boundary: JSON over HTTP, never pickle.

Every top-level message carries `version`; a peer speaking another version is refused with a
message naming both. Parts nested inside a message share their parent's version.

Flow (all internal routes need `Authorization: Bearer <cluster token>`):
  agent  -> POST /internal/v1/workers/register              RegisterRequest -> RegisterResponse
  agent  -> POST /internal/v1/workers/{worker_id}/heartbeat Heartbeat -> HeartbeatResponse
  engine -> POST /internal/v1/workers/{worker_id}/loaded    LoadedReport -> Ack
  engine -> POST /internal/v1/workers/{worker_id}/metrics   MetricsReport -> Ack
  engine -> POST /internal/v1/work/next                     WorkPoll -> WorkBatch
  engine -> POST /internal/v1/work/events                   EventPosts -> CancelledRequests
  engine -> GET  /internal/v1/work/{request_id}/cancelled   -> CancelStatus

Views (API key, when one is configured):
  client -> GET /cluster            -> ClusterView
  page   -> GET /dashboard/events   SSE: `cluster` ClusterView, `traffic` TrafficHistory
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shardcompute.config import EngineConfig
from shardcompute.dtypes import DtypeRequest
from shardcompute.errors import ShardComputeError

# 2: agents re-register announcing the engine they run; TLS CA path in assignments; PIDs.
# 3: the engine takes a batch of requests per poll (WorkBatch) and reports its scheduler.
PROTOCOL_VERSION = 3
# The agent hands the engine child the cluster token in this env var, never on its command line.
CLUSTER_TOKEN_ENV = "SHARDCOMPUTE_SECURITY__CLUSTER_TOKEN"

ClusterState = Literal["forming", "loading", "ready", "degraded"]
# idle: no engine child; running: child alive (loaded or not); exited: child died.
EngineState = Literal["idle", "running", "exited"]
FinishReason = Literal["stop", "length", "cancelled", "error"]
MAX_SEED = 2**63 - 1  # seeds are 0..MAX_SEED: what every sampler can take as a 64-bit key


class ProtocolError(ShardComputeError):
    """A message that is not valid JSON for its type, or from another protocol version."""


class Part(BaseModel):
    """A piece nested inside a message; unknown fields are refused so typos fail loudly."""

    model_config = ConfigDict(extra="forbid")


class Message(Part):
    """A top-level message; `version` lets each side refuse a peer it does not understand."""

    version: int = PROTOCOL_VERSION

    @field_validator("version")
    @classmethod
    def _same_version(cls, v: int) -> int:
        if v != PROTOCOL_VERSION:
            raise ValueError(
                f"protocol version {v} is not supported (this side speaks {PROTOCOL_VERSION})"
            )
        return v


M = TypeVar("M", bound=BaseModel)


def decode(cls: type[M], data: str | bytes | dict[str, Any]) -> M:
    """Parse `data` as `cls`, raising ProtocolError naming the message and the bad fields."""
    try:
        if isinstance(data, dict):
            return cls.model_validate(data)
        return cls.model_validate_json(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
            for err in e.errors()
        )
        raise ProtocolError(f"bad {cls.__name__}: {problems}") from None


# --- worker agent <-> coordinator ---------------------------------------------------------


class DeviceFacts(Part):
    """What a worker machine is; shown in /cluster and used for memory-weighted plans."""

    host: str
    platform: str
    machine: str = ""
    cpu: str = ""
    cpu_count: int = Field(0, ge=0)
    memory_bytes: int = Field(0, ge=0)
    mlx_device: str = "unknown"
    python: str = ""


class RegisterRequest(Message):
    """An agent joining: its facts and where its engine's collectives can be reached.

    An agent joining again (the coordinator restarted, or forgot it) also sends the id it had
    and the assignment its engine still runs: a coordinator that never saw that generation
    adopts the group whole once every rank is back and loaded, so the engines keep their
    weights and their group.
    """

    facts: DeviceFacts
    address: str = Field(min_length=1)  # host or IP that peers use for the ring
    collective_port: int | None = Field(None, ge=1, le=65535)  # None: base + rank
    requested_rank: int | None = Field(None, ge=0)
    shard_dir: str | None = None
    agent_pid: int = 0
    worker_id: str | None = None  # the id this agent had before
    running: Assignment | None = None  # what its engine runs
    loaded: bool = False  # whether the last coordinator saw that engine load


class RegisterResponse(Message):
    """The id the agent uses from now on, and how often to beat."""

    worker_id: str
    heartbeat_interval_seconds: float
    heartbeat_timeout_seconds: float
    cluster_state: ClusterState


class WorkerMetrics(Part):
    """Totals since the engine started; the coordinator keeps the latest report."""

    memory_bytes: int = Field(0, ge=0)
    peak_memory_bytes: int = Field(0, ge=0)
    tokens_processed: int = Field(0, ge=0)
    steps: int = Field(0, ge=0)
    # Sampled: one decode step in PROFILE_EVERY runs with each collective timed on its own
    # (engine/runner.py); the time in collectives, and the wall time, of those steps.
    collective_seconds: float = Field(0.0, ge=0)
    profiled_steps: int = Field(0, ge=0)
    profiled_step_seconds: float = Field(0.0, ge=0)
    # The scheduler's view (rank 0): requests in the running batch and taken but waiting,
    # and KV-cache positions allocated of the budget. 0 until the engine reports them.
    running: int = Field(0, ge=0)
    waiting: int = Field(0, ge=0)
    kv_tokens_used: int = Field(0, ge=0)
    kv_tokens_total: int = Field(0, ge=0)
    preemptions: int = Field(0, ge=0)
    # Rows decoded per step, one entry per step since the last report (the batch-size histogram).
    batch_sizes: list[int] = Field(default_factory=list, max_length=100_000)


class Heartbeat(Message):
    """An agent saying it is alive, and how its engine child is doing."""

    generation: int | None = None  # the assignment the engine runs, None before any
    engine_state: EngineState = "idle"
    engine_exit_code: int | None = None
    engine_pid: int | None = None
    metrics: WorkerMetrics | None = None


class Assignment(Message):
    """Everything an engine needs to join its group and load its shard.

    `generation` grows each time the coordinator re-forms the cluster; an agent restarts its
    engine whenever the generation it is handed differs from the one it runs.
    """

    generation: int = Field(ge=1)
    worker_id: str
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1)
    hostfile: list[str]  # "host:port" of each rank's ring endpoint, in rank order
    plan_weights: list[float]
    model_name: str
    model_path: str | None = None
    dtype: DtypeRequest = DtypeRequest()
    engine: EngineConfig = EngineConfig()
    shard_dir: str | None = None
    coordinator_url: str
    backend: str = "ring"
    stall_seconds: float = 8.0  # see WorkerConfig.stall_seconds
    # Set by the agent, as is coordinator_url: the CA file on its machine that the
    # coordinator's certificate must verify against; None for plain HTTP.
    tls_ca: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Assignment:
        n = self.world_size
        if self.rank >= n or len(self.hostfile) != n or len(self.plan_weights) != n:
            raise ValueError(
                f"rank={self.rank}, {len(self.hostfile)} hostfile entries and "
                f"{len(self.plan_weights)} plan weights do not fit world_size={n}"
            )
        return self


class HeartbeatResponse(Message):
    """The cluster state and the worker's current assignment (None while forming); `loaded`
    once its engine reported that assignment loaded."""

    cluster_state: ClusterState
    assignment: Assignment | None = None
    loaded: bool = False


class LoadedReport(Message):
    """An engine saying its shard is loaded and it joined the group."""

    generation: int
    rank: int
    load_seconds: float = 0.0
    metrics: WorkerMetrics | None = None
    # What the engine computed, for the dashboard: PartitionPlan.to_dict(), the collectives
    # one token's forward pass makes, and the dtype the weights run in ("auto" resolved).
    plan: dict[str, Any] | None = None
    collectives_per_token: int | None = Field(None, ge=0)
    dtype: str | None = None
    kv_budget: int | None = Field(None, ge=0)  # KV positions rank 0's scheduler may allocate


class FailureReport(Message):
    """An engine that is about to exit, and why (its watchdog saw no progress): the cluster is
    degraded from now, not from the agent's next heartbeat."""

    generation: int
    reason: str = Field(max_length=2000)


class MetricsReport(Message):
    """An engine's running totals, posted as often as it likes."""

    generation: int
    metrics: WorkerMetrics


class Ack(Message):
    """A plain acknowledgement."""

    ok: bool = True


# --- rank-0 engine <-> coordinator: the work queue -----------------------------------------


class WorkPoll(Message):
    """A long poll for up to `max_requests` requests (the engine's free rows); answered as
    soon as one is queued, else after `wait_seconds` with none. With `max_requests` 0 it only
    collects the cancellations (at once, with `wait_seconds` 0)."""

    worker_id: str
    generation: int
    wait_seconds: float = Field(10.0, ge=0, le=60)
    max_requests: int = Field(1, ge=0, le=1024)


class ChatMessage(Part):
    """One turn of a conversation; the engine applies the chat template."""

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationRequest(Message):
    """One request for the engine: a conversation (`chat`) or raw text (`completion`).

    The coordinator validated it and tokenized it (`prompt_ids`: the chat-templated messages or
    the raw prompt), so the engine needs no tokenizer of its own to start it.
    """

    request_id: str
    kind: Literal["chat", "completion"]
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    prompt_ids: list[Annotated[int, Field(ge=0)]] | None = None
    max_tokens: int = Field(ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0: off
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[str] = []
    stream: bool = False

    @model_validator(mode="after")
    def _input_matches_kind(self) -> GenerationRequest:
        if self.kind == "chat" and not self.messages:
            raise ValueError("kind='chat' needs a non-empty messages list")
        if self.kind == "completion" and self.prompt is None:
            raise ValueError("kind='completion' needs a prompt")
        return self


class GenerationEvent(Part):
    """A step of a generation: new text, and on the last one, why it stopped.

    Token counts are running totals for the request, so the last event gives the usage.
    """

    text: str = ""
    token_ids: list[int] = []
    finish_reason: FinishReason | None = None
    prompt_tokens: int = Field(0, ge=0)
    completion_tokens: int = Field(0, ge=0)
    error: str | None = None
    queue_seconds: float | None = Field(None, ge=0)  # first event: waited in the engine


class WorkBatch(Message):
    """The answer to a WorkPoll: requests for the engine to take (possibly none), and those it
    holds whose clients went away since its last poll."""

    requests: list[GenerationRequest] = []
    cancelled: list[str] = []


class CancelStatus(Message):
    """Whether the engine should stop this request: its client went away or cancelled."""

    cancelled: bool


class RequestEvents(Part):
    """One request's events in an EventPosts, oldest first."""

    request_id: str
    events: list[GenerationEvent]


class EventPosts(Message):
    """The events of every request that has some to send, in one post: the engine posts once
    per flush, not once per request (at 8 streams, 8x fewer HTTP requests on both sides)."""

    posts: list[RequestEvents]


class CancelledRequests(Message):
    """Which of the requests in an EventPosts the engine should stop."""

    cancelled: list[str] = []


# --- views served by GET /cluster ----------------------------------------------------------


class WorkerView(Part):
    """One worker as the coordinator sees it."""

    worker_id: str
    rank: int | None
    alive: bool
    engine_state: EngineState
    loaded: bool
    address: str
    seconds_since_heartbeat: float
    facts: DeviceFacts
    metrics: WorkerMetrics
    engine_restarts: int = Field(0, ge=0)  # engines started for this worker after its first
    agent_pid: int = 0
    engine_pid: int | None = None


class ClusterView(Message):
    """The cluster at a glance: state, workers, queue and throughput."""

    state: ClusterState
    reason: str
    generation: int
    world_size: int
    model: str
    plan_weights: list[float]
    hostfile: list[str]
    workers: list[WorkerView]
    queue_depth: int
    in_flight: int
    requests_total: int
    tokens_per_second: float
    dtype: str = ""  # as the engines report it, else as configured
    backend: str = ""
    heartbeat_timeout_seconds: float = 0.0
    plan: dict[str, Any] | None = None  # the current generation's, once a rank has loaded
    collectives_per_token: int | None = None
    coordinator_pid: int = 0


# --- the dashboard's live stream (GET /dashboard/events) ------------------------------------


class TrafficSample(Part):
    """The traffic at one moment, as the dashboard charts it. Latencies are percentiles over
    the last few seconds, in seconds; None when nothing was measured then."""

    t: float  # unix time
    tokens_per_second: float = Field(ge=0)
    ttft_p50: float | None = None
    ttft_p90: float | None = None
    itl_p50: float | None = None  # inter-token latency
    itl_p90: float | None = None
    queue_depth: int = Field(ge=0)
    running: int = Field(ge=0)  # the running batch


class TrafficHistory(Message):
    """Traffic samples, oldest first: the whole ring buffer when a page connects, then each
    new one as it is taken."""

    interval_seconds: float = Field(gt=0)
    samples: list[TrafficSample]


RegisterRequest.model_rebuild()  # it names Assignment, defined after it
