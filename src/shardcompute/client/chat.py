"""Interactive chat against a ShardCompute coordinator (or any OpenAI-compatible server).

The server applies the model's chat template, so the client keeps the whole conversation
and sends it each turn. Reads stdin line by line, so it also works with piped input.
Commands: /reset clears the history, /quit leaves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.markup import escape

from shardcompute.errors import ShardComputeError
from shardcompute.http_client import default_tls_ca, describe_http_error, http_client

MAX_TOKENS_HELP = "cap on each answer, in tokens (default: until the model stops)"
API_KEY_ENVS = ("SHARDCOMPUTE_API_KEY", "SHARDCOMPUTE_SECURITY__API_KEY", "OPENAI_API_KEY")


class ServerError(Exception):
    """The server answered with an error; the message is the server's."""


def api_client(
    url: str, api_key: str | None, timeout: float = 600.0, tls_ca: str | None = None
) -> httpx.Client:
    """An HTTP client for the OpenAI routes under `url`, with the API key if any; with
    `tls_ca`, the server's certificate must verify against that CA file."""
    return http_client(url.rstrip("/") + "/v1", ca_file=tls_ca, token=api_key, timeout=timeout)


def default_api_key() -> str | None:
    """The API key from the first of API_KEY_ENVS that is set."""
    return next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)


def error_message(response: httpx.Response) -> str:
    """The `error.message` of an OpenAI-style error body, or the status and raw text."""
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:300]}"


def failure_text(e: Exception, url: str, tls_ca: str | None = None) -> str:
    """Why a call failed: the server's message, or what broke on the way (TLS, a drop)."""
    return describe_http_error(e, url, tls_ca) if isinstance(e, httpx.HTTPError) else str(e)


def served_model(http: httpx.Client) -> str:
    """The first model id the server lists."""
    r = http.get("/models")
    if r.status_code != 200:
        raise ServerError(error_message(r))
    try:
        return r.json()["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ServerError(f"/models did not list a model: {r.text[:200]!r}") from None


def stream_chunks(http: httpx.Client, path: str, body: dict[str, Any]) -> Iterator[dict]:
    """POST a streaming request and yield each SSE chunk as a dict, up to [DONE]."""
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            r.read()
            raise ServerError(error_message(r))
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ServerError(chunk["error"].get("message", str(chunk["error"])))
            yield chunk


def chunk_text(chunk: dict) -> str:
    """The text a chat or completion chunk carries ('' for the usage chunk)."""
    if not chunk.get("choices"):
        return ""
    choice = chunk["choices"][0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


@dataclass
class Reply:
    """One assistant turn and how fast it came."""

    text: str
    completion_tokens: int | None
    first_token_seconds: float
    total_seconds: float

    def token_count(self, tokenizer: Any = None) -> int:
        """The server's usage count; else counted with `tokenizer`; else whitespace words."""
        if self.completion_tokens is not None:
            return self.completion_tokens
        if tokenizer is not None:
            return len(tokenizer.encode(self.text).ids)
        return len(self.text.split())

    def rate_line(self, tokenizer: Any = None) -> str:
        """`[N tokens, X tok/s, first token Y s]`, decode rate after the first token."""
        count = self.token_count(tokenizer)
        decode = self.total_seconds - self.first_token_seconds
        rate = (count - 1) / decode if count > 1 and decode > 0 else 0.0
        return f"[{count} tokens, {rate:.1f} tok/s, first token {self.first_token_seconds:.2f}s]"


@dataclass(frozen=True)
class ChatSettings:
    """What every turn sends besides the conversation."""

    model: str | None = None  # None: the first model the server lists
    system: str | None = None
    max_tokens: int | None = None  # None: until the model stops, up to its context
    temperature: float = 0.0  # greedy, so a question gets the same answer every time


class ChatSession:
    """A conversation: history plus the settings sent each turn."""

    def __init__(self, http: httpx.Client, model: str, settings: ChatSettings, out: Console):
        self.http, self.model, self.settings, self.out = http, model, settings, out
        self.history: list[dict[str, str]] = []

    def ask(self, text: str) -> Reply:
        """Send the conversation plus `text`, printing the reply as it streams."""
        s = self.settings
        system = [{"role": "system", "content": s.system}] if s.system else []
        messages = [*system, *self.history, {"role": "user", "content": text}]
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": s.temperature,
            "stream_options": {"include_usage": True},
        }
        if s.max_tokens is not None:  # else the server's default: run to the context
            body["max_tokens"] = s.max_tokens
        start, first, parts, tokens = time.perf_counter(), None, [], None
        for chunk in stream_chunks(self.http, "/chat/completions", body):
            piece = chunk_text(chunk)
            if piece:
                first = first or time.perf_counter()
                parts.append(piece)
                self.out.print(piece, end="", markup=False, highlight=False)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        reply = Reply("".join(parts), tokens, (first or end) - start, end - start)
        # Only a completed turn joins the history, so an error leaves it consistent.
        self.history += [messages[-1], {"role": "assistant", "content": reply.text}]
        return reply

    def turn(self, text: str, tokenizer: Any = None) -> Reply | None:
        """Ask, printing `assistant>`, the streamed reply and its rate line, or the error."""
        self.out.print("[bold cyan]assistant>[/bold cyan] ", end="")
        try:
            reply = self.ask(text)
        except (ServerError, httpx.HTTPError) as e:
            why = failure_text(e, str(self.http.base_url))
            self.out.print(f"\n[red]error:[/red] {escape(why)}")
            return None
        self.out.print(f"\n[dim]{reply.rate_line(tokenizer)}[/dim]")
        return reply


def _load_tokenizer(directory: str | None) -> Any:
    # Only to count tokens when the server sends no usage; templating is the server's job.
    if directory is None:
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shardcompute.client.chat",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--coordinator-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model id (default: the first the server lists)")
    p.add_argument(
        "--api-key",
        default=default_api_key(),
        help=f"API key (default: ${API_KEY_ENVS[0]} or ${API_KEY_ENVS[1]})",
    )
    p.add_argument(
        "--tls-ca",
        default=default_tls_ca(),
        help="verify the server's https:// certificate against this CA file "
        "(default: $SHARDCOMPUTE_SECURITY__TLS_CA)",
    )
    p.add_argument(
        "--tokenizer",
        help="model dir with tokenizer.json, to count tokens locally if the server sends no usage",
    )
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, help=MAX_TOKENS_HELP)
    p.add_argument(
        "--temperature",
        type=float,
        default=ChatSettings.temperature,
        help="0 (the default) is greedy: the same question gets the same answer",
    )
    return p


def run_chat(session: ChatSession, lines: Iterator[str], tokenizer: Any = None) -> None:
    """The read-eval-print loop; errors are printed and the loop goes on."""
    for line in lines:
        text = line.strip()
        if text == "/quit":
            break
        if text == "/reset":
            session.history.clear()
            session.out.print("[dim](history cleared)[/dim]")
        elif text:
            session.turn(text, tokenizer)


def _input_lines(out: Console) -> Iterator[str]:
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            out.print("[bold green]you>[/bold green] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        yield line


def chat(
    url: str,
    api_key: str | None,
    settings: ChatSettings,
    out: Console,
    tokenizer: Any = None,
    tls_ca: str | None = None,
) -> int:
    """Connect, then chat on stdin until /quit or end of input; 1 if the server is unreachable."""
    with api_client(url, api_key, tls_ca=tls_ca) as http:
        try:
            model = settings.model or served_model(http)
        except (ServerError, httpx.HTTPError) as e:
            why = failure_text(e, url, tls_ca)
            out.print(f"[red]error:[/red] cannot reach {url}: {escape(why)}")
            return 1
        out.print(f"[dim]chatting with {model} at {url}; /reset clears history, /quit leaves[/dim]")
        run_chat(ChatSession(http, model, settings, out), _input_lines(out), tokenizer)
    return 0


def chat_main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m shardcompute.client.chat`."""
    args = _parser().parse_args(argv)
    settings = ChatSettings(args.model, args.system, args.max_tokens, args.temperature)
    out = Console(highlight=False, soft_wrap=True)
    try:
        tokenizer = _load_tokenizer(args.tokenizer)
        return chat(args.coordinator_url, args.api_key, settings, out, tokenizer, args.tls_ca)
    except ShardComputeError as e:  # a bad --tls-ca file, or a CA with an http:// URL
        out.print(f"[red]error:[/red] {escape(str(e))}")
        return 2


if __name__ == "__main__":
    sys.exit(chat_main())
