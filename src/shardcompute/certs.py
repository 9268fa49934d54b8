"""`shardcompute certs`: a small CA and per-host server certificates for a cluster, and the
checks the coordinator runs on its certificate and key before it serves HTTPS.

    shardcompute certs --out certs coordinator=10.0.0.5,coord.lan

writes certs/ca.pem, certs/ca-key.pem (made once; later runs sign with it), and
certs/coordinator.pem, certs/coordinator-key.pem. Files holding private keys are 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shardcompute.errors import ShardComputeError

CA_NAME = "ca"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DNS = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?\.)*[A-Za-z0-9-]+$")


class CertError(ShardComputeError):
    """A certificate or key file that is missing, unreadable or does not fit."""


@dataclass(frozen=True)
class HostSpec:
    """One host's certificate: its file name and the IPs and DNS names it answers to."""

    name: str
    addresses: tuple[str, ...]


@dataclass(frozen=True)
class CertFiles:
    """Where a CA and one host certificate were written."""

    ca: Path
    cert: Path
    key: Path


def parse_host(spec: str) -> HostSpec:
    """`[NAME=]ADDR[,ADDR...]`; NAME defaults to the first address."""
    name, sep, rest = spec.partition("=")
    addresses = [a.strip() for a in (rest if sep else spec).split(",") if a.strip()]
    name = name.strip() if sep else (addresses[0] if addresses else "")
    if not addresses:
        raise CertError(f"host {spec!r} names no address; expected [NAME=]ADDR[,ADDR...]")
    if not _NAME.match(name) or name in (CA_NAME, f"{CA_NAME}-key"):
        raise CertError(f"host {spec!r}: {name!r} cannot name a file here; pick another NAME=")
    for a in addresses:
        if not _is_ip(a) and not _DNS.match(a):
            raise CertError(f"host {spec!r}: {a!r} is neither an IP address nor a DNS name")
    return HostSpec(name, tuple(addresses))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def _san(addresses: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(a)) if _is_ip(a) else x509.DNSName(a) for a in addresses
    ]
    return x509.SubjectAlternativeName(names)


def _builder(subject: str, issuer: x509.Name | None, key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    flags = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment")
    flags += ("key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{f: allowed.get(f, False) for f in flags})


def make_ca(common_name: str, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA that may sign host certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = _key_usage(key_cert_sign=True, crl_sign=True)
    cert = (
        _builder(common_name, None, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_host_cert(
    ca_cert: x509.Certificate, ca_key, host: HostSpec, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for `host`, signed by the CA, valid for each of its addresses."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = _key_usage(digital_signature=True)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        _builder(host.name, ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(_san(host.addresses), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def write_pem(path: Path, data: bytes, private: bool) -> None:
    """Write `data`; a private key is created 0600 and stays 0600 if the file existed."""
    if private:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(path: Path) -> x509.Certificate:
    """The first certificate in a PEM file; CertError naming the file otherwise."""
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"certificate file {path} does not exist") from None
    except OSError as e:
        raise CertError(f"cannot read certificate file {path}: {e.strerror}") from None
    except ValueError:
        raise CertError(f"{path} is not a PEM certificate") from None


def load_key(path: Path):
    """An unencrypted PEM private key; CertError naming the file otherwise."""
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"key file {path} does not exist") from None
    except OSError as e:
        raise CertError(f"cannot read key file {path}: {e.strerror}") from None
    except (ValueError, TypeError):
        # TypeError: the key is encrypted; uvicorn would stop to ask for a password.
        raise CertError(f"{path} is not an unencrypted PEM private key") from None


def load_or_make_ca(out: Path, days: int) -> tuple[x509.Certificate, object]:
    """The CA in `out` (ca.pem + ca-key.pem), made if neither exists."""
    cert_path, key_path = out / f"{CA_NAME}.pem", out / f"{CA_NAME}-key.pem"
    if cert_path.exists() or key_path.exists():
        cert, key = load_cert(cert_path), load_key(key_path)
        if cert.public_key() != key.public_key():
            raise CertError(f"CA key {key_path} does not match CA certificate {cert_path}")
        return cert, key
    cert, key = make_ca(f"ShardCompute cluster CA ({out.resolve().name})", days * 4)
    write_pem(key_path, _key_pem(key), private=True)
    write_pem(cert_path, _cert_pem(cert), private=False)
    return cert, key


def make_cluster_certs(out: Path, hosts: list[HostSpec], days: int = 825) -> list[CertFiles]:
    """A CA in `out` (reused if there) and one certificate and key per host."""
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = load_or_make_ca(out, days)
    files = []
    for host in hosts:
        cert, key = make_host_cert(ca_cert, ca_key, host, days)
        cert_path, key_path = out / f"{host.name}.pem", out / f"{host.name}-key.pem"
        write_pem(key_path, _key_pem(key), private=True)
        write_pem(cert_path, _cert_pem(cert), private=False)
        files.append(CertFiles(out / f"{CA_NAME}.pem", cert_path, key_path))
    return files


def check_server_files(cert_file: str | Path, key_file: str | Path) -> None:
    """Refuse, naming the file, a certificate or key the coordinator could not serve with."""
    cert_path, key_path = Path(cert_file).expanduser(), Path(key_file).expanduser()
    cert, key = load_cert(cert_path), load_key(key_path)
    if cert.public_key() != key.public_key():
        raise CertError(f"the key in {key_path} does not match the certificate {cert_path}")
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise CertError(f"certificate {cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shardcompute certs",
        description="Make a cluster CA (once) and a server certificate per host.",
    )
    p.add_argument(
        "hosts",
        nargs="+",
        metavar="[NAME=]ADDR[,ADDR...]",
        help="a host's IPs and DNS names, e.g. coordinator=10.0.0.5,coord.lan",
    )
    p.add_argument("--out", required=True, help="directory for the CA and the host files")
    p.add_argument("--days", type=int, default=825, help="host certificates' validity")
    return p


def certs_main(argv: list[str] | None = None) -> int:
    """Entry point of `shardcompute certs`."""
    args = _parser().parse_args(argv)
    out = Path(args.out)
    try:
        if args.days < 1:
            raise CertError(f"--days must be at least 1, got {args.days}")
        hosts = [parse_host(h) for h in args.hosts]
        made_ca = not (out / f"{CA_NAME}.pem").exists()
        files = make_cluster_certs(out, hosts, args.days)
    except (ShardComputeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'made' if made_ca else 'reused'} CA {files[0].ca} (its key: {out / 'ca-key.pem'})")
    for host, f in zip(hosts, files, strict=True):
        print(f"{host.name} ({', '.join(host.addresses)}): --tls-cert {f.cert} --tls-key {f.key}")
    print(f"workers and clients verify with: --tls-ca {files[0].ca}")
    return 0


if __name__ == "__main__":
    sys.exit(certs_main())
