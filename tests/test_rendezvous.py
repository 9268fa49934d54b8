"""The rendezvous before a ring forms, over real sockets on 127.0.0.1, one thread per rank:
ranks arriving in any order meet; strangers, stale generations and garbage are turned away;
every wait ends, with an error naming what did not come."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from processes import free_port
from shardcompute.collectives import rendezvous
from shardcompute.collectives.rendezvous import Hello, Rendezvous, parse_address
from shardcompute.errors import CollectiveError


def hostfile(world_size: int) -> list[str]:
    return [f"127.0.0.1:{free_port()}" for _ in range(world_size)]


class Rank(threading.Thread):
    """One rank's `meet` on a thread, after `delay` seconds; records when it returned."""

    def __init__(self, meeting: Rendezvous, delay: float = 0.0):
        super().__init__(daemon=True)
        self.meeting, self.delay = meeting, delay
        self.error: Exception | None = None
        self.done_at: float | None = None

    def run(self) -> None:
        time.sleep(self.delay)
        try:
            self.meeting.meet()
            self.done_at = time.monotonic()
        except Exception as e:  # noqa: BLE001  (the test reads it)
            self.error = e


def meet_all(hosts: list[str], delays: list[float], generation: int = 3) -> list[Rank]:
    meetings = [Rendezvous(hosts, r, generation, timeout=20) for r in range(len(hosts))]
    meetings[0].open()
    ranks = [Rank(m, d) for m, d in zip(meetings, delays, strict=True)]
    for r in ranks:
        r.start()
    for r in ranks:
        r.join(30)
        assert not r.is_alive(), "a rank never returned from meet"
    return ranks


def test_hello_round_trip_and_refusals():
    hello = Hello(generation=2**40, rank=3, world_size=4)
    assert Hello.unpack(hello.pack()) == hello
    wire = hello.pack()
    for bad in (wire[:-1], b"GET / HTTP/1.1\r\n\r\n"[: len(wire)], b"XXXX" + wire[4:]):
        with pytest.raises(CollectiveError, match="rendezvous"):
            Hello.unpack(bad)
    newer = Hello.WIRE.pack(Hello.MAGIC, rendezvous.VERSION + 1, 2, 1, 2)
    with pytest.raises(CollectiveError, match="version"):
        Hello.unpack(newer)


def test_parse_address_names_a_bad_entry():
    assert parse_address("10.0.0.2:5000") == ("10.0.0.2", 5000)
    for bad in ("10.0.0.2", "10.0.0.2:http", ":5000", "h:70000"):
        with pytest.raises(CollectiveError, match="not host:port"):
            parse_address(bad)


@pytest.mark.parametrize("delays", [[0.6, 0.0, 0.0], [0.0, 0.3, 0.6], [0.3, 0.6, 0.0]])
def test_ranks_meet_whatever_the_order(delays):
    """Rank 0 last (as when it loads longest), first, or in the middle: all return, none
    before the last one arrives, and rank 0's port is free again for the ring."""
    hosts = hostfile(3)
    start = time.monotonic()
    ranks = meet_all(hosts, delays)
    assert [r.error for r in ranks] == [None, None, None]
    assert all(r.done_at - start >= max(delays) for r in ranks)
    with socket.create_server(parse_address(hosts[0])):
        pass  # the listener is closed: MLX can bind the port


def test_a_rank_that_starts_before_rank_0_listens_keeps_trying():
    hosts = hostfile(2)
    peer = Rank(Rendezvous(hosts, 1, 3, timeout=20))
    peer.start()
    time.sleep(0.3)  # the peer's first attempts are refused
    zero = Rendezvous(hosts, 0, 3, timeout=20)
    zero.meet()  # opens the listener itself when `open` was not called
    peer.join(10)
    assert peer.error is None and peer.done_at is not None


def test_strangers_and_stale_generations_are_turned_away(monkeypatch):
    monkeypatch.setattr(rendezvous, "HELLO_SECONDS", 0.3)
    hosts = hostfile(2)
    zero = Rendezvous(hosts, 0, 5, timeout=20)
    zero.open()
    address = parse_address(hosts[0])
    strangers = [socket.create_connection(address) for _ in range(3)]
    strangers[0].sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # garbage
    strangers[1].sendall(Hello(4, 1, 2).pack())  # an engine of the last generation
    # strangers[2] says nothing at all: it is dropped after HELLO_SECONDS
    stale = Rank(Rendezvous(hosts, 1, 4, timeout=3))
    stale.start()
    peer = Rank(Rendezvous(hosts, 1, 5, timeout=20), delay=0.2)
    peer.start()
    zero.meet()
    peer.join(10)
    stale.join(10)
    assert peer.error is None and peer.done_at is not None
    # The stale engine was shut out and told nothing it could take for an answer.
    assert isinstance(stale.error, CollectiveError)
    for s in strangers:
        s.close()


def test_waits_end_with_an_error_naming_the_address():
    hosts = hostfile(3)
    zero = Rendezvous(hosts, 0, 1, timeout=0.5)
    only = Rank(Rendezvous(hosts, 1, 1, timeout=5))
    only.start()
    start = time.monotonic()
    with pytest.raises(CollectiveError, match=f"not every one of 3 ranks reached {hosts[0]}"):
        zero.meet()
    assert time.monotonic() - start < 5
    only.join(10)
    assert isinstance(only.error, CollectiveError)  # rank 0 went away without an answer
    lonely = Rendezvous(hostfile(2), 1, 1, timeout=0.3)
    with pytest.raises(CollectiveError, match="did not answer within"):
        lonely.meet()


def test_rank_0_that_cannot_listen_says_where():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        zero = Rendezvous([f"127.0.0.1:{port}", "127.0.0.1:1"], 0, 1)
        with pytest.raises(CollectiveError, match=f"cannot listen on 127.0.0.1:{port}"):
            zero.open()
