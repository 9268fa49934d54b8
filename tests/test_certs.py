"""`shardcompute certs` makes a CA and host certificates that OpenSSL accepts for the named
IPs and DNS names, keeps private keys 0600, and every bad file is refused by name."""

import ipaddress
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509

from processes import child_env
from shardcompute.certs import CertError, check_server_files, parse_host
from shardcompute.http_client import TlsError, client_ssl_context, http_client


def run_certs(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "shardcompute.cli", "certs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=child_env())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    r = run_certs("--out", str(out), "coordinator=127.0.0.1,localhost,coord.lan", "10.0.0.2")
    assert r.returncode == 0, r.stderr
    return out


def test_files_and_modes(certs):
    names = {p.name: stat.S_IMODE(p.stat().st_mode) for p in certs.iterdir()}
    assert set(names) == {
        "ca.pem", "ca-key.pem", "coordinator.pem", "coordinator-key.pem",
        "10.0.0.2.pem", "10.0.0.2-key.pem",
    }  # fmt: skip
    assert all(mode == 0o600 for name, mode in names.items() if name.endswith("-key.pem"))


def test_host_certificate_names_its_addresses_and_verifies(certs):
    cert = x509.load_pem_x509_certificate((certs / "coordinator.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "coord.lan"]
    r = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", certs / "ca.pem", certs / "10.0.0.2.pem"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and ": OK" in r.stdout, r.stdout + r.stderr


def test_a_second_run_signs_with_the_same_ca(certs):
    ca_before = (certs / "ca.pem").read_bytes()
    r = run_certs("--out", str(certs), "later=::1")
    assert r.returncode == 0 and "reused CA" in r.stdout
    assert (certs / "ca.pem").read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    later = x509.load_pem_x509_certificate((certs / "later.pem").read_bytes())
    later.verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("name=", "names no address"),
        ("bad name=1.2.3.4", "cannot name a file"),
        ("ca=1.2.3.4", "cannot name a file"),
        ("x=not_a_host!", "neither an IP address nor a DNS name"),
    ],
)
def test_bad_host_specs_are_refused(spec, needle):
    with pytest.raises(CertError, match=needle):
        parse_host(spec)


def test_bad_host_spec_on_the_command_line_is_one_line(tmp_path):
    r = run_certs("--out", str(tmp_path), "x=not_a_host!")
    assert r.returncode == 2 and "neither an IP address" in r.stderr
    assert "Traceback" not in r.stderr


def test_server_files_are_checked_by_name(certs, tmp_path):
    check_server_files(certs / "coordinator.pem", certs / "coordinator-key.pem")
    with pytest.raises(CertError, match=f"certificate file {tmp_path}/none.pem does not exist"):
        check_server_files(tmp_path / "none.pem", certs / "coordinator-key.pem")
    with pytest.raises(CertError, match=r"the key in .*10.0.0.2-key.pem does not match .*coord"):
        check_server_files(certs / "coordinator.pem", certs / "10.0.0.2-key.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(CertError, match=f"{junk} is not a PEM certificate"):
        check_server_files(junk, certs / "coordinator-key.pem")
    with pytest.raises(CertError, match=f"{junk} is not an unencrypted PEM private key"):
        check_server_files(certs / "coordinator.pem", junk)


def test_client_ca_files_are_checked_by_name(certs, tmp_path):
    assert isinstance(client_ssl_context(certs / "ca.pem"), ssl.SSLContext)
    with pytest.raises(TlsError, match=f"TLS CA file {tmp_path}/nope.pem does not exist"):
        client_ssl_context(tmp_path / "nope.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("junk\n")
    with pytest.raises(TlsError, match=f"TLS CA file {junk} holds no usable PEM"):
        client_ssl_context(junk)
    with pytest.raises(TlsError, match="is not https://"):
        http_client("http://127.0.0.1:1", ca_file=certs / "ca.pem")
