"""`shardcompute up`: a coordinator and N worker agents on 127.0.0.1, as child processes.

Serves until Ctrl-C; with --prompt it answers one question and stops, with --chat it stops
when the chat ends. Each child leads its own process group (agents keep their engines in
theirs), so stopping a group stops everything under it and no process is left behind.

A coordinator that dies is started again on the same port with the same cluster token; the
agents keep their engines and register again, and it adopts their group, so the cluster
serves again without reloading weights. With --tls (or explicit files) every hop is HTTPS.
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
from pathlib import Path
from typing import NoReturn

import httpx
from rich.console import Console
from rich.markup import escape

from shardcompute.certs import HostSpec, check_server_files, make_cluster_certs
from shardcompute.client.chat import (
    MAX_TOKENS_HELP,
    ChatSession,
    ChatSettings,
    ServerError,
    api_client,
    chat,
    default_api_key,
    failure_text,
    served_model,
)
from shardcompute.config import ClusterConfig, load_config
from shardcompute.coordinator.children import Child, CoordinatorKeeper, spawn
from shardcompute.errors import ShardComputeError
from shardcompute.http_client import client_ssl_context, http_client
from shardcompute.protocol import CLUSTER_TOKEN_ENV
from shardcompute.worker.agent import ENGINE_COMMAND_ENV

console = Console(highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Tls:
    """The coordinator's certificate and key, and the CA every client verifies it with."""

    cert: str
    key: str
    ca: str


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
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a throwaway CA and certificate made in the log dir",
    )
    p.add_argument("--tls-cert", help="serve HTTPS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", help="the certificate's private key")
    p.add_argument("--tls-ca", help="the CA that workers and the client verify it against")
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


def _commands(args: argparse.Namespace, url: str, tls: Tls | None) -> list[tuple[str, list[str]]]:
    py, config = sys.executable, (["--config", args.config] if args.config else [])
    base = free_port_block(args.workers)
    serve_tls = ["--tls-cert", tls.cert, "--tls-key", tls.key] if tls else []
    verify_tls = ["--tls-ca", tls.ca] if tls else []
    coordinator = [
        py, "-m", "shardcompute.coordinator", "--host", "127.0.0.1", "--port", str(args.port),
        "--world-size", str(args.workers), "--set", f"worker.collective_port_base={base}",
        *_model_flags(args.model), *config, *serve_tls,
    ]  # fmt: skip
    workers = [
        (f"worker {r}", [py, "-m", "shardcompute.worker.agent", "--coordinator-url", url,
                         "--rank", str(r), *config, *verify_tls])
        for r in range(args.workers)
    ]  # fmt: skip
    return [("coordinator", coordinator), *workers]


def start_children(
    args: argparse.Namespace, url: str, log_dir: Path, tls: Tls | None = None
) -> list[Child]:
    """Start the coordinator and the agents, sharing a fresh cluster token."""
    env = {**os.environ, CLUSTER_TOKEN_ENV: secrets.token_urlsafe(24)}
    if args.engine_command:
        env[ENGINE_COMMAND_ENV] = args.engine_command
    return [
        spawn(name, cmd, env, log_dir / (name.replace(" ", "") + ".log"))
        for name, cmd in _commands(args, url, tls)
    ]


def _check_alive(children: list[Child], keeper: CoordinatorKeeper) -> None:
    """Raise if an agent exited, or the coordinator died past the keeper's patience."""
    keeper.check()
    for child in children:
        code = child.proc.poll()
        if code is not None and child is not keeper.child:
            raise ShardComputeError(
                f"{child.name} exited with code {code}; last lines of {child.log}:\n" + child.tail()
            )


def wait_ready(
    url: str,
    children: list[Child],
    timeout: float,
    keeper: CoordinatorKeeper,
    tls_ca: str | None = None,
) -> dict:
    """Poll /ready until it answers 200; fail early if an agent exits or the engines keep
    crashing (the coordinator gave up restarting them)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    with http_client(url, ca_file=tls_ca, timeout=2.0) as http:
        while time.monotonic() < deadline:
            _check_alive(children, keeper)
            try:
                r = http.get("/ready")
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


def _serve(children: list[Child], keeper: CoordinatorKeeper) -> NoReturn:
    """Serve until Ctrl-C (KeyboardInterrupt) or until an agent dies (ShardComputeError)."""
    while True:
        _check_alive(children, keeper)
        time.sleep(0.5)


def _talk(args: argparse.Namespace, url: str, config: ClusterConfig, tls: Tls | None) -> int:
    """--chat: the chat client on stdin. --prompt: one streamed answer; 1 if it failed."""
    settings = ChatSettings(max_tokens=args.max_tokens, temperature=args.temperature)
    # The key a --config may require; else the chat client's usual env vars.
    api_key = config.security.api_key or default_api_key()
    ca = tls.ca if tls else None
    if args.chat:
        return chat(url, api_key, settings, console, tls_ca=ca)
    with api_client(url, api_key, tls_ca=ca) as http:
        try:
            session = ChatSession(http, served_model(http), settings, console)
        except (ServerError, httpx.HTTPError) as e:
            why = failure_text(e, url, ca)
            raise ShardComputeError(f"cannot reach the cluster's API at {url}/v1: {why}") from None
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


def _tls(args: argparse.Namespace, config: ClusterConfig, log_dir: Path) -> Tls | None:
    """The TLS files: given (flags, else the config's security.tls_*), or with --tls made
    fresh in the log dir; None for plain HTTP."""
    sec = config.security
    given = [args.tls_cert or sec.tls_cert, args.tls_key or sec.tls_key, args.tls_ca or sec.tls_ca]
    if given[0] or given[1] or args.tls_ca:
        if not all(given):
            raise ShardComputeError(
                "--tls-cert, --tls-key and --tls-ca go together (--tls alone makes throwaway ones)"
            )
        check_server_files(given[0], given[1])
        client_ssl_context(given[2])
        return Tls(*(str(Path(f).expanduser().resolve()) for f in given))
    if not args.tls:
        return None
    host = HostSpec("coordinator", ("127.0.0.1", "localhost"))
    files = make_cluster_certs(log_dir / "tls", [host], days=30)[0]
    return Tls(str(files.cert), str(files.key), str(files.ca))


def up_main(argv: list[str] | None = None) -> int:
    """Entry point of `shardcompute up`: start, wait for ready, then serve, answer or chat."""
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        config = load_config(args.config)
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="shardcompute-up-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        tls = _tls(args, config, log_dir)
    except ShardComputeError as e:
        console.print(f"error: {escape(str(e))}")
        return 2
    # Started in the background by a script, we may inherit SIGINT ignored; take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return _run(args, config, log_dir, tls)


def _run(args: argparse.Namespace, config: ClusterConfig, log_dir: Path, tls: Tls | None) -> int:
    """Start the cluster and keep its coordinator up; serve, answer or chat; then stop all."""
    url = f"{'https' if tls else 'http'}://127.0.0.1:{args.port}"
    children: list[Child] = []
    keeper = None
    try:
        children = start_children(args, url, log_dir, tls)
        keeper = CoordinatorKeeper(children[0], lambda m: console.print(f"[yellow]{escape(m)}"))
        keeper.start()
        console.print(
            f"ShardCompute coordinator at {url} with {args.workers} workers "
            f"(logs in {log_dir}); loading {args.model}..."
        )
        state = wait_ready(url, children, args.ready_timeout, keeper, tls.ca if tls else None)
        talk = args.prompt is not None or args.chat
        hint = "" if talk else " Ctrl-C stops the cluster."
        console.print(f"ready: {url}/v1 serves {args.model!r} ({state['reason']}).{hint}")
        console.print(f"dashboard: {url}/")
        if talk:
            return _talk(args, url, config, tls)
        _serve(children, keeper)
    except KeyboardInterrupt:
        return 0
    except ShardComputeError as e:
        console.print(f"error: {escape(str(e))}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        console.print("stopping...")
        if keeper is not None:
            keeper.stop()  # first, so that no coordinator is started while stopping
        stop_children(children)


if __name__ == "__main__":
    sys.exit(up_main())
