"""The worker agent: registers with the coordinator, sends heartbeats, and supervises the
engine child process, restarting it whenever its assignment changes.

The agent never imports MLX: the engine does, in its own process, so a crashed or hung
engine can be replaced without losing the worker's place in the cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from shardcompute.config import load_config, resolve_cluster_token
from shardcompute.dtypes import policy_env, resolve
from shardcompute.errors import ShardComputeError
from shardcompute.http_client import http_client, tls_failure
from shardcompute.protocol import (
    CLUSTER_TOKEN_ENV,
    Assignment,
    DeviceFacts,
    EngineState,
    Heartbeat,
    HeartbeatResponse,
    M,
    Message,
    RegisterRequest,
    RegisterResponse,
    decode,
)
from shardcompute.runtime import detect_device, with_huge_pages

log = logging.getLogger("shardcompute.worker")

ENGINE_COMMAND_ENV = "SHARDCOMPUTE_ENGINE_COMMAND"
# After a failed heartbeat or a new registration, beat again this soon, not an interval
# later: a restarted coordinator then hears from us (and our engine's PID) at once.
RETRY_SECONDS = 0.5
# How often the agent looks at its engine between beats: an engine that exits is reported at
# once, not up to an interval later, so the group is re-formed that much sooner.
WATCH_SECONDS = 0.05
DEFAULT_ENGINE_COMMAND = [sys.executable, "-m", "shardcompute.worker.engine"]


# --- device facts --------------------------------------------------------------------------


def device_facts(mlx_probe: bool = True) -> DeviceFacts:
    """What this machine is. The MLX device comes from a child process, not an import."""
    return DeviceFacts(
        host=socket.gethostname(),
        platform=platform.platform(),
        machine=platform.machine(),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count() or 0,
        memory_bytes=_memory_bytes(),
        mlx_device=_mlx_device() if mlx_probe else "not probed",
        python=platform.python_version(),
    )


def _cpu_name() -> str:
    if sys.platform == "darwin":
        return _run_quietly(["sysctl", "-n", "machdep.cpu.brand_string"]) or platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def _mlx_device() -> str:
    code = "import mlx.core as mx; print(mx.default_device())"
    return _run_quietly([sys.executable, "-c", code], timeout=60) or "unavailable"


def _run_quietly(cmd: list[str], timeout: float = 10) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def local_address_towards(url: str) -> str:
    """The local IP this machine uses to reach `url`'s host: the address peers can dial."""
    host = urlparse(url).hostname or "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect sends nothing; it only picks a route
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


# --- the engine child ----------------------------------------------------------------------


def local_ranks(assignment: Assignment) -> int:
    """Ranks of this group on this engine's host: they split its cores (see `_blas`)."""
    host = assignment.hostfile[assignment.rank].rsplit(":", 1)[0]
    return sum(entry.rsplit(":", 1)[0] == host for entry in assignment.hostfile)


class EngineProcess:
    """One engine child at a time, started from an assignment written to a JSON file."""

    def __init__(self, command: list[str], work_dir: Path, env: dict[str, str]):
        self._command = command
        self._work_dir = work_dir
        self._env = env
        self._proc: subprocess.Popen | None = None
        self.assignment: Assignment | None = None  # what the engine runs

    @property
    def generation(self) -> int | None:
        """The generation the engine runs, None when there is none."""
        return self.assignment.generation if self.assignment else None

    @property
    def pid(self) -> int | None:
        """The engine's process id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self, assignment: Assignment) -> None:
        """Replace any running engine with one for `assignment`."""
        self.stop(grace_seconds=0)
        path = self._work_dir / f"assignment-g{assignment.generation}.json"
        path.write_text(assignment.model_dump_json(indent=2))
        hostfile = self._work_dir / f"hostfile-g{assignment.generation}.json"
        hostfile.write_text(json.dumps([[entry] for entry in assignment.hostfile]))
        env = {**self._env, "MLX_RANK": str(assignment.rank), "MLX_HOSTFILE": str(hostfile)}
        env["SHARDCOMPUTE_LOCAL_RANKS"] = str(local_ranks(assignment))
        # The dtype policy's switches, set before the engine loads MLX (TF32 off for float32).
        env = policy_env(resolve(assignment.dtype, detect_device()), with_huge_pages(env))
        cmd = [*self._command, "--assignment", str(path)]
        log.info(
            "starting engine rank %d of generation %d: %s",
            assignment.rank,
            assignment.generation,
            shlex.join(cmd),
        )
        # Same process group as the agent: whoever stops the agent's group stops the engine;
        # and if the agent alone is killed, the engine dies too rather than hold its port.
        self._proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
        self.assignment = assignment

    def state(self) -> tuple[EngineState, int | None]:
        """The engine's state and, once it exited, its exit code."""
        if self._proc is None:
            return "idle", None
        code = self._proc.poll()
        return ("running", None) if code is None else ("exited", code)

    def stop(self, grace_seconds: float = 5.0) -> None:
        """Terminate the engine, killing it if it ignores SIGTERM for `grace_seconds`.

        With no grace it is killed at once: an engine being replaced has lost its group (the
        generation changes only after a rank is lost), so it has no orderly exit to make,
        and it may be stuck in a collective; waiting would stall the heartbeats.
        """
        proc, self._proc, self.assignment = self._proc, None, None
        if proc is None or proc.poll() is not None:
            return
        if grace_seconds > 0:
            proc.terminate()
            try:
                proc.wait(grace_seconds)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        proc.wait(5.0)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child, before exec: send it `sig` when its parent dies (Linux; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, sig)


# --- talking to the coordinator ------------------------------------------------------------


class Refused(ShardComputeError):
    """The coordinator refused this worker for a reason retrying cannot fix."""


class UnknownWorker(Exception):
    """The coordinator no longer knows this worker (it restarted, or declared us dead)."""


@dataclass
class AgentSettings:
    """Who this worker is and how it reaches the coordinator."""

    coordinator_url: str
    cluster_token: str
    address: str
    collective_port: int | None = None
    requested_rank: int | None = None
    shard_dir: str | None = None
    tls_ca: str | None = None  # verify the coordinator's certificate against this CA file
    engine_command: list[str] = field(default_factory=lambda: list(DEFAULT_ENGINE_COMMAND))
    connect_timeout_seconds: float = 120.0
    mlx_probe: bool = True


class Agent:
    """Registers, beats, and keeps the engine child in step with the assignment."""

    def __init__(self, settings: AgentSettings, work_dir: Path):
        self.settings = settings
        self._http = http_client(
            settings.coordinator_url.rstrip("/") + "/internal/v1",
            ca_file=settings.tls_ca,
            token=settings.cluster_token,
        )
        env = {**os.environ, CLUSTER_TOKEN_ENV: settings.cluster_token}
        self.engine = EngineProcess(settings.engine_command, work_dir, env)
        self._facts = device_facts(settings.mlx_probe)
        self.worker_id: str | None = None
        self.loaded = False  # whether the coordinator saw our engine's assignment load
        self.interval = 2.0
        self._unreachable = False  # the last heartbeat failed: log once until it works

    def run(self, stop: threading.Event) -> None:
        """Register, then beat every interval until `stop` is set; the engine stops with us."""
        try:
            self.register()
            while not stop.is_set():
                steady = self.beat()
                self._pause(self.interval if steady else min(self.interval, RETRY_SECONDS), stop)
        finally:
            self.engine.stop()
            self._http.close()

    def _pause(self, seconds: float, stop: threading.Event) -> None:
        """Until the next beat is due, or sooner if the engine exits meanwhile."""
        deadline = time.monotonic() + seconds
        running = self.engine.state()[0] == "running"
        while not stop.wait(min(WATCH_SECONDS, max(deadline - time.monotonic(), 0))):
            if time.monotonic() >= deadline or (running and self.engine.state()[0] != "running"):
                return

    def register(self) -> None:
        """Join the cluster, retrying while the coordinator is unreachable. Joining again, it
        announces the engine it runs, which a restarted coordinator may keep."""
        s = self.settings
        running = self.engine.assignment if self.engine.state()[0] == "running" else None
        request = RegisterRequest(
            facts=self._facts,
            address=s.address,
            collective_port=s.collective_port,
            requested_rank=s.requested_rank,
            shard_dir=s.shard_dir,
            agent_pid=os.getpid(),
            worker_id=self.worker_id,
            running=running,
            loaded=running is not None and self.loaded,
        )
        deadline = time.monotonic() + s.connect_timeout_seconds
        while True:
            try:
                reply = self._call("/workers/register", request, RegisterResponse)
                break
            except httpx.TransportError as e:
                problem = tls_failure(e, s.coordinator_url, s.tls_ca)
                if problem is not None:  # a certificate will not verify by waiting
                    raise Refused(f"cannot register: {problem}") from None
                if time.monotonic() > deadline:
                    raise Refused(
                        f"cannot reach the coordinator at {s.coordinator_url}: {e}"
                    ) from None
                time.sleep(1.0)
        self.worker_id, self.interval = reply.worker_id, reply.heartbeat_interval_seconds
        log.info(
            "registered as %s with %s (cluster %s)",
            self.worker_id,
            s.coordinator_url,
            reply.cluster_state,
        )

    def beat(self) -> bool:
        """One heartbeat; start, restart or stop the engine as the reply says. False when
        the next one should come soon: this one failed, we just registered again, or the
        cluster is not ready (it is re-forming, and may have a new generation for us)."""
        state, code = self.engine.state()
        beat = Heartbeat(
            generation=self.engine.generation,
            engine_state=state,
            engine_exit_code=code,
            engine_pid=self.engine.pid,
        )
        try:
            reply = self._call(f"/workers/{self.worker_id}/heartbeat", beat, HeartbeatResponse)
        except UnknownWorker:
            self._register_again()
            return False
        except (httpx.TransportError, httpx.HTTPStatusError) as e:
            # Once per outage: a coordinator down for an hour must not flood the log.
            level = logging.DEBUG if self._unreachable else logging.WARNING
            log.log(level, "heartbeat failed (%s); retrying every %.1fs", e, RETRY_SECONDS)
            self._unreachable = True
            return False
        if self._unreachable:
            log.info("the coordinator answers heartbeats again")
            self._unreachable = False
        self._follow(reply.assignment)
        self.loaded = reply.loaded and self.engine.generation == (
            reply.assignment.generation if reply.assignment else None
        )
        # While the cluster re-forms, beat as if retrying: a new generation reaches this
        # worker within RETRY_SECONDS, not a whole interval later.
        return reply.cluster_state == "ready"

    def _register_again(self) -> None:
        # The engine keeps running: a restarted coordinator may adopt its group whole.
        log.warning(
            "the coordinator does not know worker %s (it restarted, or declared us dead); "
            "registering again with our engine's assignment (generation %s)",
            self.worker_id,
            self.engine.generation,
        )
        self.register()
        self._unreachable = False

    def _follow(self, assignment: Assignment | None) -> None:
        if assignment is None:
            if self.engine.generation is not None:  # we are a spare now
                self.engine.stop(grace_seconds=0)
            return
        if assignment.generation != self.engine.generation:
            # The coordinator may not know the URL we reach it by, nor our CA's path; ours
            # work from here.
            local = {"coordinator_url": self.settings.coordinator_url, "tls_ca": self._ca_path()}
            self.engine.start(assignment.model_copy(update=local))

    def _ca_path(self) -> str | None:
        # Absolute: the engine must find the file whatever its working directory.
        ca = self.settings.tls_ca
        return str(Path(ca).expanduser().resolve()) if ca else None

    def _call(self, path: str, body: Message, reply_type: type[M]) -> M:
        response = self._http.post(
            path, content=body.model_dump_json(), headers={"content-type": "application/json"}
        )
        if response.status_code == 404 and "unknown_worker" in response.text:
            raise UnknownWorker()
        if response.status_code in (400, 401, 409):
            raise Refused(f"the coordinator refused {path}: {_error_message(response)}")
        response.raise_for_status()
        return decode(reply_type, response.content)


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}: {response.text[:200]}"


# --- command line --------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardcompute worker",
        description="Run a worker agent: it joins the coordinator "
        "and runs this machine's engine rank.",
    )
    p.add_argument("--coordinator-url", help="default: from the config's coordinator.host/port")
    p.add_argument("--rank", type=int, help="ask for this rank (default: registration order)")
    p.add_argument("--port", type=int, help="this rank's collective port (default: base + rank)")
    p.add_argument("--shard-dir", help="pre-made shards on this machine")
    p.add_argument(
        "--address",
        help="address peers dial for collectives (default: the route to the coordinator)",
    )
    p.add_argument("--config", help="cluster config YAML (for the token and defaults)")
    p.add_argument(
        "--tls-ca",
        help="verify the coordinator's https:// certificate against this CA file (security.tls_ca)",
    )
    p.add_argument(
        "--engine-command",
        help=f"engine command to run instead of the real engine "
        f"(also ${ENGINE_COMMAND_ENV}); '--assignment PATH' is appended",
    )
    p.add_argument("--work-dir", help="where assignments are written (default: a temp dir)")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=120.0,
        help="seconds to keep trying to reach the coordinator",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> AgentSettings:
    """Agent settings from flags, the config file and the environment."""
    config = load_config(args.config, {"security.tls_ca": args.tls_ca})
    tls_ca = config.security.tls_ca
    url = args.coordinator_url
    if url is None:
        host, scheme = config.coordinator.host, "https" if tls_ca else "http"
        url = f"{scheme}://{'127.0.0.1' if host == '0.0.0.0' else host}:{config.coordinator.port}"
    token = resolve_cluster_token(config.security, create=False)
    if token is None:
        raise Refused(
            "no cluster token: set security.cluster_token or $"
            + CLUSTER_TOKEN_ENV
            + f", or run where the coordinator wrote {config.security.cluster_token_file}"
        )
    command = args.engine_command or os.environ.get(ENGINE_COMMAND_ENV)
    return AgentSettings(
        coordinator_url=url,
        cluster_token=token,
        address=args.address or local_address_towards(url),
        collective_port=args.port,
        requested_rank=args.rank,
        shard_dir=args.shard_dir,
        tls_ca=tls_ca,
        engine_command=shlex.split(command) if command else list(DEFAULT_ENGINE_COMMAND),
        connect_timeout_seconds=args.connect_timeout,
    )


def worker_main(argv: list[str] | None = None) -> int:
    """`shardcompute worker`: run an agent until SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per heartbeat is noise
    args = _parser().parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        settings = settings_from_args(args)
        with tempfile.TemporaryDirectory(prefix="shardcompute-worker-") as tmp:
            work_dir = Path(args.work_dir or tmp)
            work_dir.mkdir(parents=True, exist_ok=True)
            Agent(settings, work_dir).run(stop)
    except ShardComputeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
