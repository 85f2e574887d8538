"""Throw-away X.509 certificates for TLS integration tests, made with ``openssl``.

One call builds, in a temporary directory:

- ``ca``: the test certificate authority the brokers' certificates chain to;
- ``server``: the broker's certificate, SAN ``DNS:localhost, IP:127.0.0.1``;
- ``other_host``: a broker certificate from the same CA but for ``DNS:otherhost``
  only (the wrong-host-name case);
- ``client``: a client certificate from the same CA (``require_certificate``);
- ``stranger_ca``: an unrelated CA, trusted by nobody (the wrong-CA case).

EC P-256 keys keep generation to a few milliseconds. The extensions are the
ones a strict verifier expects (CA basic constraints, key usage, subject and
authority key identifiers), so a failure in a test is about the case under
test, never about a sloppy certificate.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

DAYS = "2"


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class TestCertificates:
    """Everything ``make_certificates`` wrote."""

    __test__ = False  # not a pytest test class despite its name

    directory: Path
    ca: KeyPair
    server: KeyPair
    other_host: KeyPair
    client: KeyPair
    stranger_ca: KeyPair


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr}")


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)
    return path


def _certificate_authority(directory: Path, name: str, common_name: str) -> KeyPair:
    key = _key(directory / f"{name}.key")
    cert = directory / f"{name}.crt"
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", DAYS, "-sha256",
        "-subj", f"/CN={common_name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return KeyPair(cert, key)


def _signed(directory: Path, name: str, ca: KeyPair, common_name: str, extensions: list[str]) -> KeyPair:
    key = _key(directory / f"{name}.key")
    request = directory / f"{name}.csr"
    cert = directory / f"{name}.crt"
    extension_file = directory / f"{name}.ext"
    extension_file.write_text(
        "\n".join([
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid",
            *extensions,
        ]) + "\n"
    )
    _openssl("req", "-new", "-key", str(key), "-out", str(request), "-subj", f"/CN={common_name}")
    _openssl(
        "x509", "-req", "-in", str(request), "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
        "-out", str(cert), "-days", DAYS, "-sha256", "-extfile", str(extension_file),
    )  # fmt: skip
    return KeyPair(cert, key)


def make_certificates(directory: Path) -> TestCertificates:
    """Write a CA, two server certificates, a client certificate and a stranger CA into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _certificate_authority(directory, "ca", "kpm33b test CA")
    server = _signed(directory, "server", ca, "localhost",
                     ["extendedKeyUsage=serverAuth", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
    other_host = _signed(directory, "otherhost", ca, "otherhost",
                         ["extendedKeyUsage=serverAuth", "subjectAltName=DNS:otherhost"])
    client = _signed(directory, "client", ca, "kpm33b-proxy", ["extendedKeyUsage=clientAuth"])
    stranger_ca = _certificate_authority(directory, "stranger-ca", "some other CA")
    return TestCertificates(directory, ca, server, other_host, client, stranger_ca)
