"""Start N rank processes on this machine and supervise them.

Writes a ring hostfile on 127.0.0.1 and sets MLX_RANK / MLX_HOSTFILE per child, so no
hand-written launcher is needed. Never trusts a collective to return: if any rank dies, or
the deadline passes, every rank is killed and the failing rank's stderr is reported.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shardcompute.errors import CollectiveError

FOLLOWER_GRACE = 15.0  # seconds a follower may outlive a successful rank 0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free right now (bound then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def write_hostfile(path: Path, hosts: Sequence[str]) -> Path:
    """MLX ring hostfile: one list of "ip:port" per rank."""
    path.write_text(json.dumps([[h] for h in hosts]))
    return path


def rank_env(rank: int, world_size: int, hostfile: Path, threads: int | None = None) -> dict:
    """Environment of one rank: its identity and a share of the cores (no oversubscription)."""
    env = dict(os.environ)
    threads = threads or max(1, (os.cpu_count() or 1) // world_size)
    env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile), MLX_WORLD_SIZE=str(world_size))
    env.setdefault("OPENBLAS_NUM_THREADS", str(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


@dataclass
class RankFailure:
    rank: int
    returncode: int | None
    stderr_tail: str


def launch_local(
    argv: Sequence[str],
    world_size: int,
    timeout: float | None = None,
    quiet_followers: bool = True,
) -> int:
    """Run `python argv...` as `world_size` ranks on 127.0.0.1; return rank 0's exit code.

    Rank 0's stdout goes to ours. Raises CollectiveError naming the rank that failed.
    """
    with tempfile.TemporaryDirectory(prefix="shardcompute-") as tmp:
        hostfile = write_hostfile(
            Path(tmp) / "hosts.json", [f"127.0.0.1:{p}" for p in free_ports(world_size)]
        )
        procs, logs = [], []
        try:
            for rank in range(world_size):
                log = open(Path(tmp) / f"rank-{rank}.err", "w+")
                logs.append(log)
                out = None if rank == 0 or not quiet_followers else subprocess.DEVNULL
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv],
                        env=rank_env(rank, world_size, hostfile),
                        stdout=out,
                        stderr=log,
                        start_new_session=True,
                    )
                )
            failure = supervise(procs, logs, timeout)
        finally:
            stop_all(procs)
            for log in logs:
                log.close()
    if failure is not None:
        raise CollectiveError(_describe(failure, world_size))
    return 0


def supervise(procs, logs, timeout: float | None) -> RankFailure | None:
    """Wait for all ranks; the first to fail (or the deadline) ends the run."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        codes = [p.poll() for p in procs]
        for rank, code in enumerate(codes):
            if code not in (None, 0):
                return RankFailure(rank, code, _tail(logs[rank]))
        if all(c == 0 for c in codes):
            return None
        if codes[0] == 0:  # rank 0 is done: followers get a grace period, then a kill
            deadline = min(deadline or float("inf"), time.monotonic() + FOLLOWER_GRACE)
        if deadline and time.monotonic() > deadline:
            rank = next(r for r, c in enumerate(codes) if c is None)
            return RankFailure(rank, None, _tail(logs[rank]))
        time.sleep(0.05)


def stop_all(procs, grace: float = 3.0) -> None:
    """SIGTERM every live rank's process group, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        live = [p for p in procs if p.poll() is None]
        for p in live:
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + grace
        while any(p.poll() is None for p in live) and time.monotonic() < end:
            time.sleep(0.05)


def _tail(log, limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-limit:]


def _describe(f: RankFailure, world_size: int) -> str:
    what = "timed out" if f.returncode is None else f"exited with code {f.returncode}"
    # A ShardComputeError's message is the last line the rank printed; show it first.
    lines = [ln for ln in f.stderr_tail.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else "(no output)"
    return f"rank {f.rank} of {world_size} {what}: {last}"
