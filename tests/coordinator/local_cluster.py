"""A real local cluster for control-plane tests: a coordinator and worker agents as separate
processes on 127.0.0.1, running the fake engine. Every wait is bounded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from processes import Processes, child_env, free_port, wait_for
from shardcompute.certs import CertFiles
from shardcompute.http_client import http_client

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
CLUSTER_TOKEN = "test-cluster-token"
API_KEY = "sk-test-key"


class LocalCluster(Processes):
    """A coordinator and agents started by a test; stop() kills each one's process group.
    With `tls`, the coordinator serves HTTPS with its certificate and everyone verifies it
    against its CA."""

    def __init__(
        self,
        tmp: Path,
        world_size: int = 2,
        api_key: str | None = None,
        tls: CertFiles | None = None,
        **config,
    ):
        self.tmp = tmp
        self.port = free_port()
        self.ca = str(tls.ca) if tls else None
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.config = tmp / "cluster.yaml"
        lines = [
            "coordinator:",
            f"  heartbeat_interval_seconds: {config.get('heartbeat_interval', 0.2)}",
            f"  heartbeat_timeout_seconds: {config.get('heartbeat_timeout', 1.0)}",
            f"  request_timeout_seconds: {config.get('request_timeout', 30)}",
            "parallelism:",
            f"  tensor_parallel_size: {world_size}",
            "worker:",
            f"  collective_port_base: {free_port()}",
            "security:",
            f"  cluster_token_file: {tmp / 'token-file-unused'}",
        ]
        if api_key:
            lines.append(f"  api_key: {api_key}")
        if tls:
            lines += [f"  tls_cert: {tls.cert}", f"  tls_key: {tls.key}"]
        self.config.write_text("\n".join(lines) + "\n")
        env = child_env(
            SHARDCOMPUTE_SECURITY__CLUSTER_TOKEN=CLUSTER_TOKEN,
            FAKE_ENGINE_TOKEN_DELAY=str(config.get("token_delay", 0.002)),
        )
        super().__init__(tmp, env)

    def start_coordinator(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "shardcompute.coordinator",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
        ]
        self.spawn("coordinator", cmd)
        wait_for(self._healthy, 20, "the coordinator's /health")

    def start_agent(self, name: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
        cmd = [
            sys.executable,
            "-m",
            "shardcompute.worker.agent",
            "--coordinator-url",
            self.url,
            "--engine-command",
            f"{sys.executable} {FAKE_ENGINE}",
            "--connect-timeout",
            "10",
            *(["--tls-ca", self.ca] if self.ca else []),
            *extra,
        ]
        return self.spawn(name, cmd, env)

    def http(self, timeout: float = 5) -> httpx.Client:
        """A client for the coordinator, verifying it against the cluster's CA if TLS."""
        return http_client(self.url, ca_file=self.ca, timeout=timeout)

    def _healthy(self) -> bool:
        try:
            with self.http(timeout=1) as http:
                return http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def cluster(self) -> dict:
        with self.http() as http:
            return http.get("/cluster", headers=self.auth()).json()

    def auth(self) -> dict[str, str]:
        """The header that opens /cluster, /metrics and /v1 when an API key is set."""
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def ready(self) -> bool:
        """Whether /ready answers 200 (every rank loaded, the cluster serving)."""
        try:
            with self.http(timeout=5) as http:
                return http.get("/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_state(self, state: str, timeout: float = 20) -> dict:
        return wait_for(
            lambda: (v := self.cluster())["state"] == state and v,
            timeout,
            f"cluster state {state}; logs:\n{self.logs()}",
        )


def start_cluster(tmp: Path, world_size: int = 2, **kw) -> LocalCluster:
    """A coordinator and `world_size` agents, waited on until ready."""
    cluster = LocalCluster(tmp, world_size, **kw)
    try:
        cluster.start_coordinator()
        for rank in range(world_size):
            cluster.start_agent(f"agent{rank}", "--rank", str(rank))
        cluster.wait_state("ready", 30)
    except BaseException:
        cluster.stop()
        raise
    return cluster


REAL_MODEL = "smollm2-135m"


def real_agent_command(url: str, rank: int | None = None) -> list[str]:
    """A worker agent that runs the default, real engine."""
    cmd = [sys.executable, "-m", "shardcompute.worker.agent", "--coordinator-url", url]
    cmd += ["--connect-timeout", "10"]
    return cmd if rank is None else [*cmd, "--rank", str(rank)]


def start_real_cluster(
    tmp: Path, model_path: Path, world_size: int = 2, api_key: str | None = None, **env: str
) -> LocalCluster:
    """A coordinator and `world_size` agents running the real engine on float32 weights of
    `model_path`, waited on until ready. `env` is added to every process's environment
    (SHARDCOMPUTE_SECTION__KEY settings override the config file)."""
    # Real engines keep both cores busy: an agent may go a second without running, so the
    # heartbeat timeout is 3 s here (fake-engine clusters test 1 s).
    cluster = LocalCluster(
        tmp,
        world_size,
        api_key=api_key,
        request_timeout=120,
        heartbeat_interval=0.5,
        heartbeat_timeout=3.0,
    )
    with cluster.config.open("a") as f:
        f.write(f"model:\n  name: {REAL_MODEL}\n  path: {model_path}\n  dtype: float32\n")
    cluster.env.update(env)
    try:
        cluster.start_coordinator()
        for rank in range(world_size):
            cluster.spawn(f"agent{rank}", real_agent_command(cluster.url, rank))
        cluster.wait_state("ready", 90)
    except BaseException:
        cluster.stop()
        raise
    return cluster
