"""TLS and authentication towards the central broker, against a real Mosquitto TLS listener.

The certificates are made for each test session by ``certs.make_certificates``
(openssl): a CA, a broker certificate for ``localhost``/``127.0.0.1``, one for
``otherhost`` only, a client certificate, and a CA nobody trusts. The central
broker in these tests has only its TLS listener, so a plaintext attempt would
show in its log ("wrong version number") and could never deliver anything.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from certs import KeyPair, TestCertificates, make_certificates
from daemons import (
    PROXY_SCRIPT,
    ROOT,
    Collector,
    config_dict,
    energies,
    lines_with,
    publish_all,
    publisher,
    start_proxy,
    write_config,
)
from payloads import eny_now, minute

import config_loader

USERNAME = "kpm33b-proxy"
PASSWORD = "env-secret-Xv42-do-not-log"  # distinctive, so that any leak is found
FILE_PASSWORD = "file-secret-Zq81-do-not-log"
TLS_NOT_ACCEPTED = "TLS certificate of the broker not accepted"
PLAINTEXT_ON_TLS = "wrong version number"  # what Mosquitto logs when plain MQTT reaches its TLS listener
FIRST_READING = datetime(2026, 1, 17, 21, 0)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def tls_broker(cleanup: Callable[[Callable[[], object]], None], certificates: TestCertificates,
               server: KeyPair, *, require_certificate: bool = False, password_file: Path | None = None) -> Mosquitto:
    """A central broker whose only listener speaks TLS with ``server``'s certificate."""
    lines = [f"cafile {certificates.ca.cert}", f"certfile {server.cert}", f"keyfile {server.key}"]
    if require_certificate:
        lines.append("require_certificate true")
    if password_file is not None:
        lines.append(f"password_file {password_file}")
    broker = Mosquitto(extra_config="\n".join(lines), anonymous=password_file is None)
    cleanup(broker.cleanup)
    return broker.start()


def password_file(directory: Path, username: str, password: str) -> Path:
    path = directory / "passwd"
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), username, password], check=True, timeout=30)
    return path


def tls_client(certificates: TestCertificates) -> dict[str, Path]:
    """The Collector options of a consumer of the central broker over TLS: the right CA and a client certificate."""
    return {"ca_file": certificates.ca.cert, "cert_file": certificates.client.cert,
            "key_file": certificates.client.key}


def publish_readings(port: int, count: int) -> None:
    """``count`` readings of meter 33B1225950027, one a minute from 21:00, energy 100.0 kWh, 101.0, …"""
    readings = [("MQTT_ENY_NOW", eny_now("33B1225950027", minute(index, FIRST_READING), 100.0 + index))
                for index in range(count)]
    publish_all(publisher(port), readings)  # disconnected when the test ends (conftest)


# --- readings over TLS ---------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_readings_arrive_over_tls(tmp_path, internal_broker, certificates, cleanup, host):
    central = tls_broker(cleanup, certificates, certificates.server)
    live = Collector(central.port, "kpm33b/#", **tls_client(certificates))
    config = write_config(tmp_path, config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"host": host, "tls": {"ca_file": str(certificates.ca.cert)}}}))
    proxy = start_proxy(config)
    publish_readings(internal_broker.port, 3)
    wait_for(lambda: len(live.on("kpm33b/33B1225950027/minutes")) == 3)
    assert energies(live, "33B1225950027") == [100.0, 101.0, 102.0]
    assert f"central broker mqtts://{host}:{central.port}" in proxy.output()
    assert PLAINTEXT_ON_TLS not in central.log()
    assert proxy.terminate() == 0


def test_readings_arrive_with_a_required_client_certificate_and_a_password(
        tmp_path, internal_broker, certificates, cleanup):
    central = tls_broker(cleanup, certificates, certificates.server, require_certificate=True,
                         password_file=password_file(tmp_path, USERNAME, PASSWORD))
    live = Collector(central.port, "kpm33b/#", **tls_client(certificates), username=USERNAME, password=PASSWORD)
    tls = {"ca_file": str(certificates.ca.cert), "cert_file": str(certificates.client.cert),
           "key_file": str(certificates.client.key)}
    config = write_config(tmp_path / "proxy", config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"tls": tls, "username": USERNAME, "password": FILE_PASSWORD}}))
    proxy = start_proxy(config, env={"KPM33B_CENTRAL_PASSWORD": PASSWORD})  # the environment wins
    publish_readings(internal_broker.port, 3)
    wait_for(lambda: len(live.on("kpm33b/33B1225950027/minutes")) == 3)
    assert re.search(rf"New client connected from \S+ as kpm33b-proxy-\S+ \(p5, c1, k60, u'{USERNAME}'\)",
                     central.log())
    assert proxy.terminate() == 0
    output = proxy.output()
    assert PASSWORD not in output and FILE_PASSWORD not in output


# --- what must fail, and how ---------------------------------------------------------------


def test_wrong_ca_is_an_error_naming_the_cause_and_nothing_goes_in_plaintext(
        tmp_path, internal_broker, certificates, cleanup):
    central = tls_broker(cleanup, certificates, certificates.server)
    live = Collector(central.port, "kpm33b/#", **tls_client(certificates))
    config = write_config(tmp_path, config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"tls": {"ca_file": str(certificates.stranger_ca.cert)}}}))
    proxy = start_proxy(config, wait_online=False)
    wait_for(lambda: lines_with(proxy.output(), TLS_NOT_ACCEPTED), timeout=20)
    publish_readings(internal_broker.port, 3)
    wait_for(lambda: "subscribed to" in proxy.output() and proxy.output().count("is online") >= 1, timeout=10)
    # Another refused attempt after the readings were queued: they had every chance to go out.
    failed_before = len(lines_with(proxy.output(), TLS_NOT_ACCEPTED))
    wait_for(lambda: len(lines_with(proxy.output(), TLS_NOT_ACCEPTED)) >= failed_before + 1, timeout=30)
    errors = lines_with(proxy.output(), TLS_NOT_ACCEPTED)
    print(f"\n[wrong CA] {len(errors)} refused TLS attempts; first: {errors[0]}")
    assert all(" ERROR " in line for line in errors)
    assert "certificate verify failed" in errors[0] or "issuer" in errors[0] or "self-signed" in errors[0]
    assert "connected to the central broker" not in proxy.output()
    assert [topic for topic in live.topics() if not topic.startswith("kpm33b/bridge/")] == []
    log = central.log()
    assert "tlsv1 alert unknown ca" in log  # the broker saw TLS handshakes, refused by the proxy
    assert PLAINTEXT_ON_TLS not in log
    assert not re.search(r"New client connected from \S+ as kpm33b-proxy", log)
    assert proxy.alive()
    assert proxy.terminate() == 0


def test_wrong_host_name_is_an_error_naming_the_mismatch(tmp_path, internal_broker, certificates, cleanup):
    central = tls_broker(cleanup, certificates, certificates.other_host)  # valid for "otherhost" only
    config = write_config(tmp_path, config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"host": "localhost", "tls": {"ca_file": str(certificates.ca.cert)}}}))
    proxy = start_proxy(config, wait_online=False)
    wait_for(lambda: len(lines_with(proxy.output(), TLS_NOT_ACCEPTED)) >= 2, timeout=20)
    errors = lines_with(proxy.output(), TLS_NOT_ACCEPTED)
    print(f"\n[wrong host name] {errors[0]}")
    assert all(" ERROR " in line for line in errors)
    assert re.search(r"[Hh]ostname mismatch.*'localhost'", errors[0]), errors[0]
    assert "connected to the central broker" not in proxy.output()
    log = central.log()
    assert PLAINTEXT_ON_TLS not in log
    assert "New client connected" not in log
    assert proxy.terminate() == 0


def test_refused_credentials_are_an_error_retried_slowly_and_the_password_never_shows(
        tmp_path, internal_broker, certificates, cleanup):
    central = tls_broker(cleanup, certificates, certificates.server,
                         password_file=password_file(tmp_path, USERNAME, "the-right-one"))
    config = write_config(tmp_path / "proxy", config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"tls": {"ca_file": str(certificates.ca.cert)}, "username": USERNAME,
                           "password": FILE_PASSWORD}}))
    proxy = start_proxy(config, env={"KPM33B_CENTRAL_PASSWORD": PASSWORD}, wait_online=False)
    refused = "refused the credentials"
    wait_for(lambda: lines_with(proxy.output(), refused), timeout=20)
    observed_from = time.monotonic()
    # Count the attempts over ~10 s: a tight loop would retry every second or two.
    while time.monotonic() - observed_from < 10:
        assert proxy.alive()
        time.sleep(0.5)
    attempts = central.log().count("disconnected, not authorised")
    print(f"\n[refused credentials] connection attempts in ~11 s: {attempts}; {lines_with(proxy.output(), refused)[0]}")
    assert all(" ERROR " in line and "retrying slowly" in line for line in lines_with(proxy.output(), refused))
    assert 1 <= attempts <= 2
    assert proxy.terminate() == 0
    output = proxy.output()
    assert PASSWORD not in output and FILE_PASSWORD not in output

    # --check-config, valid and invalid, and the parsed configuration itself.
    environment = {"KPM33B_CENTRAL_PASSWORD": PASSWORD}
    checked = subprocess.run([sys.executable, str(ROOT / PROXY_SCRIPT), "--config", str(config), "--check-config"],
                             capture_output=True, text=True, timeout=30, env={**_base_env(), **environment})
    assert checked.returncode == 0, checked.stderr
    assert f"mqtts://{USERNAME}:***@127.0.0.1:{central.port}" in checked.stdout
    # A typo'd key holding the password, and a password YAML reads as a number (not allowed).
    typo = write_config(tmp_path / "typo", config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"username": USERNAME, "pasword": FILE_PASSWORD}}))
    numeric = write_config(tmp_path / "numeric", config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"username": USERNAME, "password": 987_654_321}}))
    outputs = [checked.stdout + checked.stderr]
    for broken, problem in ((typo, "central_broker.pasword: unknown key"), (numeric, "central_broker.password: ")):
        rejected = subprocess.run([sys.executable, str(ROOT / PROXY_SCRIPT), "--config", str(broken),
                                   "--check-config"], capture_output=True, text=True, timeout=30, env=_base_env())
        assert rejected.returncode == 2
        assert problem in rejected.stderr
        outputs.append(rejected.stdout + rejected.stderr)
    for text in outputs:
        assert PASSWORD not in text and FILE_PASSWORD not in text and "987654321" not in text, text
    loaded = config_loader.load_config(config, environment)
    assert loaded.central_broker.password == PASSWORD
    for text in (repr(loaded), str(loaded), repr(loaded.central_broker), config_loader.describe(loaded)):
        assert PASSWORD not in text and FILE_PASSWORD not in text


def _base_env() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if not key.startswith("KPM33B_")}
