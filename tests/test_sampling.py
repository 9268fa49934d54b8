"""Samplers and the messages that carry their parameters."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from pydantic import ValidationError

from shardcompute.collectives.group import Collectives
from shardcompute.engine.job import GenerateJob, ModelSpec
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.sampling import RowSampler, VocabParallelChooser, make_sampler
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


def lm_head() -> VocabParallelLMHead:
    head = VocabParallelLMHead(
        1, (0, LOGITS.shape[1]), [LOGITS.shape[1]], Collectives(), None, mx.float32
    )
    head.weight = LOGITS.T  # logits = h @ W.T with h = [[1]]
    return head


def test_vocab_parallel_chooser_is_exact():
    """One rank's chooser: greedy is the argmax; temperature draws follow softmax(logits/T)."""
    chooser, h = VocabParallelChooser(lm_head()), mx.ones((1, 1, 1))
    assert chooser(h, [RowSampler.joining(0.0, 0, 1.0, seed=0)]).tolist() == [1]
    temperature, n = 2.0, 4000
    row = RowSampler.joining(temperature, 0, 1.0, seed=3)
    counts = np.bincount([chooser(h, [row])[0].item() for _ in range(n)], minlength=5)
    expected = np.array(mx.softmax(LOGITS[0] / temperature)) * n
    # Pearson chi-square, 4 degrees of freedom: 18.5 is the 0.1% tail.
    assert ((counts - expected) ** 2 / expected).sum() < 18.5


def test_each_row_draws_its_own_stream_whatever_the_batch():
    """A seeded row gets the same tokens alone or beside others (greedy, top-k, other seeds),
    and a preempted row that comes back with `skip` continues where it was."""
    chooser, steps = VocabParallelChooser(lm_head()), 12
    alone = RowSampler.joining(1.5, 0, 1.0, seed=7)
    solo = [chooser(mx.ones((1, 1, 1)), [alone]).item() for _ in range(steps)]
    rows = [
        RowSampler.joining(0.0, 0, 1.0, seed=0),
        RowSampler.joining(1.5, 0, 1.0, seed=7),
        RowSampler.joining(1.0, 2, 1.0, seed=9),
    ]
    batched = [chooser(mx.ones((3, 1, 1)), rows).tolist() for _ in range(steps)]
    assert [b[1] for b in batched] == solo
    assert {b[0] for b in batched} == {1} and {b[2] for b in batched} <= {1, 2}
    resumed = RowSampler.joining(1.5, 0, 1.0, seed=7, skip=5)
    assert [chooser(mx.ones((1, 1, 1)), [resumed]).item() for _ in range(7)] == solo[5:]
