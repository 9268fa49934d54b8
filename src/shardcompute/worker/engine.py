"""The engine child process: load this rank's shard, then serve batches of requests.

Run by the worker agent as `python -m shardcompute.worker.engine --assignment PATH` with
MLX_RANK / MLX_HOSTFILE set. SPMD: every rank runs the same step loop (engine/runner.py); rank
0's leader plans each step with the scheduler and its serving threads (worker/serving.py) talk
to the coordinator off the step's critical path.

Failures keep the ranks in step. A request whose host-side work fails ends alone, at the next
step. A failure inside a step (the model, a collective) cannot be matched on the other ranks,
so the engine exits and the agent and the coordinator replace the group. The watchdog
(worker/watchdog.py) ends an engine whose steps stop making progress.
"""

from __future__ import annotations

# isort: off
import shardcompute.rank_setup  # noqa: F401  (first: a CPU rank sets up its BLAS before MLX)
# isort: on

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from shardcompute.collectives.group import Collectives, init_group
from shardcompute.collectives.rendezvous import Rendezvous
from shardcompute.config import EngineConfig
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.leader import EngineLeader
from shardcompute.engine.rank_main import load_spec, stop_ids, tokenizer_for
from shardcompute.engine.runner import PROFILE_EVERY, CollectiveSample, Runner, StepLoop
from shardcompute.engine.scheduler import Scheduler, SchedulerConfig
from shardcompute.kv_layout import CAPACITY_STEP, row_bucket
from shardcompute.model.llama import Model, collectives_per_forward
from shardcompute.protocol import CLUSTER_TOKEN_ENV, Assignment, LoadedReport, WorkerMetrics, decode
from shardcompute.runtime import mlx_device
from shardcompute.worker.queue_client import QueueClient
from shardcompute.worker.serving import Faults, Preparer, ServingIO
from shardcompute.worker.watchdog import Watchdog

log = logging.getLogger("shardcompute.engine")

METRICS_SECONDS = 1.0  # how often each rank reports its totals (rank 0: and its scheduler's)
# Prompt tokens per step unless configured. On the CPU a step that prefills 512 tokens holds
# every running request for seconds; 256 halves that (a 2500-token prompt at world size 2
# measured no slower: 23.8 s against 25.3 s with 512).
PREFILL_CHUNK = {"cpu": 256, "gpu": 2048}


class EngineBroken(Exception):
    """A step failed where the other ranks cannot follow; this engine must exit."""


def spec_of(a: Assignment) -> ModelSpec:
    """Which weights this rank loads: pre-made shards, or the model path/name sliced here."""
    return ModelSpec(
        model=a.model_path or a.model_name,
        shard_dir=a.shard_dir,
        dtype=a.dtype,
        weights=tuple(a.plan_weights),
    )


def kv_budget(model: Model, engine: EngineConfig) -> int:
    """KV positions the scheduler may allocate: as configured, else `kv_memory_fraction` of
    the memory free on the tightest rank, at most what a full batch of full contexts needs."""
    most = row_bucket(engine.max_batch_size) * _round_up(model.args.max_position_embeddings + 1)
    if engine.max_kv_tokens is not None:
        return min(engine.max_kv_tokens, most)
    attn = model.model.layers[0].self_attn
    per_position = 2 * model.args.num_hidden_layers * attn.local_num_kv_heads * attn.head_dim
    mine = engine.kv_memory_fraction * free_memory() / (per_position * model.dtype.size)
    everyone = model.comm.all_gather(mx.array([[mine]], mx.float32), axis=0)
    fits = int(mx.min(everyone).item()) // CAPACITY_STEP * CAPACITY_STEP
    return max(CAPACITY_STEP, min(fits, most))


def free_memory() -> int:
    """Bytes this rank may still use: the GPU's memory less what MLX holds, else the host's
    available memory."""
    info = mx.device_info()
    if mx.default_device() != mx.cpu and "memory_size" in info:
        return int(info["memory_size"]) - mx.get_active_memory()
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return int(info.get("memory_size", 8 << 30))


def _round_up(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


def warm_up(model: Model, max_batch: int) -> None:
    """Trace the compiled decode step at every row bucket (and, on a fresh machine, build its
    kernels) now, on every rank together, not in the first requests' time to first token."""
    cache = model.make_cache()
    rows = 1
    while rows <= row_bucket(max_batch):
        cache.resize(rows, CAPACITY_STEP)
        cache.lengths = dict.fromkeys(range(rows), 0)
        mx.eval(model.decode(dict.fromkeys(range(rows), 0), cache))
        rows *= 2


@dataclass
class Totals:
    """Running counters behind WorkerMetrics, kept by the step loop's thread."""

    tokens_processed: int = 0
    steps: int = 0
    sample: CollectiveSample = field(default_factory=CollectiveSample)


class Reporter:
    """Posts this rank's metrics every METRICS_SECONDS from a thread of its own."""

    def __init__(self, client: QueueClient, totals: Totals, scheduler: Scheduler | None):
        self.client, self.totals, self.scheduler = client, totals, scheduler
        self.stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._loop, name="metrics", daemon=True).start()

    def metrics(self) -> WorkerMetrics:
        m = WorkerMetrics(
            memory_bytes=mx.get_active_memory(),
            peak_memory_bytes=mx.get_peak_memory(),
            tokens_processed=self.totals.tokens_processed,
            steps=self.totals.steps,
            collective_seconds=self.totals.sample.collective_seconds,
            profiled_steps=self.totals.sample.steps,
            profiled_step_seconds=self.totals.sample.step_seconds,
        )
        s = self.scheduler
        if s is None:
            return m
        sizes = [s.batch_sizes.popleft() for _ in range(len(s.batch_sizes))]
        used, total = s.kv_usage()
        return m.model_copy(update=dict(
            running=len(s.running), waiting=len(s.waiting), kv_tokens_used=used,
            kv_tokens_total=total, preemptions=s.preemptions, batch_sizes=sizes,
        ))  # fmt: skip

    def _loop(self) -> None:
        while not self.stopped.wait(METRICS_SECONDS):
            self.client.metrics(self.metrics())


def run(a: Assignment, token: str) -> None:
    """Load the shard in its group, report loaded, and serve until told to stop."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    start = time.perf_counter()
    spec = spec_of(a)
    with ThreadPoolExecutor(1, thread_name_prefix="tokenizer") as pool:
        # Rank 0's tokenizer (a second or more: transformers' import) loads beside the weights:
        # MLX releases the GIL while it evaluates, so this is off a restart's critical path.
        tokenizer = pool.submit(tokenizer_for, spec) if a.rank == 0 else None
        model = load_in_group(a, spec)
        warm_up(model, a.engine.max_batch_size)
        budget = kv_budget(model, a.engine)
        client = QueueClient(a, token)
        totals, leader, io = Totals(), None, None
        if tokenizer is not None:
            leader, io = lead(a, model, client, budget, tokenizer.result())
    reporter = Reporter(client, totals, leader.scheduler if leader else None)
    loaded = LoadedReport(
        generation=a.generation,
        rank=a.rank,
        load_seconds=time.perf_counter() - start,
        metrics=reporter.metrics(),
        plan=model.plan.to_dict(),  # for the dashboard
        collectives_per_token=collectives_per_forward(model.args),
        dtype=model.policy.name,
        kv_budget=budget,
    )
    if not client.loaded(loaded):
        return
    log.info("rank %d of %d loaded %s as %s; KV budget %d positions",
             a.rank, a.world_size, spec.model, model.policy.describe(), budget)  # fmt: skip
    reporter.start()
    if io is not None:
        io.start()
    serve(model, a, leader, io, client, totals, stop)
    log.info("rank %d exiting", a.rank)


def load_in_group(a: Assignment, spec: ModelSpec) -> Model:
    """This rank's model, in its group. Ring ranks load first and meet, then form the group
    (collectives/rendezvous.py): the ring then forms at once, where MLX's connect back-off
    cost a restart about a second. Other backends form the group first."""
    if a.backend != "ring" or a.world_size == 1:
        return load_spec(spec, Collectives(init_group(a.backend, a.world_size)))
    meeting = Rendezvous(a.hostfile, a.rank, a.generation)
    meeting.open()
    try:
        comm = Collectives.pending(a.rank, a.world_size)
        model = load_spec(spec, comm)
        meeting.meet()
    finally:
        meeting.close()
    comm.join(init_group(a.backend, a.world_size))
    return model


def lead(a: Assignment, model: Model, client: QueueClient, budget: int, tokenizer):
    """Rank 0's scheduler, leader and serving threads."""
    engine = a.engine
    config = SchedulerConfig(
        max_batch_size=engine.max_batch_size,
        max_kv_tokens=budget,
        prefill_chunk=engine.prefill_chunk or PREFILL_CHUNK[mlx_device()],
    )
    leader = EngineLeader(Scheduler(config), sink=lambda events: None)
    stops = frozenset(stop_ids(tokenizer, model))
    io = ServingIO(leader, client, Preparer(tokenizer, model.args, stops, Faults.from_env()))
    leader.sink = io.sink
    return leader, io


def serve(model, a, leader, io, client, totals: Totals, stop: threading.Event) -> None:
    """The step loop, until any rank is told to stop or the generation is over."""

    def on_stall(reason: str) -> None:
        if io is not None:
            io.stop(f"the engine stalled and is being replaced: {reason}")
        client.failed(reason)

    watchdog = Watchdog(a.stall_seconds, on_stall)
    loop = StepLoop(
        Runner(model), slots=a.engine.max_batch_size, leader=leader, profile_every=PROFILE_EVERY
    )
    totals.sample = loop.sample
    loop.on_progress = watchdog.pet
    leave = (lambda: stop.is_set() or io.over.is_set()) if io is not None else stop.is_set
    try:
        for tokens in loop.steps(leave):
            totals.steps += 1
            totals.tokens_processed += len(tokens)
    except Exception as e:
        if io is not None:  # the others are at a step we can no longer match
            io.stop(f"the engine failed mid-step and is restarting: {type(e).__name__}: {e}")
        raise EngineBroken(str(e)) from e
    if io is not None:
        io.stop("the engine is stopping")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    p = argparse.ArgumentParser(prog="shardcompute.worker.engine")
    p.add_argument("--assignment", required=True, help="Assignment JSON written by the agent")
    args = p.parse_args(argv)
    a = decode(Assignment, Path(args.assignment).read_text())
    token = os.environ.get(CLUSTER_TOKEN_ENV)
    if not token:
        print(f"error: ${CLUSTER_TOKEN_ENV} is not set", file=sys.stderr)
        return 2
    try:
        run(a, token)
    except EngineBroken as e:
        log.exception("rank %d exiting: %s", a.rank, e)
        # Not a normal interpreter exit: a step may still be in flight on MLX's stream, waiting
        # on a lost peer, and tearing MLX down would wait for it forever.
        logging.shutdown()
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
