"""The OpenAI wire format: request bodies we accept and the response objects we build.

Unknown request fields are ignored (clients send many we do not use); the ones we use are
validated, so a bad value is a 400 naming its field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shardcompute.coordinator.http_errors import ApiError
from shardcompute.protocol import ChatMessage, GenerationRequest

DEFAULT_CHAT_MAX_TOKENS = 256
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ApiChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def to_protocol(self, index: int) -> ChatMessage:
        """Flatten text parts into one string; other part types are not supported."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text":
                    raise ApiError(
                        f"messages[{index}].content: part type {part.type!r} is not supported; "
                        "only text",
                        param=f"messages.{index}.content",
                    )
            text = "".join(p.text or "" for p in self.content)
        else:
            text = self.content or ""
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=text)


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported, got n={n}")
        return n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _common(self, max_tokens: int) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return dict(
            request_id=uuid.uuid4().hex,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            stream=self.stream,
        )


class ChatCompletionRequest(_SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ApiChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def to_generation(self) -> GenerationRequest:
        """The engine's view of this request."""
        limit = self.max_completion_tokens or self.max_tokens or DEFAULT_CHAT_MAX_TOKENS
        messages = [m.to_protocol(i) for i, m in enumerate(self.messages)]
        return GenerationRequest(kind="chat", messages=messages, **self._common(limit))


class CompletionRequest(_SamplingRequest):
    """POST /v1/completions (one prompt string)."""

    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError(f"exactly one prompt is supported, got a list of {len(prompt)}")
        return prompt

    def to_generation(self) -> GenerationRequest:
        """The engine's view of this request."""
        prompt = self.prompt[0] if isinstance(self.prompt, list) else self.prompt
        limit = self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        return GenerationRequest(kind="completion", prompt=prompt, **self._common(limit))


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
