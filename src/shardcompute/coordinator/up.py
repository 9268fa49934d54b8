"""`shardcompute up`: a coordinator and N worker agents on 127.0.0.1, as child processes.

Serves until Ctrl-C; with --prompt it answers one question and stops, with --chat it stops
when the chat ends. Each child leads its own process group (agents keep their engines in
theirs), so stopping a group stops everything under it and no process is left behind.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

import httpx
from rich.console import Console
from rich.markup import escape

from shardcompute.client.chat import (
    MAX_TOKENS_HELP,
    ChatSession,
    ChatSettings,
    ServerError,
    api_client,
    chat,
    default_api_key,
    served_model,
)
from shardcompute.config import load_config
from shardcompute.errors import ShardComputeError
from shardcompute.protocol import CLUSTER_TOKEN_ENV
from shardcompute.worker.agent import ENGINE_COMMAND_ENV, die_with_parent

console = Console(highlight=False, soft_wrap=True)


@dataclass
class Child:
    """A started child process, its name and its log file."""

    name: str
    proc: subprocess.Popen
    log: Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardcompute up", description="Start a local cluster: a coordinator and N workers."
    )
    p.add_argument("--workers", type=int, default=2, help="number of workers (= world size)")
    p.add_argument("--model", default="smollm2-135m", help="model name or path")
    p.add_argument("--port", type=int, default=8000, help="coordinator port")
    p.add_argument("--config", help="cluster config YAML for the coordinator and workers")
    p.add_argument(
        "--engine-command",
        help=f"engine to run instead of the real one (also ${ENGINE_COMMAND_ENV})",
    )
    p.add_argument(
        "--ready-timeout", type=float, default=600.0, help="seconds to wait for every rank to load"
    )
    p.add_argument("--log-dir", help="where child logs go (default: a new temp dir)")
    then = p.add_mutually_exclusive_group()
    then.add_argument("--prompt", help="once ready, stream the answer to this, then stop")
    then.add_argument("--chat", action="store_true", help="once ready, chat; stop on /quit")
    p.add_argument("--max-tokens", type=int, help=MAX_TOKENS_HELP)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    return p


def free_port_block(count: int, start: int = 29500, end: int = 60000) -> int:
    """The first port p such that p .. p+count-1 can all be bound on 127.0.0.1."""
    for base in range(start, end, count):
        if all(_can_bind(base + i) for i in range(count)):
            return base
    raise ShardComputeError(f"no block of {count} free ports between {start} and {end}")


def _can_bind(port: int, reuse_address: bool = False) -> bool:
    # With reuse_address, as uvicorn binds: a port whose last server just exited is free.
    with socket.socket() as s:
        try:
            if reuse_address:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _model_flags(model: str) -> list[str]:
    # A path serves under its file or directory name; a short name serves under itself.
    path = Path(model)
    if path.exists():
        return ["--model", path.stem, "--set", f"model.path={path.resolve()}"]
    return ["--model", model]


def _commands(args: argparse.Namespace, url: str) -> list[tuple[str, list[str]]]:
    py, config = sys.executable, (["--config", args.config] if args.config else [])
    base = free_port_block(args.workers)
    coordinator = [
        py, "-m", "shardcompute.coordinator", "--host", "127.0.0.1", "--port", str(args.port),
        "--world-size", str(args.workers), "--set", f"worker.collective_port_base={base}",
        *_model_flags(args.model), *config,
    ]  # fmt: skip
    workers = [
        (f"worker {r}", [py, "-m", "shardcompute.worker.agent", "--coordinator-url", url,
                         "--rank", str(r), *config])
        for r in range(args.workers)
    ]  # fmt: skip
    return [("coordinator", coordinator), *workers]


def start_children(args: argparse.Namespace, url: str, log_dir: Path) -> list[Child]:
    """Start the coordinator and the agents, sharing a fresh cluster token."""
    env = {**os.environ, CLUSTER_TOKEN_ENV: secrets.token_urlsafe(24)}
    if args.engine_command:
        env[ENGINE_COMMAND_ENV] = args.engine_command
    children = []
    for name, cmd in _commands(args, url):
        log = log_dir / (name.replace(" ", "") + ".log")
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # SIGTERM (an orderly stop) if `up` itself is killed and cannot clean up.
                preexec_fn=partial(die_with_parent, signal.SIGTERM),
            )
        children.append(Child(name, proc, log))
    return children


def _check_alive(children: list[Child]) -> None:
    for child in children:
        code = child.proc.poll()
        if code is not None:
            tail = child.log.read_text(errors="replace").strip().splitlines()[-15:]
            raise ShardComputeError(
                f"{child.name} exited with code {code}; last lines of {child.log}:\n"
                + "\n".join(tail)
            )


def wait_ready(url: str, children: list[Child], timeout: float) -> dict:
    """Poll /ready until it answers 200; fail early if a child exits or the engines keep
    crashing (the coordinator gave up restarting them)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        _check_alive(children)
        try:
            r = httpx.get(f"{url}/ready", timeout=2.0)
            last = r.json()
            if r.status_code == 200:
                return last
        except (httpx.HTTPError, ValueError):
            pass
        if "gave up" in last.get("reason", ""):
            raise ShardComputeError(
                f"the cluster cannot start: {last['reason']}{_errors(children)}"
            )
        time.sleep(0.25)
    raise ShardComputeError(f"the cluster was not ready after {timeout:.0f}s: {last}")


def _errors(children: list[Child]) -> str:
    """The last error line of each child's log, to say why without opening the logs."""
    found = []
    for child in children:
        lines = child.log.read_text(errors="replace").splitlines()
        last = next((x for x in reversed(lines) if "Error" in x or "error:" in x), None)
        if last:
            found.append(f"\n  {child.name} ({child.log}): {last.strip()}")
    return "".join(found)


def stop_children(children: list[Child], grace_seconds: float = 5.0) -> None:
    """SIGTERM every child's process group, then SIGKILL whatever is left."""
    for child in children:
        _signal_group(child.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for child in children:
        try:
            child.proc.wait(max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    # Also reaches an engine whose agent already exited: it stays in the agent's group.
    for child in children:
        _signal_group(child.proc.pid, signal.SIGKILL)
        child.proc.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _on_sigterm(*_: object) -> None:
    raise KeyboardInterrupt


def _serve(children: list[Child]) -> NoReturn:
    """Serve until Ctrl-C (KeyboardInterrupt) or until a child dies (ShardComputeError)."""
    while True:
        _check_alive(children)
        time.sleep(0.5)


def _talk(args: argparse.Namespace, url: str) -> int:
    """--chat: the chat client on stdin. --prompt: one streamed answer; 1 if it failed."""
    settings = ChatSettings(max_tokens=args.max_tokens, temperature=args.temperature)
    # The key a --config may require; else the chat client's usual env vars.
    api_key = load_config(args.config).security.api_key or default_api_key()
    if args.chat:
        return chat(url, api_key, settings, console)
    with api_client(url, api_key) as http:
        try:
            session = ChatSession(http, served_model(http), settings, console)
        except (ServerError, httpx.HTTPError) as e:
            raise ShardComputeError(f"cannot reach the cluster's API at {url}/v1: {e}") from None
        console.print(f"[bold green]you>[/bold green] {escape(args.prompt)}")
        return 0 if session.turn(args.prompt) else 1


def _check_args(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ShardComputeError(f"--workers must be at least 1, got {args.workers}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise ShardComputeError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    # Else /ready of whatever holds the port could answer for a cluster that never started.
    if not _can_bind(args.port, reuse_address=True):
        raise ShardComputeError(f"port {args.port} on 127.0.0.1 is in use; pick one with --port")


def up_main(argv: list[str] | None = None) -> int:
    """Entry point of `shardcompute up`: start, wait for ready, then serve, answer or chat."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
    except ShardComputeError as e:
        console.print(f"error: {escape(str(e))}")
        return 2
    # Started in the background by a script, we may inherit SIGINT ignored; take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    url = f"http://127.0.0.1:{args.port}"
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="shardcompute-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    try:
        children = start_children(args, url, log_dir)
        console.print(
            f"ShardCompute coordinator at {url} with {args.workers} workers "
            f"(logs in {log_dir}); loading {args.model}..."
        )
        state = wait_ready(url, children, args.ready_timeout)
        talk = args.prompt is not None or args.chat
        hint = "" if talk else " Ctrl-C stops the cluster."
        console.print(f"ready: {url}/v1 serves {args.model!r} ({state['reason']}).{hint}")
        console.print(f"dashboard: {url}/")
        if talk:
            return _talk(args, url)
        _serve(children)
    except KeyboardInterrupt:
        return 0
    except ShardComputeError as e:
        console.print(f"error: {escape(str(e))}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        console.print("stopping...")
        stop_children(children)


if __name__ == "__main__":
    sys.exit(up_main())
