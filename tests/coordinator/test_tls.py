"""TLS on every hop, with real certificates from `shardcompute certs` and real processes: the
coordinator serves HTTPS, agents and their engines verify it, and the official openai client,
the chat client and the benchmark are served when given the CA. Plain HTTP, an unknown CA and
a worker with the wrong CA are refused, each saying why."""

import json
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from local_cluster import FAKE_ENGINE, LocalCluster, start_cluster

from processes import Processes, chat_replies, child_env, free_port
from shardcompute.certs import CertFiles

MODEL = "smollm2-135m"


def make_certs(out: Path) -> CertFiles:
    """A CA and a certificate for 127.0.0.1, made by the command users run."""
    cmd = [sys.executable, "-m", "shardcompute.cli", "certs", "--out", str(out)]
    r = subprocess.run(
        [*cmd, "coordinator=127.0.0.1,localhost"],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert r.returncode == 0, r.stderr
    return CertFiles(out / "ca.pem", out / "coordinator.pem", out / "coordinator-key.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertFiles:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """A CA that never signed the coordinator's certificate."""
    return make_certs(tmp_path_factory.mktemp("other")).ca


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, certs) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("tls"), tls=certs)
    yield cluster
    cluster.stop()


def openai_client(url: str, ca: Path | None) -> openai.OpenAI:
    verify = ssl.create_default_context(cafile=str(ca)) if ca else True
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        timeout=20,
        http_client=httpx.Client(verify=verify),
    )


def test_openai_client_with_the_ca_is_served_over_https(tls_cluster, certs):
    assert tls_cluster.url.startswith("https://")
    with openai_client(tls_cluster.url, certs.ca) as client:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "secure"}], temperature=0
        )
        assert r.choices[0].message.content == "eruces"
        parts = client.completions.create(model=MODEL, prompt="drawer", stream=True)
        assert "".join(p.choices[0].text for p in parts) == "reward"
    assert tls_cluster.cluster()["state"] == "ready"


def test_plain_http_to_the_tls_port_is_refused(tls_cluster):
    plain = f"http://127.0.0.1:{tls_cluster.port}"
    for path in ("/health", "/v1/models"):
        with pytest.raises(httpx.HTTPError):
            httpx.get(plain + path, timeout=5)


def test_clients_that_do_not_trust_the_ca_are_refused(tls_cluster, other_ca):
    for ca in (other_ca, None):  # an unknown CA, and the system's CAs
        with openai_client(tls_cluster.url, ca) as client:
            with pytest.raises(openai.APIConnectionError):
                client.models.list()
    chat = [sys.executable, "-m", "shardcompute.client.chat", "--coordinator-url",
            tls_cluster.url, "--tls-ca", str(other_ca)]  # fmt: skip
    out = subprocess.run(chat, input="hi\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"does not verify against the CA file {other_ca}" in out.stdout, out.stdout


def test_a_worker_with_a_wrong_ca_cannot_register_and_says_why(tls_cluster, other_ca):
    workers = len(tls_cluster.cluster()["workers"])
    agent = tls_cluster.start_agent("wrong-ca", "--tls-ca", str(other_ca))
    assert agent.wait(30) == 2
    log = tls_cluster.log("wrong-ca")
    assert "cannot register: the certificate of https://127.0.0.1:" in log
    assert f"does not verify against the CA file {other_ca}" in log and "Traceback" not in log
    assert len(tls_cluster.cluster()["workers"]) == workers


def test_chat_client_and_benchmark_verify_with_the_ca(tls_cluster, certs, tmp_path):
    chat = [sys.executable, "-m", "shardcompute.client.chat", "--coordinator-url",
            tls_cluster.url, "--tls-ca", str(certs.ca)]  # fmt: skip
    out = subprocess.run(chat, input="hello\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "olleh" in out.stdout, out.stdout + out.stderr
    report = tmp_path / "bench.json"
    bench = [sys.executable, "scripts/benchmark.py", "--coordinator-url", tls_cluster.url,
             "--tls-ca", str(certs.ca), "--num-requests", "2", "--prompt-tokens", "2",
             "--max-tokens", "4", "--json", str(report)]  # fmt: skip
    out = subprocess.run(bench, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(report.read_text())["errors"] == 0


def test_coordinator_refuses_bad_tls_files_by_name(certs, other_ca, tmp_path):
    base = [sys.executable, "-m", "shardcompute.coordinator", "--port", str(free_port())]
    cases = [
        (certs.cert, other_ca.with_name("coordinator-key.pem"), "does not match the certificate"),
        (tmp_path / "missing.pem", certs.key, f"{tmp_path / 'missing.pem'} does not exist"),
    ]
    for cert, key, needle in cases:
        cmd = [*base, "--tls-cert", str(cert), "--tls-key", str(key)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env())
        assert out.returncode == 2 and needle in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


def test_up_tls_makes_a_ca_and_wires_every_hop(tmp_path):
    procs = Processes(tmp_path)
    logs = tmp_path / "up-logs"
    cmd = [sys.executable, "-m", "shardcompute.coordinator.up", "--workers", "2", "--port",
           str(free_port()), "--tls", "--engine-command", f"{sys.executable} {FAKE_ENGINE}",
           "--log-dir", str(logs), "--ready-timeout", "60", "--prompt", "hello tls"]  # fmt: skip
    try:
        output = procs.run("up", cmd, timeout=120)  # asserts exit code 0
    finally:
        procs.stop()
    assert "ready: https://127.0.0.1:" in output and chat_replies(output) == ["slt olleh"], output
    assert sorted(p.name for p in (logs / "tls").iterdir()) == [
        "ca-key.pem", "ca.pem", "coordinator-key.pem", "coordinator.pem"
    ]  # fmt: skip
