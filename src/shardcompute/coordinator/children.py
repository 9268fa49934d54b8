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
    so nothing reloads. A coordinator that dies `max_deaths` times within `window_seconds`
    cannot start (a bad config, a port taken): the keeper gives up and `check` says why.
    """

    def __init__(
        self,
        child: Child,
        say: Callable[[str], None],
        max_deaths: int = 5,
        window_seconds: float = 60.0,
    ):
        self.child = child
        self.restarts = 0
        self.failure: str | None = None
        self._say = say
        self._max_deaths, self._window = max_deaths, window_seconds
        self._deaths: list[float] = []
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
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < self._window] + [now]
        if len(self._deaths) >= self._max_deaths:
            self.failure = (
                f"the coordinator exited {len(self._deaths)} times within {self._window:.0f}s "
                f"(last exit code {code}); last lines of {self.child.log}:\n{self.child.tail()}"
            )
            self._stop.set()
            return
        self._say(f"the coordinator exited with code {code}; starting it again on the same port")
        c = self.child  # replaced in place: whoever stops the children stops the new one
        c.proc = _popen(c.cmd, c.env, c.log, append=True)
        self.restarts += 1

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.poll_once()
