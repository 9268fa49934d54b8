"""The real engine behind the coordinator: two worker agents on loopback each run
`shardcompute.worker.engine` with a shard of SmolLM2, and greedy output through the official
openai client equals the single-process model's, alone, queued four at a time, after a client
hung up mid-stream, and after rank 0 failed a request on purpose."""

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from local_cluster import REAL_MODEL as MODEL
from local_cluster import LocalCluster, start_real_cluster, wait_for

from shardcompute.engine.generate import stream_generate
from shardcompute.engine.job import ModelSpec
from shardcompute.engine.params import SamplingParams
from shardcompute.engine.rank_main import encode_prompt, stop_ids, tokenizer_for
from shardcompute.model.loader import load_model
from shardcompute.worker.serving import FAULT_ENV

QUESTION = "What is the capital of France?"
OTHER_QUESTIONS = ["Name three primary colors.", "What is 7 times 8?", "Who wrote Hamlet?"]
MAX_TOKENS = 16
FAULT_WORD = "__engine_fault__"


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory, smollm2_gguf) -> Iterator[LocalCluster]:
    """A coordinator and two agents running the real engine, with the fault knob armed."""
    cluster = start_real_cluster(
        tmp_path_factory.mktemp("real"), smollm2_gguf, **{FAULT_ENV: FAULT_WORD}
    )
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def dense(smollm2_gguf):
    """The single-process, dense model and its tokenizer: the reference."""
    model = load_model(smollm2_gguf, "float32")
    return model, tokenizer_for(ModelSpec(model=str(smollm2_gguf)))


def greedy_text(dense, question: str, max_tokens: int = MAX_TOKENS) -> str:
    """The dense model's greedy answer to one chat question."""
    model, tokenizer = dense
    ids = encode_prompt(tokenizer, question, chat=True)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=0, stop_token_ids=stop_ids(tokenizer, model)
    )
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, params))


@pytest.fixture(scope="module")
def expected(dense) -> str:
    return greedy_text(dense, QUESTION)


@pytest.fixture(scope="module")
def client(real_cluster) -> Iterator[openai.OpenAI]:
    url = real_cluster.url + "/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def ask(client: openai.OpenAI, stream: bool = False, question: str = QUESTION, **kw):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=kw.pop("max_tokens", MAX_TOKENS),
        stream=stream,
        **kw,
    )


def workers_by_rank(cluster: LocalCluster) -> dict[int, dict]:
    return {w["rank"]: w for w in cluster.cluster()["workers"]}


def ranks_in_step(cluster: LocalCluster) -> dict[int, dict]:
    """The workers by rank, once every rank reports the same token count: ranks run the same
    steps, and each reports its count after each request."""

    def same() -> dict[int, dict] | None:
        workers = workers_by_rank(cluster)
        counts = {w["metrics"]["tokens_processed"] for w in workers.values()}
        return workers if len(counts) == 1 else None

    return wait_for(same, 20, "equal token counts on every rank")


def test_chat_non_streamed_equals_single_process(client, expected, real_cluster):
    r = ask(client)
    assert expected, "the reference generated no text"
    assert r.choices[0].message.content == expected, real_cluster.logs()
    assert 0 < r.usage.completion_tokens <= MAX_TOKENS


def test_chat_streamed_equals_single_process(client, expected):
    text = "".join(c.choices[0].delta.content or "" for c in ask(client, True) if c.choices)
    assert text == expected


def test_engine_reports_metrics(client, real_cluster):
    ask(client)
    workers = ranks_in_step(real_cluster).values()
    assert all(w["loaded"] for w in workers)
    assert all(w["metrics"]["tokens_processed"] > 0 for w in workers), workers


def test_bad_request_fails_alone(client, expected):
    with pytest.raises(openai.APIError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000, temperature=0)
    assert "context" in str(err.value)
    assert ask(client).choices[0].message.content == expected


def test_four_concurrent_requests_each_get_their_own_greedy_text(client, dense, expected):
    questions = [QUESTION, *OTHER_QUESTIONS]
    want = [expected, *(greedy_text(dense, q, 8) for q in OTHER_QUESTIONS)]

    def answer(question: str) -> str:
        limit = MAX_TOKENS if question == QUESTION else 8
        return ask(client, question=question, max_tokens=limit).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:  # queued by the coordinator, served one by one
        assert list(pool.map(answer, questions)) == want


def test_client_hanging_up_mid_stream_stops_the_engine(client, expected, real_cluster):
    before = ranks_in_step(real_cluster)[0]["metrics"]["steps"]
    body = {"model": MODEL, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", "max_tokens": 1000}
    body |= {"temperature": 0, "stream": True}  # greedy counts on for far more than 1000
    with httpx.stream("POST", real_cluster.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = (line for line in r.iter_lines() if line.startswith("data: {"))
        next(chunks), next(chunks)  # two pieces of text, then hang up
    wait_for(lambda: real_cluster.cluster()["in_flight"] == 0, 10, "the slot to free")
    # The engine reports after each request; its steps show where it stopped.
    steps = lambda: workers_by_rank(real_cluster)[0]["metrics"]["steps"]  # noqa: E731
    wait_for(lambda: steps() > before, 60, "the engine to end the cancelled request")
    after = ranks_in_step(real_cluster)[0]["metrics"]["steps"]
    assert after - before < 50, f"the engine ran {after - before} steps of a cancelled request"
    assert ask(client).choices[0].message.content == expected


@pytest.mark.parametrize("point", ["start", "stream"])
def test_rank0_failure_fails_the_request_alone_and_ranks_stay_in_step(
    point, client, expected, real_cluster
):
    generation = real_cluster.cluster()["generation"]
    with pytest.raises(openai.APIStatusError) as err:
        ask(client, question=f"Tell me a long story. {FAULT_WORD}:{point}", max_tokens=64)
    assert err.value.status_code == 502
    assert f"injected fault at '{point}'" in str(err.value)
    assert ask(client).choices[0].message.content == expected
    view = real_cluster.cluster()
    assert (view["state"], view["generation"]) == ("ready", generation)  # same engines
    ranks_in_step(real_cluster)
