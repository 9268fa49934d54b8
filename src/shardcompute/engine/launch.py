"""Start N rank processes on this machine and supervise them.

Two ways to form the group:
- ring: writes a ring hostfile on 127.0.0.1 and sets MLX_RANK / MLX_HOSTFILE per child.
- mpi: one `mpirun` starts the ranks, each bound to its own core(s). Open MPI's shared-memory
  transport all-reduces a decode activation in ~10 us on loopback, where the ring's TCP
  sockets take hundreds of microseconds or more on a loaded machine. `auto` picks mpi when
  Open MPI is installed.
Never trusts a collective to return: if any rank dies, or the deadline passes, every rank is
killed and the failing rank's stderr is reported.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from shardcompute._blas import blas_threads
from shardcompute.errors import CollectiveError
from shardcompute.runtime import with_huge_pages

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


def rank_env(
    world_size: int,
    rank: int | None = None,
    hostfile: Path | None = None,
    base: Mapping[str, str] | None = None,
) -> dict:
    """Environment of a local rank (from `base`, default ours): for the ring, its rank and the
    hostfile; under mpirun, which sets the rank itself, neither. Every rank of the group runs on
    this host, which sizes each one's BLAS threads (see `_blas`). Its heap asks for huge pages
    (`runtime.with_huge_pages`)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(MLX_WORLD_SIZE=str(world_size), SHARDCOMPUTE_LOCAL_RANKS=str(world_size))
    if rank is not None:
        env.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(hostfile))
    return with_huge_pages(env)


def mpi_available() -> bool:
    """Open MPI's launcher and the library MLX's mpi backend loads are both present."""
    return shutil.which("mpirun") is not None and ctypes.util.find_library("mpi") is not None


def resolve_backend(backend: str) -> str:
    """`auto` -> mpi where Open MPI is installed, else ring; anything else as given."""
    if backend != "auto":
        return backend
    return "mpi" if mpi_available() else "ring"


def mpirun_command(argv: Sequence[str], world_size: int) -> list[str]:
    cores = os.cpu_count() or 1
    cmd = ["mpirun", "-np", str(world_size)]
    if world_size <= cores:
        cmd += ["--bind-to", "core", "--map-by", f"slot:PE={blas_threads(world_size)}"]
    else:  # more ranks than cores: no binding, and waiting ranks yield the core
        cmd += ["--oversubscribe", "--bind-to", "none", "--mca", "mpi_yield_when_idle", "1"]
    return [*cmd, sys.executable, *argv]


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
    backend: str = "ring",
    env: Mapping[str, str] | None = None,
) -> int:
    """Run `python argv...` as `world_size` ranks on 127.0.0.1; return rank 0's exit code.

    Rank 0's stdout goes to ours. Raises CollectiveError naming the rank that failed. The
    program must form its group with the same `backend` (ring or mpi). `env` is the ranks'
    environment (default ours), e.g. with the dtype policy's TF32 switch (`dtypes.policy_env`).
    """
    if backend == "mpi":
        return _launch_mpirun(argv, world_size, timeout, env)
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
                        env=rank_env(world_size, rank, hostfile, env),
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
        raise CollectiveError(_describe(failure, f"rank {failure.rank} of {world_size}"))
    return 0


def _launch_mpirun(
    argv: Sequence[str], world_size: int, timeout: float | None, base: Mapping | None
) -> int:
    """One mpirun runs every rank; it ends them all if one fails. Followers print nothing."""
    env = rank_env(world_size, base=base)
    if os.geteuid() == 0:  # containers run as root; Open MPI refuses that unless told
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            mpirun_command(argv, world_size), env=env, stderr=log, start_new_session=True
        )
        try:
            failure = supervise([proc], [log], timeout)
        finally:
            stop_all([proc])
    if failure is not None:
        raise CollectiveError(_describe(failure, f"mpirun of {world_size} ranks"))
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


def _describe(f: RankFailure, who: str) -> str:
    what = "timed out" if f.returncode is None else f"exited with code {f.returncode}"
    # A rank's ShardComputeError is its "error: ..." line (mpirun adds its own lines after).
    lines = [ln for ln in f.stderr_tail.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    last = (errors or lines or ["(no output)"])[-1]
    return f"{who} {what}: {last}"
