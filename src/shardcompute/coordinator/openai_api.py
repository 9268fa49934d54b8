"""The OpenAI wire format: request bodies we accept and the response objects we build.

Types are strict ("10" is not a number, 1208.0 is not an integer, "yes" is not a boolean) and
every string must be encodable as UTF-8. Fields we do not implement are refused unless their
value changes nothing; other unknown fields (`user`, `metadata`, ...) are ignored. The checks
that need the model (tokens against the context) are the Door's, in validation.py.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from shardcompute.coordinator.validation import (
    MessageContent,
    NonEmptyText,
    Probability,
    Prompt,
    Seed,
    Stop,
    Temperature,
    unsupported,
)
from shardcompute.protocol import ChatMessage

NO_LOGPROBS = "log probabilities are not returned"
NO_TOOLS = "tool and function calls are not supported"
NO_PENALTY = "no repetition penalty is applied"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class ApiChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: MessageContent | None = None

    def to_protocol(self) -> ChatMessage:
        """`developer` is the newer name of `system`."""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=self.content or "")


class StreamOptions(_Strict):
    include_usage: bool = False


class _SamplingRequest(_Strict):
    kind: ClassVar[str] = "completion"

    model: NonEmptyText
    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 1.0
    top_p: Probability = 1.0
    top_k: int = Field(0, ge=0, description="0: no top-k cut (an extension to OpenAI's API)")
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int | None, WithJsonSchema({"enum": [1, None]})] = Field(
        None, description="Only 1 is supported."
    )
    logit_bias: unsupported("token biases are not applied", {}) = None
    logprobs: unsupported(NO_LOGPROBS, False) = None
    presence_penalty: unsupported(NO_PENALTY, 0) = None
    frequency_penalty: unsupported(NO_PENALTY, 0) = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError(f"only n=1 is supported, got n={n}")
        return n

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """The completion budget the client asked for, if any."""
        return self.max_tokens

    def engine_messages(self) -> list[ChatMessage] | None:
        """The conversation as the engine takes it (None: a completion)."""
        return None

    def engine_prompt(self) -> str | None:
        """The raw prompt (None: a chat)."""
        return None


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    kind: ClassVar[str] = "chat"

    messages: list[ApiChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: unsupported(NO_LOGPROBS, 0) = None
    tools: unsupported(NO_TOOLS, []) = None
    tool_choice: unsupported(NO_TOOLS, "none") = None
    functions: unsupported(NO_TOOLS, []) = None
    function_call: unsupported(NO_TOOLS, "none") = None
    response_format: unsupported("only plain text is returned", {"type": "text"}) = None

    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (the newer name), else max_tokens; None: until the context."""
        return self.max_completion_tokens or self.max_tokens

    def engine_messages(self) -> list[ChatMessage]:
        """The conversation as the engine takes it."""
        return [m.to_protocol() for m in self.messages]


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions (one prompt string)."""

    prompt: Prompt
    echo: unsupported("the prompt is not echoed", False) = None
    best_of: unsupported("one completion is generated per request", 1) = None
    suffix: unsupported("insertion after a suffix is not supported", "") = None

    def engine_prompt(self) -> str:
        """The one prompt string."""
        return self.prompt


# --- responses -----------------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds response objects for one request, chat or text completion."""

    def __init__(self, kind: Literal["chat", "completion"], request_id: str, model: str):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def full(self, text: str, finish_reason: str, use: dict[str, int]) -> dict[str, Any]:
        """The non-streamed response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
            body = self._envelope("chat.completion", choice)
        else:
            body = self._envelope("text_completion", {"index": 0, "text": text})
        body["choices"][0].update(finish_reason=finish_reason, logprobs=None)
        body["usage"] = use
        return body

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> str:
        """One SSE event carrying a text delta (and the finish reason on the last)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta}
            body = self._envelope("chat.completion.chunk", choice)
        else:
            body = self._envelope("text_completion", {"index": 0, "text": text})
        body["choices"][0].update(finish_reason=finish_reason, logprobs=None)
        return sse(body)

    def usage_chunk(self, use: dict[str, int]) -> str:
        """The extra last chunk that `stream_options.include_usage` asks for."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = self._envelope(obj, {})
        body["choices"], body["usage"] = [], use
        return sse(body)


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event line pair."""
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
