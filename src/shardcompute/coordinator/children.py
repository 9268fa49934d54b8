"""The child processes `shardcompute up` starts, and the keeper that starts a dead coordinator
again: the same command, so the same port, config and cluster token."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from shardcompute.errors import ShardComputeError
from shardcompute.worker.agent import die_with_parent


@dataclass
class Child:
    """A started child process, its name, its log file and how to start it again."""

    name: str
    proc: subprocess.Popen
    log: Path
    cmd: list[str]
    env: dict[str, str]

    def tail(self, lines: int = 15) -> str:
        """The last lines of its log."""
        return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])


def spawn(name: str, cmd: list[str], env: dict[str, str], log: Path) -> Child:
    """Start `cmd` leading its own process group, output to `log`."""
    return Child(name, _popen(cmd, env, log, append=False), log, cmd, env)


def _popen(cmd: list[str], env: dict[str, str], log: Path, append: bool) -> subprocess.Popen:
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # SIGTERM (an orderly stop) if `up` itself is killed and cannot clean up. Linux
            # sends it when the forking *thread* ends: the keeper's thread outlives its child.
            preexec_fn=partial(die_with_parent, signal.SIGTERM),
        )


class CoordinatorKeeper:
    """Watches the coordinator child and starts it again whenever it dies.

    Agents keep their engines and register again, and the new coordinator adopts their group,
    so nothing reloads. A coordinator that exits with an error `max_failed_starts` times in a
    row, each within `min_uptime_seconds` of starting, cannot start (a bad config, a port
    taken): the keeper gives up and `check` says why. One killed by a signal, or one that ran
    a while, is always started again.
    """

    def __init__(
        self,
        child: Child,
        say: Callable[[str], None],
        max_failed_starts: int = 3,
        min_uptime_seconds: float = 30.0,
    ):
        self.child = child
        self.restarts = 0
        self.failure: str | None = None
        self._say = say
        self._max_failed_starts, self._min_uptime = max_failed_starts, min_uptime_seconds
        self._failed_starts = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator-keeper", daemon=True)

    def start(self) -> None:
        """Watch from a thread of its own."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (before the children are stopped, so none is started again)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def check(self) -> None:
        """Raise ShardComputeError if the keeper gave up."""
        if self.failure is not None:
            raise ShardComputeError(self.failure)

    def poll_once(self) -> None:
        """Start the coordinator again if it died, unless it keeps dying."""
        code = self.child.proc.poll()
        if code is None:
            return
        failed_start = code > 0 and time.monotonic() - self._started < self._min_uptime
        self._failed_starts = self._failed_starts + 1 if failed_start else 0
        if self._failed_starts >= self._max_failed_starts:
            self.failure = (
                f"the coordinator failed to start {self._failed_starts} times in a row (exit "
                f"code {code}); last lines of {self.child.log}:\n{self.child.tail()}"
            )
            self._stop.set()
            return
        self._say(f"the coordinator exited with code {code}; starting it again on the same port")
        c = self.child  # replaced in place: whoever stops the children stops the new one
        c.proc = _popen(c.cmd, c.env, c.log, append=True)
        self._started = time.monotonic()
        self.restarts += 1

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.poll_once()
