"""Real child processes for integration tests: each leads its own process group and writes a
log file, every wait is bounded, and stop() kills whole groups."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import shardcompute

SRC_DIR = Path(shardcompute.__file__).resolve().parents[1]
RUN_ENV = "SHARDCOMPUTE_TEST_RUN"  # set in every process a Processes starts, at any depth


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, poll: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def child_env(**extra: str) -> dict[str, str]:
    """os.environ, with this checkout's src on PYTHONPATH so children import the same package."""
    path = os.pathsep.join(p for p in (str(SRC_DIR), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _live_pids() -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(stat.parent.name))
        except OSError:
            pass
    return pids


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for child in _live_pids():
        try:
            parent = int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def pids_with_env(name: str, value: str) -> set[int]:
    """Live processes whose environment has name=value: everything a test started, at any
    depth, even after its parent is gone."""
    needle = f"{name}={value}".encode()
    found = set()
    for pid in _live_pids():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            pass
    return found


REPLY = re.compile(r"assistant> (.*?)\n\[\d+ tokens, [\d.]+ tok/s", re.DOTALL)


def chat_replies(output: str) -> list[str]:
    """The assistant's replies in the chat client's output (as `up --prompt` prints it too)."""
    return REPLY.findall(output)


class Processes:
    """Processes started by a test, logs in `log_dir`; stop() kills each one's process group."""

    def __init__(self, log_dir: Path, env: dict[str, str] | None = None):
        self.log_dir = log_dir
        self.run_id = secrets.token_hex(8)
        self.env = {**(env if env is not None else child_env()), RUN_ENV: self.run_id}
        self.procs: dict[str, subprocess.Popen] = {}
        self._ran: set[str] = set()  # names started by run(), whose exit is expected

    def spawn(
        self, name: str, cmd: list[str], env: dict | None = None, stdin=subprocess.DEVNULL, **kw
    ) -> subprocess.Popen:
        """Start `cmd` in a new session, stdout and stderr to `<name>.log`."""
        with open(self.log_dir / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or self.env,
                stdin=stdin,
                start_new_session=True,
                **kw,
            )
        self.procs[name] = proc
        return proc

    def run(self, name: str, cmd: list[str], timeout: float, input: str = "", **kw) -> str:
        """Run `cmd` to its end with `input` on stdin; its output, or AssertionError."""
        self._ran.add(name)
        proc = self.spawn(name, cmd, stdin=subprocess.PIPE, **kw)
        try:
            proc.communicate(input.encode(), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} ran past {timeout}s; logs:\n{self.logs()}") from None
        output = self.log(name)
        assert proc.returncode == 0, f"{name} exited with {proc.returncode}:\n{self.logs()}"
        return output

    def wait(self, predicate: Callable[[], object], timeout: float, what: str):
        """wait_for, failing early when a spawned process exits, and with every log."""

        def check():
            for name, proc in self.procs.items():
                if name not in self._ran and proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}")
            return predicate()

        try:
            return wait_for(check, timeout, what, poll=0.25)
        except AssertionError as e:
            raise AssertionError(f"{e}; logs:\n{self.logs()}") from None

    def leftovers(self) -> set[int]:
        """Live processes started from ours (with our env), even those whose parent is gone."""
        return pids_with_env(RUN_ENV, self.run_id)

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(self.log_dir.glob("*.log"))
        )

    def stop(self, grace_seconds: float = 5.0) -> None:
        """SIGTERM every group, wait up to `grace_seconds` in all, then SIGKILL what is left."""
        for proc in self.procs.values():
            kill_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                pass
        # Also reaches what a leader left in its group: an engine whose agent already exited.
        for proc in self.procs.values():
            kill_group(proc, signal.SIGKILL)
            proc.wait(5)
