"""Validate once, at the door: everything a request can get wrong is a 400 before it is queued.

Two layers. Field rules (types for the request models in openai_api.py): strict types, text
that UTF-8 can carry, the seed range, and fields we do not implement, which are refused
unless their value changes nothing. Then the `Door`, which needs the served model: it
tokenizes the prompt as the engine would and checks it against the model's context, so the
engine gets token ids it can run.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Protocol

from jinja2.exceptions import TemplateError
from pydantic import BeforeValidator, Field, ValidationInfo, WithJsonSchema
from pydantic_core import PydanticCustomError

from shardcompute.coordinator.http_errors import ApiError
from shardcompute.kv_layout import CAPACITY_STEP, kv_tokens
from shardcompute.model.metadata import ModelInfo
from shardcompute.model.tokenizer import encode_chat, encode_text
from shardcompute.protocol import MAX_SEED, ChatMessage, GenerationRequest

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_SEQUENCES = 4  # as OpenAI: each one is matched against the text after every token


def _utf8(value: Any) -> Any:
    # JSON can carry a lone UTF-16 surrogate ("\ud800"); UTF-8, and so the engine, cannot.
    # Checked before pydantic's own str checks, whose message for it is vaguer.
    try:
        if isinstance(value, str):
            value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "invalid_text",
            "is not valid text: {char} at index {index} is a lone UTF-16 surrogate, which "
            "UTF-8 cannot encode",
            {"char": f"U+{ord(value[e.start]):04X}", "index": e.start},
        ) from None
    return value


Text = Annotated[str, BeforeValidator(_utf8)]
NonEmptyText = Annotated[str, Field(min_length=1), BeforeValidator(_utf8)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Probability = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
Temperature = Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)]


def _one_prompt(value: Any) -> Any:
    if isinstance(value, list):
        if len(value) != 1:
            raise PydanticCustomError(
                "one_prompt",
                "exactly one prompt is supported, got a list of {n}",
                {"n": len(value)},
            )
        return value[0]
    return value


def _text_or_list(max_items: int, min_items: int = 0) -> dict[str, Any]:
    """JSON Schema of a non-empty string, or a list of such strings."""
    text = {"type": "string", "minLength": 1}
    return {
        "anyOf": [
            text,
            {"type": "array", "items": text, "minItems": min_items, "maxItems": max_items},
        ]
    }


# A non-empty string, or OpenAI's list form holding exactly one.
Prompt = Annotated[
    NonEmptyText, BeforeValidator(_one_prompt), WithJsonSchema(_text_or_list(1, min_items=1))
]


def _join_text_parts(value: Any) -> Any:
    """OpenAI's list form of a message's content, joined: only text parts are supported."""
    if not isinstance(value, list):
        return value
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise PydanticCustomError(
                "content_part",
                "part {index} must be a text part, an object with type 'text' and a string "
                "'text'; got {part}",
                {"index": i, "part": shown(part)},
            )
        texts.append(part["text"])
    return "".join(texts)


_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
# A string, or a list of text parts joined into one.
MessageContent = Annotated[
    Text,
    BeforeValidator(_join_text_parts),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}),
]


def _stop_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# One stop string or a list of them; each must be non-empty (an empty one matches anywhere).
Stop = Annotated[
    list[NonEmptyText],
    Field(max_length=MAX_STOP_SEQUENCES),
    BeforeValidator(_stop_list),
    WithJsonSchema(_text_or_list(MAX_STOP_SEQUENCES)),
]


def _same(value: Any, allowed: Any) -> bool:
    """Equal and of the same JSON type (0 is not false; 0 and 0.0 are the same number)."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    if isinstance(allowed, int | float):
        return isinstance(value, int | float) and value == allowed
    return type(value) is type(allowed) and value == allowed


def unsupported(why: str, *harmless: Any) -> Any:
    """A field we do not implement. null and the `harmless` values (which would change
    nothing) pass as None; any other value is a 400 saying why it is refused."""

    def check(value: Any, info: ValidationInfo) -> None:
        if value is None or any(_same(value, h) for h in harmless):
            return None
        allowed = " or ".join(json.dumps(h) for h in (None, *harmless))
        raise PydanticCustomError(
            "unsupported",
            "{value} is not supported: {why}; leave {field} out or send {allowed}",
            {"field": info.field_name, "value": shown(value), "why": why, "allowed": allowed},
        )

    schema = {"enum": [None, *harmless], "description": f"Not supported: {why}."}
    return Annotated[Any, BeforeValidator(check), WithJsonSchema(schema)]


def shown(value: Any, limit: int = 60) -> str:
    """A value as JSON for an error message: ASCII only (surrogates escaped), cut at `limit`."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- the door: checks that need the served model ---------------------------------------------


class SamplingBody(Protocol):
    """What the door reads from a parsed chat or completion request (see openai_api.py)."""

    kind: str
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] | None
    stream: bool

    def requested_max_tokens(self) -> int | None: ...
    def engine_messages(self) -> list[ChatMessage] | None: ...
    def engine_prompt(self) -> str | None: ...


class Door:
    """Tokenizes a parsed request as the engine would and checks it against the model."""

    def __init__(self, model: ModelInfo, kv_budget: Callable[[], int | None] = lambda: None):
        self.model = model
        # The KV positions the engine may hold (rank 0 reports it once loaded; None before).
        self.kv_budget = kv_budget
        # One thread: tokenizing must not block the event loop, and the tokenizer is not
        # shared between threads.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="door")

    async def admit(self, body: SamplingBody) -> GenerationRequest:
        """The engine's request for `body`, or ApiError (400) saying what is wrong."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.check, body)

    def check(self, body: SamplingBody) -> GenerationRequest:
        """`admit`, on the caller's thread."""
        ids = self.prompt_ids(body)
        max_tokens = self.max_tokens(body, len(ids))
        return GenerationRequest(
            request_id=uuid.uuid4().hex,
            kind=body.kind,
            messages=body.engine_messages(),
            prompt=body.engine_prompt(),
            prompt_ids=ids,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            # Beyond the vocabulary, top-k keeps every token, as it does at the vocabulary.
            top_k=min(body.top_k, self.model.args.vocab_size),
            seed=body.seed,
            stop=body.stop or [],
            stream=body.stream,
        )

    def prompt_ids(self, body: SamplingBody) -> list[int]:
        """The prompt's token ids: chat-templated messages, or the raw completion prompt."""
        field = "messages" if body.kind == "chat" else "prompt"
        messages = body.engine_messages()
        if messages is None:
            ids = encode_text(self.model.tokenizer, body.engine_prompt() or "")
        else:
            ids = self._chat_ids([m.model_dump() for m in messages])
        if not ids:
            raise ApiError(
                f"{field}: the prompt encodes to no tokens; send some text",
                param=field,
                code="empty_prompt",
            )
        return ids

    def _chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            return encode_chat(self.model.tokenizer, messages)
        except (TemplateError, ValueError) as e:  # e.g. a template that wants roles to alternate
            raise ApiError(
                f"messages: the model's chat template refused this conversation: {e}",
                param="messages",
            ) from None

    def max_tokens(self, body: SamplingBody, prompt_tokens: int) -> int:
        """The completion budget: as asked, else all the context left (chat, as OpenAI) or 16
        (completions); 400 `context_length_exceeded` when the prompt and it do not fit."""
        context = self.model.context_length
        asked = body.requested_max_tokens()
        if asked is None and body.kind == "chat":
            budget = min(context, self._kv_room()) - prompt_tokens
        else:
            budget = asked if asked is not None else DEFAULT_COMPLETION_MAX_TOKENS
        if budget >= 1 and prompt_tokens + budget <= context:
            self._check_kv(prompt_tokens, budget, asked is not None)
            return budget
        field = "messages" if body.kind == "chat" else "prompt"
        room = max(context - prompt_tokens, 0)
        param = "max_tokens" if asked is not None and room > 0 else field
        raise ApiError(
            f"{param}: this model's context is {context} tokens, but the request needs "
            f"{prompt_tokens + max(budget, 1)}: {prompt_tokens} in the {field} and "
            f"max_tokens={max(budget, 1)} for the completion; shorten the {field} or ask for "
            f"at most {room} tokens",
            param=param,
            code="context_length_exceeded",
        )

    def _kv_room(self) -> int:
        """The longest sequence the engine's KV budget holds as one row (no limit if unknown)."""
        budget = self.kv_budget()
        return 1 << 62 if budget is None else budget // CAPACITY_STEP * CAPACITY_STEP - 1

    def _check_kv(self, prompt_tokens: int, max_tokens: int, asked: bool) -> None:
        """400 for a request that could not fit the engine's KV budget even alone."""
        budget = self.kv_budget()
        need = kv_tokens({0: prompt_tokens + max_tokens})
        if budget is None or need <= budget:
            return
        param = "max_tokens" if asked else "messages"
        raise ApiError(
            f"{param}: the prompt ({prompt_tokens} tokens) and max_tokens ({max_tokens}) need "
            f"{need} KV-cache positions, over the engine's budget of {budget} "
            f"(engine.max_kv_tokens); ask for at most "
            f"{max(self._kv_room() - prompt_tokens, 0)} tokens",
            param=param,
            code="kv_budget_exceeded",
        )


# --- how a failed parse is told to the client --------------------------------------------------


# Errors about the body as a whole: absent, or not a JSON object.
_WHOLE_BODY = ("model_attributes_type", "dict_type", "model_type", "missing")


def describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A message naming every bad field (and the value it got), and the first field's dotted
    path, from FastAPI's RequestValidationError.errors()."""
    problems, params = [], []
    for err in errors:
        loc = [str(p) for p in err["loc"] if p != "body"]
        if err["type"] == "json_invalid":
            reason = err.get("ctx", {}).get("error", "")
            problems.append(f"request body is not valid JSON: {reason}")
            continue
        if not loc and err["type"] in _WHOLE_BODY:
            problems.append(
                "request body must be a JSON object with Content-Type: application/json"
            )
            continue
        param = ".".join(loc) or "body"
        params.append(param)
        problem = f"{param}: {err['msg'].removeprefix('Value error, ')}"
        if _quotable(err) and "input" in err:
            problem += f" (got {shown(err['input'])})"
        problems.append(problem)
    return "; ".join(problems), (params[0] if params else None)


def _quotable(err: dict[str, Any]) -> bool:
    """Whether the message should quote the input: a scalar it does not already show."""
    scalar = isinstance(err.get("input"), str | int | float | bool)
    return scalar and err["type"] not in ("unsupported", "invalid_text", "missing")
