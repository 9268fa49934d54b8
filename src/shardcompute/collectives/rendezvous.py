"""Meet before the ring forms, so the ring forms at once and the weights load meanwhile.

MLX's ring backend (`mx.distributed.init`) has rank 0 accept and the last rank connect. If the
last rank asks before rank 0 listens, it sleeps 1 s (then 2, 4, 8) before asking again, and it
holds the GIL while it waits, so nothing else in that process runs. A restarted group lost
about a second that way on most restarts.

So a ring engine loads first and forms the group after. Rank 0 opens a listener on its own
ring address as soon as it starts (`open`); each other rank, once loaded, connects and says
hello (`meet`). When rank 0 has loaded too and heard every rank, it answers each with the
same hello, closes the listener and calls init; they call init on the answer, the last rank a
moment later, so that rank 0 is listening again by then. Every wait here is a socket wait,
which releases the GIL, and every wait is bounded.

The hello names the generation and world size: a stale engine of an earlier generation, or
anything else that connects, is turned away instead of joining the group. No MLX here.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass

from shardcompute.errors import CollectiveError

VERSION = 1
# How long a rank waits for the others to load and arrive. Generous: a large shard can take
# minutes to read; an engine left waiting for a rank that died is replaced by its agent.
MEET_SECONDS = 900.0
HELLO_SECONDS = 5.0  # for a connection to say who it is
RETRY_SECONDS = 0.02  # between a rank's attempts to reach rank 0's listener
# The last rank's pause after rank 0's answer: rank 0 closes its listener and MLX's opens in
# about a millisecond; if it is not up in time, MLX's own retry (1 s later) still connects.
LAST_RANK_PAUSE = 0.05


@dataclass(frozen=True)
class Hello:
    """Who is at the door: a rank of one generation of a group of `world_size`."""

    generation: int
    rank: int
    world_size: int

    MAGIC = b"SCRV"
    WIRE = struct.Struct("!4sHQII")  # magic, version, generation, rank, world size

    def pack(self) -> bytes:
        return self.WIRE.pack(self.MAGIC, VERSION, self.generation, self.rank, self.world_size)

    @classmethod
    def unpack(cls, data: bytes) -> Hello:
        """The hello in `data`; CollectiveError if it is not one of ours, of this version."""
        if len(data) != cls.WIRE.size:
            raise CollectiveError(
                f"rendezvous: {len(data)} bytes, not a {cls.WIRE.size}-byte hello"
            )
        magic, version, generation, rank, world_size = cls.WIRE.unpack(data)
        if magic != cls.MAGIC or version != VERSION:
            raise CollectiveError(
                f"rendezvous: not a version {VERSION} hello ({magic!r} v{version})"
            )
        return cls(generation, rank, world_size)


def parse_address(entry: str) -> tuple[str, int]:
    """("host", port) of a hostfile entry "host:port"."""
    host, _, port = entry.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CollectiveError(f"rendezvous: hostfile entry {entry!r} is not host:port")
    return host.strip("[]"), int(port)


class Rendezvous:
    """One rank's side of the meeting; `open` at start, `meet` once loaded."""

    def __init__(
        self, hostfile: list[str], rank: int, generation: int, timeout: float = MEET_SECONDS
    ):
        self.me = Hello(generation, rank, len(hostfile))
        self.address = parse_address(hostfile[0])  # rank 0's ring endpoint
        self.timeout = timeout
        self._listener: socket.socket | None = None

    def open(self) -> None:
        """Rank 0: listen now, so ranks that load sooner wait in the backlog. Others: nothing."""
        if self.me.rank != 0:
            return
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(self.address)
        except OSError as e:
            listener.close()
            raise CollectiveError(f"rendezvous: cannot listen on {self._where()}: {e}") from e
        listener.listen(self.me.world_size)
        self._listener = listener

    def meet(self) -> None:
        """Return once every rank has called `meet`; then this rank may init the ring."""
        deadline = time.monotonic() + self.timeout
        if self.me.rank == 0:
            self._gather(deadline)
        else:
            self._join(deadline)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # --- rank 0 -------------------------------------------------------------------------

    def _gather(self, deadline: float) -> None:
        if self._listener is None:
            self.open()
        peers: dict[int, socket.socket] = {}
        try:
            while len(peers) < self.me.world_size - 1:
                conn = self._accept(deadline)
                hello = self._greeting(conn)
                if hello is None:
                    conn.close()
                    continue
                with contextlib.suppress(KeyError):
                    peers.pop(hello.rank).close()  # the same rank again: the newer one counts
                peers[hello.rank] = conn
            for conn in peers.values():
                conn.sendall(self.me.pack())
        except OSError as e:
            raise CollectiveError(f"rendezvous on {self._where()}: {e}") from e
        finally:
            for conn in peers.values():
                conn.close()
            self.close()

    def _accept(self, deadline: float) -> socket.socket:
        while (left := deadline - time.monotonic()) > 0:
            self._listener.settimeout(left)
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(HELLO_SECONDS)
            return conn
        raise CollectiveError(
            f"rendezvous: not every one of {self.me.world_size} ranks reached "
            f"{self._where()} within {self.timeout:.0f} s"
        )

    def _greeting(self, conn: socket.socket) -> Hello | None:
        """The peer's hello if it is a rank of this generation's group; None otherwise."""
        try:
            hello = Hello.unpack(_read(conn, Hello.WIRE.size))
        except (OSError, CollectiveError):
            return None
        me = self.me
        ok = (hello.generation, hello.world_size) == (me.generation, me.world_size)
        return hello if ok and 0 < hello.rank < me.world_size else None

    # --- every other rank ---------------------------------------------------------------

    def _join(self, deadline: float) -> None:
        conn = self._connect(deadline)
        try:
            conn.sendall(self.me.pack())
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            answer = Hello.unpack(_read(conn, Hello.WIRE.size))
        except (OSError, CollectiveError) as e:
            raise CollectiveError(f"rendezvous with rank 0 at {self._where()}: {e}") from e
        finally:
            conn.close()
        if (answer.generation, answer.rank) != (self.me.generation, 0):
            raise CollectiveError(f"rendezvous: {self._where()} answered as {answer}")
        if self.me.rank == self.me.world_size - 1:
            time.sleep(LAST_RANK_PAUSE)

    def _connect(self, deadline: float) -> socket.socket:
        while True:
            try:
                return socket.create_connection(self.address, timeout=HELLO_SECONDS)
            except OSError as e:
                if time.monotonic() + RETRY_SECONDS > deadline:
                    raise CollectiveError(
                        f"rendezvous: rank 0 at {self._where()} did not answer within "
                        f"{self.timeout:.0f} s: {e}"
                    ) from e
                time.sleep(RETRY_SECONDS)

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


def _read(conn: socket.socket, n: int) -> bytes:
    """Exactly `n` bytes, or fewer if the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data
