"""Samplers and the messages that carry their parameters."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from pydantic import ValidationError

from shardcompute.collectives.group import Collectives
from shardcompute.engine.job import GenerateJob, ModelSpec
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.sampling import VocabParallelChooser, make_sampler
from shardcompute.parallel.linear import VocabParallelLMHead

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


def test_vocab_parallel_chooser_is_exact():
    """One rank's chooser: greedy is the argmax; temperature draws follow softmax(logits/T)."""
    head = VocabParallelLMHead(
        1, (0, LOGITS.shape[1]), [LOGITS.shape[1]], Collectives(), None, mx.float32
    )
    head.weight = LOGITS.T  # logits = h @ W.T with h = [[1]]
    h = mx.ones((1, 1, 1))
    greedy = VocabParallelChooser(SamplingParams(temperature=0), head, seed=0)
    assert greedy(h, 0).tolist() == [1, 0]
    assert greedy(h, 1).tolist() == [1, 1]  # rank 0's stop flag rides along

    temperature, n = 2.0, 4000
    chooser = VocabParallelChooser(SamplingParams(temperature=temperature), head, seed=3)
    counts = np.bincount([chooser(h, 0)[0].item() for _ in range(n)], minlength=5)
    expected = np.array(mx.softmax(LOGITS[0] / temperature)) * n
    # Pearson chi-square, 4 degrees of freedom: 18.5 is the 0.1% tail.
    assert ((counts - expected) ** 2 / expected).sum() < 18.5
