"""The real engine behind the coordinator: two worker agents on loopback each run
`shardcompute.worker.engine` with a shard of SmolLM2, and greedy output through the official
openai client equals the single-process model's."""

import sys
from collections.abc import Iterator

import openai
import pytest
from local_cluster import LocalCluster

from shardcompute.engine.generate import stream_generate
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.rank_main import encode_prompt, stop_ids, tokenizer_for
from shardcompute.engine.sampling import SamplingParams
from shardcompute.model.loader import load_model

MODEL = "smollm2-135m"
QUESTION = "What is the capital of France?"
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory, smollm2_gguf) -> Iterator[LocalCluster]:
    """A coordinator and two agents running the default (real) engine, float32 weights."""
    cluster = LocalCluster(tmp_path_factory.mktemp("real"), world_size=2, request_timeout=60)
    with cluster.config.open("a") as f:
        f.write(f"model:\n  name: {MODEL}\n  path: {smollm2_gguf}\n  dtype: float32\n")
    try:
        cluster.start_coordinator()
        for rank in range(2):
            cmd = [sys.executable, "-m", "shardcompute.worker.agent"]
            cmd += ["--coordinator-url", cluster.url, "--connect-timeout", "10"]
            cluster.spawn(f"agent{rank}", [*cmd, "--rank", str(rank)])
        cluster.wait_state("ready", 60)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def expected(smollm2_gguf) -> str:
    """Greedy text of the single-process, dense model for the same chat prompt."""
    model = load_model(smollm2_gguf, "float32")
    tokenizer = tokenizer_for(ModelSpec(model=str(smollm2_gguf)))
    ids = encode_prompt(tokenizer, QUESTION, chat=True)
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, stop_token_ids=stop_ids(tokenizer, model)
    )
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, params))


@pytest.fixture(scope="module")
def client(real_cluster) -> Iterator[openai.OpenAI]:
    url = real_cluster.url + "/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def ask(client: openai.OpenAI, stream: bool):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=stream,
    )


def test_chat_non_streamed_equals_single_process(client, expected, real_cluster):
    r = ask(client, stream=False)
    assert expected, "the reference generated no text"
    assert r.choices[0].message.content == expected, real_cluster.logs()
    assert 0 < r.usage.completion_tokens <= MAX_TOKENS


def test_chat_streamed_equals_single_process(client, expected):
    text = "".join(c.choices[0].delta.content or "" for c in ask(client, stream=True) if c.choices)
    assert text == expected


def test_engine_reports_metrics(client, real_cluster):
    ask(client, stream=False)
    workers = real_cluster.cluster()["workers"]
    assert all(w["loaded"] for w in workers)
    assert all(w["metrics"]["tokens_processed"] > 0 for w in workers), workers


def test_bad_request_fails_alone(client, expected):
    with pytest.raises(openai.APIError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000, temperature=0)
    assert "context" in str(err.value)
    assert ask(client, stream=False).choices[0].message.content == expected
