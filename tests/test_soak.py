"""The soak script's pieces that decide pass or fail: the request mix, RSS from /proc, and the
verdict, which must fail a low success rate, a grown process and a vanished one."""

import os
import random

from shardcompute.bench.soak import SoakSettings, pick_shape, rss_bytes, verdict


def test_the_mix_has_every_kind_and_cancellations_stream():
    rng, settings = random.Random(0), SoakSettings(seconds=1, cancel_fraction=0.2)
    shapes = [pick_shape(rng, settings) for _ in range(400)]
    assert {s.label for s in shapes} == {
        f"{e} {k}" for e in ("chat", "completion") for k in ("stream", "whole", "stream cancel")
    }
    assert {s.max_tokens for s in shapes} == {settings.short_tokens, settings.long_tokens}
    assert 0.1 < sum(s.cancel for s in shapes) / len(shapes) < 0.3


def test_rss_of_a_live_and_a_gone_process():
    assert rss_bytes(os.getpid()) > 10 * 2**20
    assert rss_bytes(2**22 + 12345) is None


def report(success_rate, *rows):
    processes = [
        {"name": name, "pid": 1, "rss_start_bytes": start, "rss_end_bytes": end}
        | {"growth": None if end is None else (end - start) / start}
        for name, start, end in rows
    ]
    return {"success_rate": success_rate, "requests": 1000, "ok": int(1000 * success_rate)} | {
        "processes": processes
    }


def test_verdict():
    assert verdict(report(1.0, ("coordinator", 100, 109)), 0.999, 0.10) == []
    assert verdict(report(0.999, ("engine", 100, 100)), 0.999, 0.10) == []
    low = verdict(report(0.998, ("engine", 100, 100)), 0.999, 0.10)
    assert low == ["success rate 0.9980 is under 0.999 (2 of 1000 failed)"]
    grown = verdict(report(1.0, ("rank 0 engine", 100, 110)), 0.999, 0.10)
    assert grown == ["rank 0 engine grew 10.0% (limit 10%)"]
    gone = verdict(report(1.0, ("rank 1 agent", 100, None)), 0.999, 0.10)
    assert gone == ["rank 1 agent (pid 1) is gone or not on this machine"]
