"""The chat client answers until the model stops: it sends max_tokens only when asked to, and
so do `up --chat` and `up --prompt`. The server is a mock transport (a unit test)."""

import io
import json

import httpx
from rich.console import Console

from shardcompute.client.chat import ChatSession, ChatSettings
from shardcompute.client.chat import _parser as chat_parser
from shardcompute.coordinator.up import _parser as up_parser


def test_max_tokens_is_sent_only_when_set():
    bodies = []

    def server(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        chunk = {"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}
        sse = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})

    http = httpx.Client(transport=httpx.MockTransport(server), base_url="http://test/v1")
    out = Console(file=io.StringIO())
    for limit in (None, 7):
        reply = ChatSession(http, "m", ChatSettings(max_tokens=limit), out).ask("hello")
        assert reply.text == "hi"
    assert "max_tokens" not in bodies[0] and bodies[1]["max_tokens"] == 7


def test_no_command_caps_answers_by_default():
    assert chat_parser().parse_args([]).max_tokens is None
    assert up_parser().parse_args(["--chat"]).max_tokens is None
    assert up_parser().parse_args(["--prompt", "q", "--max-tokens", "5"]).max_tokens == 5


def test_a_models_route_that_lists_nothing_readable_is_a_clear_error():
    """Another OpenAI-compatible server may answer /models with something else (mlx_lm.server
    answers with a traceback when it has no HF cache): an error naming it, no traceback."""
    import pytest

    from shardcompute.client.chat import ServerError, served_model

    for body in ("Traceback (most recent call last): ...", '{"data": []}'):
        http = httpx.Client(
            transport=httpx.MockTransport(lambda r, b=body: httpx.Response(200, text=b)),
            base_url="http://test/v1",
        )
        with pytest.raises(ServerError, match="/models did not list a model"):
            served_model(http)
