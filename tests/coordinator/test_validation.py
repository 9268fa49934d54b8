"""The door's rules, in-process and fast: request models (strict types, UTF-8 text, seed
range, unsupported fields), the Door's token checks against the model's context, the error
messages, and the rate-limited log of failed authentication. No cluster, no MLX."""

from __future__ import annotations

import asyncio
import json
import logging
import threading

import pytest
from jinja2.exceptions import TemplateError
from pydantic import ValidationError

from shardcompute.coordinator.auth import RateLimitedLog
from shardcompute.coordinator.http_errors import ApiError, ErrorResponse, QueueFull, Unauthorized
from shardcompute.coordinator.openai_api import ChatCompletionRequest, CompletionRequest
from shardcompute.coordinator.validation import (
    DEFAULT_COMPLETION_MAX_TOKENS,
    Door,
    describe_validation,
    shown,
)
from shardcompute.model.metadata import ModelInfo, read_model_info
from shardcompute.model.tokenizer import encode_chat, encode_text
from shardcompute.protocol import MAX_SEED

MODEL = "m"
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def byte_door() -> Door:
    """A dummy model: the byte tokenizer (one token per UTF-8 byte), a 2048-token context."""
    return Door(read_model_info("dummy:tinyllama-1.1b"))


@pytest.fixture(scope="module")
def smol() -> ModelInfo:
    """SmolLM2's real tokenizer and chat template, read without MLX."""
    return read_model_info("smollm2-135m")


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, "messages": HI, **fields})


def completion(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "hello", **fields})


def refusal(cls, body: dict) -> tuple[str, str | None]:
    """The 400 message and param a body gets from the request model."""
    with pytest.raises(ValidationError) as err:
        cls.model_validate(body)
    return describe_validation(err.value.errors())


# --- field rules -------------------------------------------------------------------------------

CHAT = {"model": MODEL, "messages": HI}
PROMPT = {"model": MODEL, "prompt": "hello"}


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({**CHAT, "max_tokens": "10"}, "max_tokens", 'valid integer (got "10")'),
        ({**CHAT, "max_tokens": 1208.0}, "max_tokens", "valid integer (got 1208.0)"),
        ({**CHAT, "max_tokens": True}, "max_tokens", "valid integer (got true)"),
        ({**CHAT, "stream": "yes"}, "stream", 'valid boolean (got "yes")'),
        ({**CHAT, "stream": 1}, "stream", "valid boolean (got 1)"),
        ({**CHAT, "temperature": "0.5"}, "temperature", "valid number"),
        ({**CHAT, "temperature": float("nan")}, "temperature", "finite number (got NaN)"),
        ({**CHAT, "temperature": float("inf")}, "temperature", "finite number (got Infinity)"),
        ({**CHAT, "temperature": 2.5}, "temperature", "less than or equal to 2"),
        ({**CHAT, "top_p": 0}, "top_p", "greater than 0"),
        ({**CHAT, "seed": -1}, "seed", "greater than or equal to 0 (got -1)"),
        ({**CHAT, "seed": 2**64}, "seed", f"less than or equal to {MAX_SEED}"),
        ({**CHAT, "seed": 10**30}, "seed", f"less than or equal to {MAX_SEED}"),
        ({**CHAT, "n": 2}, "n", "only n=1 is supported"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
        ({**CHAT, "stop": ""}, "stop.0", "at least 1 character"),
        ({**CHAT, "stop": ["ok", "\ud800"]}, "stop.1", "U+D800 at index 0 is a lone"),
        ({**CHAT, "model": "\udfff"}, "model", "U+DFFF at index 0"),
        ({**CHAT, "messages": [{"role": "user", "content": "ab\ud800"}]}, "messages.0.content",
         "U+D800 at index 2"),
        ({**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages.0.content", 'part 0 must be a text part, an object with type \'text\''),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role", "'user'"),
        ({**CHAT, "messages": []}, "messages", "at least 1 item"),
        ({**CHAT, "logit_bias": {"50256": -100}}, "logit_bias", "token biases are not applied"),
        ({**CHAT, "logprobs": True}, "logprobs", "true is not supported"),
        ({**CHAT, "top_logprobs": 3}, "top_logprobs", "log probabilities are not returned"),
        ({**CHAT, "presence_penalty": 0.5}, "presence_penalty", "no repetition penalty"),
        ({**CHAT, "frequency_penalty": -1}, "frequency_penalty", "no repetition penalty"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools", "tool and function calls"),
        ({**CHAT, "response_format": {"type": "json_object"}}, "response_format", "plain text"),
        ({**PROMPT, "echo": True}, "echo", "the prompt is not echoed"),
        ({**PROMPT, "best_of": 3}, "best_of", "one completion is generated"),
        ({**PROMPT, "suffix": "end"}, "suffix", "insertion after a suffix"),
        ({**PROMPT, "prompt": ["a", "b"]}, "prompt", "exactly one prompt"),
        ({**PROMPT, "prompt": [5]}, "prompt", "valid string (got 5)"),
        ({**PROMPT, "prompt": "\ud83d"}, "prompt", "U+D83D at index 0"),
        ({**PROMPT, "prompt": ""}, "prompt", "at least 1 character"),
        ({**PROMPT, "prompt": [""]}, "prompt", "at least 1 character"),
    ],
)  # fmt: skip
def test_bad_fields_are_named_with_their_value(body, param, needle):
    message, got = refusal(ChatCompletionRequest if "messages" in body else CompletionRequest, body)
    assert got == param
    assert message.startswith(f"{param}: ") and needle in message, message
    message.encode("ascii")  # quotes of the client's text are escaped


@pytest.mark.parametrize(
    "fields",
    [
        {"user": "u1", "metadata": {"a": "b"}, "parallel_tool_calls": False},  # ignored
        {"logit_bias": {}, "logprobs": False, "top_logprobs": 0, "tools": []},  # change nothing
        {"presence_penalty": 0, "frequency_penalty": 0.0, "n": 1, "tool_choice": "none"},
        {"response_format": {"type": "text"}, "seed": 0, "stop": "x"},
        {"seed": MAX_SEED, "temperature": 2, "top_p": 1, "max_completion_tokens": 5},
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}]}, *HI]},
    ],
)
def test_harmless_fields_are_accepted(fields):
    body = chat(**fields)
    assert body.seed in (None, 0, MAX_SEED)


def test_json_and_content_type_problems_are_described():
    bad_json = [{"type": "json_invalid", "loc": ("body", 3), "msg": "", "ctx": {"error": "x"}}]
    assert describe_validation(bad_json) == ("request body is not valid JSON: x", None)
    not_object = [{"type": "model_attributes_type", "loc": ("body",), "msg": "", "input": b"x"}]
    message, _ = describe_validation(not_object)
    assert "JSON object with Content-Type: application/json" in message


def test_shown_is_ascii_and_bounded():
    assert shown("\ud800") == '"\\ud800"'
    assert len(shown("x" * 500)) == 60 and shown("x" * 500).endswith("...")
    assert shown(float("nan")) == "NaN"


def test_error_bodies_render_any_text_and_carry_headers():
    body = ErrorResponse({"error": {"message": "bad \ud800 é"}}).body
    assert json.loads(body)["error"]["message"] == "bad \ud800 é"
    assert QueueFull("full").response().headers["retry-after"] == "1"
    assert Unauthorized("no").response().headers["www-authenticate"] == "Bearer"


# --- the door: tokens against the context ------------------------------------------------------


def test_chat_ids_are_the_chat_template_and_top_k_is_capped(smol):
    door = Door(smol)
    request = door.check(chat(top_k=10**30, stop="\n", seed=7, max_tokens=5))
    assert request.prompt_ids == encode_chat(smol.tokenizer, HI)
    assert request.prompt_ids[-4:] == smol.tokenizer.encode("<|im_start|>assistant\n")
    assert request.top_k == smol.args.vocab_size == 49152
    assert (request.stop, request.seed, request.max_tokens) == (["\n"], 7, 5)
    assert [m.model_dump() for m in request.messages] == HI


def test_completion_ids_are_the_raw_prompt(smol):
    request = Door(smol).check(completion(prompt="The capital of France is"))
    assert request.prompt_ids == encode_text(smol.tokenizer, "The capital of France is")
    assert request.prompt == "The capital of France is" and request.kind == "completion"


def test_default_budgets(byte_door):
    context = byte_door.model.context_length
    assert context == 2048
    # Chat runs to the end of the context (OpenAI's behaviour); the byte model's chat
    # template is the message text itself: "hi" is 2 tokens.
    assert byte_door.check(chat()).max_tokens == context - 2
    assert byte_door.check(completion()).max_tokens == DEFAULT_COMPLETION_MAX_TOKENS


@pytest.mark.parametrize("max_tokens", [2043, 2044, 10**9])
def test_context_boundary(byte_door, max_tokens):
    body = completion(prompt="abcd", max_tokens=max_tokens)  # 4 tokens
    if max_tokens <= 2044:
        assert byte_door.check(body).max_tokens == max_tokens
        return
    with pytest.raises(ApiError) as err:
        byte_door.check(body)
    e = err.value
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "max_tokens")
    assert f"context is 2048 tokens, but the request needs {4 + 10**9}" in e.message
    assert "4 in the prompt" in e.message and "at most 2044 tokens" in e.message


def test_prompt_over_the_context_names_the_prompt(byte_door):
    for body in (
        completion(prompt="x" * 2048),
        chat(messages=[{"role": "user", "content": "y" * 3000}]),
    ):
        with pytest.raises(ApiError) as err:
            byte_door.check(body)
        assert err.value.code == "context_length_exceeded"
        assert err.value.param == ("prompt" if body.kind == "completion" else "messages")
        assert "at most 0 tokens" in err.value.message


def test_prompt_of_no_tokens(byte_door):
    with pytest.raises(ApiError) as err:  # the byte model's chat template adds nothing
        byte_door.check(chat(messages=[{"role": "user", "content": ""}]))
    assert err.value.code == "empty_prompt" and "encodes to no tokens" in err.value.message


def test_a_chat_template_that_refuses_is_a_400(smol):
    class Strict:
        def apply_chat_template(self, *_a, **_k):
            raise TemplateError("Conversation roles must alternate user/assistant")

    door = Door(ModelInfo(smol.args, Strict(), "test"))
    with pytest.raises(ApiError) as err:
        door.check(chat())
    assert err.value.param == "messages" and "roles must alternate" in err.value.message


def test_admit_runs_off_the_event_loop(byte_door):
    async def admit():
        return await byte_door.admit(completion(prompt="abc", max_tokens=3)), threading.get_ident()

    request, loop_thread = asyncio.run(admit())
    assert request.prompt_ids == [97, 98, 99]
    (worker,) = {t.ident for t in threading.enumerate() if t.name.startswith("door")}
    assert worker != loop_thread


# --- failed authentication, logged at a bounded rate -------------------------------------------


def test_rate_limited_log_counts_what_it_suppresses(caplog):
    now = [100.0]
    limited = RateLimitedLog(logging.getLogger("test.auth"), lambda: now[0], interval=10, burst=3)
    with caplog.at_level(logging.WARNING, "test.auth"):
        for i in range(1000):
            limited.warning("401 attempt %d", i)
        assert [r.getMessage() for r in caplog.records] == [f"401 attempt {i}" for i in range(3)]
        limited.flush()  # the interval is not over: nothing yet
        assert len(caplog.records) == 3
        now[0] += 10
        limited.flush()
        assert caplog.records[-1].getMessage() == (
            "997 more failed authentications in the last 10s were not logged"
        )
        limited.warning("401 later")  # a new interval: logged again
    assert caplog.records[-1].getMessage() == "401 later" and len(caplog.records) == 5
