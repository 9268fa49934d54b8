"""A soak test of a running cluster: N minutes at concurrency C of mixed requests (chat and
completion, streamed and not, short and longer, some cancelled by the client part way).

Reports the success rate, latency percentiles, and the resident memory (RSS, from /proc) of
every process of the cluster (the coordinator, and each worker's agent and engine, found
through /cluster; or named with --pid) at the start and at the end, as a table and as JSON.
"Start" is after a warm-up that runs each endpoint once at its largest, so the growth
measured is what the load adds, not first-use allocations. RSS needs the processes to run on
this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from shardcompute.bench.http_bench import summary_stats, write_json
from shardcompute.client.chat import (
    ServerError,
    api_client,
    chunk_text,
    default_api_key,
    failure_text,
    served_model,
    stream_chunks,
)
from shardcompute.errors import ShardComputeError
from shardcompute.http_client import default_tls_ca, http_client

PROMPTS = (
    "What is 7 times 8?",
    "Name three primary colors.",
    "Summarize in one sentence: " + " ".join(["The river flows past the old mill."] * 12),
    "Write a short story about a lighthouse keeper and a storm at sea.",
)


@dataclass(frozen=True)
class SoakSettings:
    """How long, how many at once, and the request mix."""

    seconds: float
    concurrency: int = 4
    short_tokens: int = 8
    long_tokens: int = 48
    cancel_fraction: float = 0.05
    seed: int = 0
    model: str | None = None


@dataclass(frozen=True)
class Shape:
    """One request's kind."""

    endpoint: str  # "chat" or "completion"
    stream: bool
    max_tokens: int
    prompt: str
    cancel: bool  # the client hangs up after the first piece of text

    @property
    def label(self) -> str:
        return f"{self.endpoint} {'stream' if self.stream else 'whole'}" + (
            " cancel" if self.cancel else ""
        )


@dataclass
class Outcome:
    """How one request went."""

    label: str
    ok: bool
    seconds: float
    cancel: bool
    error: str | None = None


def pick_shape(rng: random.Random, s: SoakSettings) -> Shape:
    """A random request kind: cancellations are streamed (a client hanging up mid-answer)."""
    cancel = rng.random() < s.cancel_fraction
    return Shape(
        endpoint=rng.choice(("chat", "completion")),
        stream=cancel or rng.random() < 0.5,
        max_tokens=rng.choice((s.short_tokens, s.long_tokens)),
        prompt=rng.choice(PROMPTS),
        cancel=cancel,
    )


def _body(shape: Shape, model: str) -> tuple[str, dict]:
    body = {"model": model, "max_tokens": shape.max_tokens, "temperature": 0}
    if shape.endpoint == "chat":
        messages = [{"role": "user", "content": shape.prompt}]
        return "/chat/completions", {**body, "messages": messages}
    return "/completions", {**body, "prompt": shape.prompt}


def run_request(http: httpx.Client, model: str, shape: Shape) -> Outcome:
    """Send one request; ok when it completed with a finish reason (or, for a cancellation,
    when text arrived before the client hung up)."""
    path, body = _body(shape, model)
    start = time.perf_counter()
    try:
        ok = _streamed(http, path, body, shape.cancel) if shape.stream else _whole(http, path, body)
        error = None if ok else "no finish_reason"
    except (ServerError, httpx.HTTPError) as e:
        ok, error = False, failure_text(e, str(http.base_url))
    return Outcome(shape.label, ok, time.perf_counter() - start, shape.cancel, error)


def _streamed(http: httpx.Client, path: str, body: dict, cancel: bool) -> bool:
    finished = False
    with contextlib.closing(stream_chunks(http, path, body)) as chunks:
        for chunk in chunks:
            if cancel and chunk_text(chunk):
                return True  # closing the generator closes the connection: a hang-up
            choice = (chunk.get("choices") or [{}])[0]
            finished = finished or bool(choice.get("finish_reason"))
    # A cancellation whose answer ended before any text is a complete answer too.
    return finished


def _whole(http: httpx.Client, path: str, body: dict) -> bool:
    r = http.post(path, json=body)
    if r.status_code != 200:
        raise ServerError(f"HTTP {r.status_code}: {r.text[:200]}")
    return r.json()["choices"][0].get("finish_reason") in ("stop", "length")


# --- the processes and their memory ---------------------------------------------------------


def cluster_pids(http: httpx.Client) -> dict[str, int]:
    """The coordinator's, agents' and engines' PIDs, as /cluster reports them."""
    view = http.get("/cluster").raise_for_status().json()
    pids = {"coordinator": view["coordinator_pid"]}
    for w in sorted(view["workers"], key=lambda w: (w["rank"] is None, w["rank"] or 0)):
        name = f"rank {w['rank']}" if w["rank"] is not None else w["worker_id"]
        pids[f"{name} agent"] = w["agent_pid"]
        if w.get("engine_pid"):
            pids[f"{name} engine"] = w["engine_pid"]
    return pids


def rss_bytes(pid: int) -> int | None:
    """Resident memory of `pid` from /proc, or None if it is gone (or not on this machine)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_rows(pids: dict[str, int], start: dict[str, int | None]) -> list[dict]:
    """One row per process: RSS at start and now, and the growth as a fraction."""
    rows = []
    for name, pid in pids.items():
        before, after = start.get(name), rss_bytes(pid)
        growth = (after - before) / before if before and after is not None else None
        rows.append(
            {"name": name, "pid": pid, "rss_start_bytes": before, "rss_end_bytes": after}
            | {"growth": growth}
        )
    return rows


# --- the run --------------------------------------------------------------------------------


def warm_up(http: httpx.Client, model: str, s: SoakSettings) -> list[Outcome]:
    """Each endpoint once at its largest (one streamed), so first-use allocations happen
    before "start"."""
    longest = max(PROMPTS, key=len)
    return [
        run_request(http, model, Shape("chat", True, s.long_tokens, longest, False)),
        run_request(http, model, Shape("completion", False, s.long_tokens, longest, False)),
    ]


def load(http: httpx.Client, model: str, s: SoakSettings) -> tuple[list[Outcome], float]:
    """`s.concurrency` clients, each sending one request after another until time is up."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    deadline = time.monotonic() + s.seconds

    def client(i: int) -> None:
        rng = random.Random(s.seed * 1000 + i)
        while time.monotonic() < deadline:
            outcome = run_request(http, model, pick_shape(rng, s))
            with lock:
                outcomes.append(outcome)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(s.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes, time.perf_counter() - start


def run_soak(
    url: str,
    s: SoakSettings,
    api_key: str | None = None,
    tls_ca: str | None = None,
    extra_pids: dict[str, int] | None = None,
) -> dict:
    """Warm up, note RSS, run the load, note RSS again; the report (as written to JSON)."""
    with (
        api_client(url, api_key, timeout=300, tls_ca=tls_ca) as http,
        http_client(url, ca_file=tls_ca, token=api_key) as ops,
    ):
        model = s.model or served_model(http)
        warm = warm_up(http, model, s)
        pids = {**cluster_pids(ops), **(extra_pids or {})}
        start_rss = {name: rss_bytes(pid) for name, pid in pids.items()}
        outcomes, wall = load(http, model, s)
        rows = memory_rows(pids, start_rss)
    return summarize(url, model, s, warm, outcomes, wall, rows)


def summarize(
    url: str,
    model: str,
    s: SoakSettings,
    warm: list[Outcome],
    outcomes: list[Outcome],
    wall: float,
    rows: list[dict],
) -> dict:
    """The report: counts per kind, success rate, latency of completed requests, memory."""
    ok = [o for o in outcomes if o.ok]
    kinds: dict[str, dict[str, int]] = {}
    for o in outcomes:
        k = kinds.setdefault(o.label, {"requests": 0, "ok": 0})
        k["requests"] += 1
        k["ok"] += o.ok
    return {
        "url": url,
        "model": model,
        "settings": asdict(s),
        "wall_seconds": wall,
        "warmup_ok": sum(o.ok for o in warm),
        "warmup_requests": len(warm),
        "requests": len(outcomes),
        "ok": len(ok),
        "success_rate": len(ok) / len(outcomes) if outcomes else 0.0,
        "requests_per_second": len(outcomes) / wall if wall > 0 else 0.0,
        "latency_seconds": summary_stats([o.seconds for o in ok if not o.cancel]),
        "kinds": dict(sorted(kinds.items())),
        "errors": sorted({o.error for o in [*warm, *outcomes] if o.error})[:10],
        "processes": rows,
    }


# --- report and command line ----------------------------------------------------------------


def verdict(report: dict, min_success: float, max_growth: float) -> list[str]:
    """What fails the soak: a low success rate, or a process that grew too much or died."""
    problems = []
    if report["success_rate"] < min_success:
        problems.append(
            f"success rate {report['success_rate']:.4f} is under {min_success} "
            f"({report['requests'] - report['ok']} of {report['requests']} failed)"
        )
    for row in report["processes"]:
        if row["rss_end_bytes"] is None:
            problems.append(f"{row['name']} (pid {row['pid']}) is gone or not on this machine")
        elif row["growth"] is not None and row["growth"] >= max_growth:
            problems.append(f"{row['name']} grew {row['growth']:.1%} (limit {max_growth:.0%})")
    return problems


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def print_report(report: dict, console: Console) -> None:
    """Requests per kind, latency percentiles, and RSS per process, as tables."""
    s = report["settings"]
    kinds = Table(
        title=f"soak: {report['requests']} requests started in {s['seconds']:.0f}s (the last "
        f"done at {report['wall_seconds']:.0f}s), concurrency {s['concurrency']} "
        f"({report['model']}); success "
        f"{report['success_rate']:.2%}, {report['requests_per_second']:.2f} req/s"
    )
    for col in ("kind", "requests", "ok"):
        kinds.add_column(col, justify="left" if col == "kind" else "right")
    for label, k in report["kinds"].items():
        kinds.add_row(label, str(k["requests"]), str(k["ok"]))
    console.print(kinds)
    lat = report["latency_seconds"]
    console.print(
        "latency (s, completed requests): "
        + ", ".join(f"{q} {'-' if lat[q] is None else f'{lat[q]:.3f}'}" for q in lat)
    )
    mem = Table(title="resident memory (MiB)")
    for col in ("process", "pid", "start", "end", "growth"):
        mem.add_column(col, justify="left" if col == "process" else "right")
    for r in report["processes"]:
        growth = "-" if r["growth"] is None else f"{r['growth']:+.1%}"
        mem.add_row(
            r["name"], str(r["pid"]), _mib(r["rss_start_bytes"]), _mib(r["rss_end_bytes"]), growth
        )
    console.print(mem)
    for message in report["errors"]:
        console.print(f"  error: {message}", markup=False)


def _pid(text: str) -> tuple[str, int]:
    name, sep, pid = text.partition("=")
    if not sep or not pid.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=PID, got {text!r}")
    return name, int(pid)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/soak.py", description=__doc__)
    p.add_argument("--coordinator-url", default="http://127.0.0.1:8000")
    p.add_argument("--minutes", type=float, required=True, help="how long the load runs")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--short-tokens", type=int, default=8, help="max_tokens of short requests")
    p.add_argument("--long-tokens", type=int, default=48, help="max_tokens of longer ones")
    p.add_argument("--cancel-fraction", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model id (default: the first the server lists)")
    p.add_argument("--api-key", default=default_api_key())
    p.add_argument("--tls-ca", default=default_tls_ca(), help="CA file for an https:// URL")
    p.add_argument("--pid", type=_pid, action="append", default=[], metavar="NAME=PID",
                   help="another process to watch (also: those /cluster names)")  # fmt: skip
    p.add_argument("--min-success", type=float, default=0.999)
    p.add_argument("--max-rss-growth", type=float, default=0.10, help="as a fraction")
    p.add_argument("--json", help="write the report here as JSON")
    return p


def soak_main(argv: list[str] | None = None) -> int:
    """Entry point of scripts/soak.py: 0 when the soak passes, 1 when it fails, 2 on bad
    arguments or an unreachable cluster."""
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    if args.minutes <= 0 or args.concurrency < 1 or not 0 <= args.cancel_fraction <= 1:
        console.print("error: --minutes > 0, --concurrency >= 1, 0 <= --cancel-fraction <= 1")
        return 2
    settings = SoakSettings(
        args.minutes * 60, args.concurrency, args.short_tokens, args.long_tokens,
        args.cancel_fraction, args.seed, args.model,
    )  # fmt: skip
    try:
        report = run_soak(args.coordinator_url, settings, args.api_key, args.tls_ca, dict(args.pid))
    except (ServerError, httpx.HTTPError, ShardComputeError) as e:
        why = failure_text(e, args.coordinator_url, args.tls_ca)
        console.print(f"error: cannot soak {args.coordinator_url}: {why}", markup=False)
        return 2
    report["problems"] = verdict(report, args.min_success, args.max_rss_growth)
    print_report(report, console)
    if args.json:
        write_json(args.json, report, console)
    for problem in report["problems"]:
        console.print(f"FAIL: {problem}", markup=False)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(soak_main())
