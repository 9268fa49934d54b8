"""Samplers and the messages that carry their parameters."""

from __future__ import annotations

import mlx.core as mx
import pytest
from pydantic import ValidationError

from shardcompute.engine.job import GenerateJob, ModelSpec
from shardcompute.engine.sampling import SamplingParams, make_sampler

LOGITS = mx.array([[0.0, 5.0, 4.0, -1.0, 3.0]])


def draws(params: SamplingParams, n: int = 200) -> set[int]:
    sampler = make_sampler(params)
    return {int(sampler(LOGITS).item()) for _ in range(n)}


def test_greedy_top_k_top_p():
    assert draws(SamplingParams(temperature=0), 3) == {1}
    assert draws(SamplingParams(temperature=1.0, top_k=2, seed=1)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_p=0.5, seed=1)) == {1}
    assert draws(SamplingParams(temperature=5.0, seed=1)) == {0, 1, 2, 3, 4}


def test_seed_repeats():
    a = make_sampler(SamplingParams(temperature=1.0, seed=7))
    b = make_sampler(SamplingParams(temperature=1.0, seed=7))
    assert [int(a(LOGITS).item()) for _ in range(20)] == [int(b(LOGITS).item()) for _ in range(20)]


def test_bad_params_are_named():
    with pytest.raises(ValidationError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValidationError, match="top_p"):
        SamplingParams(top_p=0)


def test_job_round_trip():
    job = GenerateJob(
        world_size=2,
        spec=ModelSpec(model="m", weights=(2.0, 1.0)),
        prompt="hi",
        params=SamplingParams(temperature=0.7, stop=("\n",), seed=3),
    )
    assert GenerateJob.model_validate_json(job.model_dump_json()) == job
