"""The coordinator's state in one object: registry, queue and metrics, wired together."""

from __future__ import annotations

import os
import time
from pathlib import Path

from shardcompute.config import ClusterConfig, ModelConfig
from shardcompute.coordinator.health import Clock
from shardcompute.coordinator.http_errors import NotFound, NotReady
from shardcompute.coordinator.metrics import Metrics
from shardcompute.coordinator.queue import Job, RequestQueue
from shardcompute.coordinator.registry import Registry
from shardcompute.coordinator.traffic import TrafficLog, take_sample
from shardcompute.coordinator.validation import Door
from shardcompute.model.metadata import ModelInfo, read_model_info
from shardcompute.protocol import ClusterState, ClusterView, GenerationRequest


def served_model(config: ModelConfig) -> ModelInfo:
    """The served model's sizes and tokenizer, read as the engines read them (no MLX here).

    A shard directory that lives only on the workers is skipped: the model's path or name
    gives the same tokenizer and context.
    """
    shard_dir = config.shard_dir if config.shard_dir and Path(config.shard_dir).is_dir() else None
    return read_model_info(config.path or config.name, shard_dir)


class Coordinator:
    """What the HTTP routes act on. Holds the served model's tokenizer, never its weights."""

    def __init__(
        self,
        config: ClusterConfig,
        cluster_token: str,
        clock: Clock = time.monotonic,
        coordinator_url: str = "",
        model: ModelInfo | None = None,
    ):
        self.config = config
        self.door = Door(model if model is not None else served_model(config.model), self.kv_budget)
        self.cluster_token = cluster_token
        self.clock = clock
        self.registry = Registry(config, clock, coordinator_url)
        self.metrics = Metrics(clock, self.view)
        self.queue = RequestQueue(
            config.coordinator.max_queued_requests, clock, observer=self.metrics.observe_event
        )
        self.traffic = TrafficLog()
        self.registry.listeners.append(self._on_state_change)

    def kv_budget(self) -> int | None:
        """The KV positions rank 0's scheduler may hold, once it has loaded."""
        report = self.registry.loaded_report()
        return report.kv_budget if report is not None else None

    @property
    def model_id(self) -> str:
        """The id clients name in `model`."""
        return self.config.model.name

    def _on_state_change(self, state: ClusterState, reason: str) -> None:
        # A lost rank stalls the whole group: fail its requests now rather than at timeout.
        if state == "degraded":
            self.queue.fail_all(f"the cluster lost a rank ({reason}); retry when it is ready")

    def check_model(self, model: str) -> None:
        """Refuse a request for a model this cluster does not serve."""
        if model != self.model_id:
            raise NotFound(
                f"model {model!r} is not served here; this cluster serves {self.model_id!r}",
                param="model",
                code="model_not_found",
            )

    async def queue_request(self, request: GenerationRequest) -> Job:
        """Queue a request if the cluster can serve it."""
        self.registry.sweep()
        if self.registry.state != "ready":
            raise NotReady(
                f"the cluster is not ready (state={self.registry.state}: "
                f"{self.registry.reason}); retry later",
                code="cluster_not_ready",
            )
        return await self.queue.submit(request)

    def record_traffic(self) -> None:
        """Add a sample to the dashboard's traffic history."""
        sample = take_sample(self.metrics, self.queue, self.registry.worker_views())
        self.traffic.record(sample)

    def view(self) -> ClusterView:
        """Everything /cluster shows."""
        reg = self.registry
        any_assignment = next(iter(reg.assignments.values()), None)
        loaded = reg.loaded_report()
        return ClusterView(
            state=reg.state,
            reason=reg.reason,
            generation=reg.generation,
            world_size=reg.world_size,
            model=self.model_id,
            plan_weights=any_assignment.plan_weights if any_assignment else [],
            hostfile=any_assignment.hostfile if any_assignment else [],
            workers=reg.worker_views(),
            queue_depth=self.queue.depth,
            in_flight=self.queue.in_flight,
            requests_total=self.queue.submitted_total,
            tokens_per_second=round(self.metrics.tokens.rate(), 3),
            dtype=(loaded and loaded.dtype) or self.config.model.dtype,
            backend=self.config.parallelism.topology,
            heartbeat_timeout_seconds=self.config.coordinator.heartbeat_timeout_seconds,
            plan=loaded.plan if loaded else None,
            collectives_per_token=loaded.collectives_per_token if loaded else None,
            coordinator_pid=os.getpid(),
        )
