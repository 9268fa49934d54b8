"""Generation in three layers: `generate_step` (token ids, every rank) -> `stream_generate`
(text deltas and timings, rank 0) -> `generate` (a string).

SPMD: every rank runs `generate_step`; rank 0 plans each step for its one request (the same
scheduler and step loop as the serving engine, engine/runner.py), every rank executes the plan
on its shard and sees the same tokens. `should_stop` is rank 0's host-side decision (a stop
string, a cancelled request): the request leaves at the next step, and every rank ends.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from shardcompute.engine.leader import EngineLeader
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.runner import Runner, StepLoop
from shardcompute.engine.scheduler import Request, Sampling, Scheduler, SchedulerConfig
from shardcompute.engine.text import StreamingDetokenizer, cut_at_stop
from shardcompute.kv_layout import kv_tokens
from shardcompute.model.llama import Model

PREFILL_CHUNK = 512  # prompt tokens per step; bounds a long prompt's peak memory
REQUEST = "generate"


def generate_step(
    model: Model,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[int]:
    """Yield generated token ids, on every rank; ends at max_tokens, a stop token, or rank 0's
    `should_stop`. Followers need not know the prompt: it travels in the step plans."""
    if model.comm.rank == 0 and not prompt_ids:
        raise ValueError("prompt is empty: at least one token is needed")
    leader = one_request_leader(model, prompt_ids, params) if model.comm.rank == 0 else None
    steps = StepLoop(Runner(model), slots=1, leader=leader).steps()
    try:
        for tokens in steps:
            if leader is not None and should_stop is not None and should_stop():
                leader.abort(REQUEST)
            yield from tokens.values()
    except GeneratorExit:
        # The consumer stopped early: still run to the exit plan, so no rank is left waiting.
        # Not after a failure: a lost peer would leave that exchange waiting forever.
        if leader is not None:
            leader.abort(REQUEST)
            for _ in steps:
                pass
        raise


def one_request_leader(
    model: Model, prompt_ids: Sequence[int], params: SamplingParams
) -> EngineLeader:
    """Rank 0's leader for one request; every rank exits when the request ends."""
    need = kv_tokens({0: len(prompt_ids) + params.max_tokens})
    config = SchedulerConfig(max_batch_size=1, max_kv_tokens=need, prefill_chunk=PREFILL_CHUNK)
    leader = EngineLeader(Scheduler(config), sink=lambda events: None)

    def finish_at_the_end(events) -> None:
        if any(e.finish_reason is not None for e in events):
            leader.finish()

    leader.sink = finish_at_the_end
    leader.submit(Request(REQUEST, list(prompt_ids), _sampling(params), arrival=time.monotonic()))
    return leader


def _sampling(params: SamplingParams) -> Sampling:
    """A seed for every sampled request: rank 0 draws one when none was given (the plan
    carries it to the other ranks)."""
    seed = params.seed
    if seed is None:
        seed = int.from_bytes(os.urandom(7), "little") if params.temperature > 0 else 0
    return Sampling(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=seed,
        stop_token_ids=frozenset(params.stop_token_ids),
    )


@dataclass
class GenerationResponse:
    """One streamed piece of output, with running counts and rates."""

    text: str
    token: int | None
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    finish_reason: str | None = None  # "stop" | "length" | None while running


def stream_generate(
    model: Model,
    tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    should_cancel: Callable[[], bool] | None = None,
) -> Iterator[GenerationResponse]:
    """Rank 0's view: text deltas as they come; the last response has finish_reason set.

    Stop strings and cancellation end the request on every rank at the next step.
    """
    detok, stopping, text = StreamingDetokenizer(tokenizer), [False], ""

    def should_stop() -> bool:
        return stopping[0] or bool(should_cancel and should_cancel())

    start = time.perf_counter()
    prompt_tps, gen_start, n, finish = 0.0, start, 0, "length"
    for token in generate_step(model, prompt_ids, params, should_stop):
        if stopping[0]:
            continue  # tokens already in flight when we decided to stop
        if n == 0:
            gen_start = time.perf_counter()
            prompt_tps = len(prompt_ids) / (gen_start - start)
        n += 1
        if token in params.stop_token_ids:
            finish = "stop"  # generate_step ends here by itself, on every rank
            continue
        delta = detok.add(token)
        text += delta
        delta, hit = cut_at_stop(text, delta, params.stop)
        if hit:
            stopping[0], finish = True, "stop"
        gen_tps = (n - 1) / max(time.perf_counter() - gen_start, 1e-9)
        yield GenerationResponse(delta, token, len(prompt_ids), prompt_tps, n, gen_tps)
    gen_tps = (n - 1) / max(time.perf_counter() - gen_start, 1e-9) if n > 1 else 0.0
    tail = "" if finish == "stop" and stopping[0] else detok.flush()
    yield GenerationResponse(tail, None, len(prompt_ids), prompt_tps, n, gen_tps, finish)


def generate_tokens(
    model: Model, prompt_ids: Sequence[int], max_tokens: int = 64, temperature: float = 0.0, **kw
) -> list[int]:
    """All generated ids at once (every rank calls this with the same arguments)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, **kw)
    return list(generate_step(model, prompt_ids, params))


def generate(model: Model, tokenizer, prompt: str, params: SamplingParams) -> str:
    """Generated text for a raw-text prompt (single process, or rank 0 with followers)."""
    ids = tokenizer.encode(prompt)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, params))
