"""kpm33b_status.py against real brokers: a running system's table and JSON, one meter, failures, nothing published."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt_broker import Amqtt
from broker import Mosquitto, free_port, wait_for
from certs import TestCertificates, make_certificates
from daemons import (
    PUBLISHERS,
    ROOT,
    Collector,
    config_dict,
    publish_all,
    publisher,
    simulated_meters,
    start_config_sender,
    start_proxy,
    write_config,
)
from paho.mqtt.enums import CallbackAPIVersion

from config_loader import BrokerSettings
from kpm33b_status import read_retained, subscription_steps

METERS = ["33B1225950027", "33B1225950028", "33B1225950029"]
NAMED = METERS[0]
STATUS = [sys.executable, str(ROOT / "kpm33b_status.py")]


def environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if not key.startswith("KPM33B_")}


def run_status(config: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The status command to its end; its exit code, standard output and error."""
    return subprocess.run([*STATUS, "--config", str(config), *args], capture_output=True, text=True, timeout=60,
                          env={**environment(), **(env or {})}, cwd=config.parent)


def latest(collector: Collector, topic: str) -> dict[str, Any]:
    payloads = collector.on(topic)
    assert payloads, f"nothing on {topic}"
    return json.loads(payloads[-1])


@pytest.fixture
def running_system(tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> Iterator[
        tuple[Path, Collector]]:
    """Proxy, config sender and three simulated meters, each meter's power and energy retained on the central broker.

    The meters publish one round only: what is retained stays put while the test reads it.
    """
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port,
                                                sections={"health": {"stats_interval_seconds": 1}},
                                                devices={NAMED: {"name": "Heat pump"}}))
    watcher = Collector(central_broker.port, "kpm33b/#")
    start_proxy(config)
    start_config_sender(config)
    meters = simulated_meters(internal_broker.port, METERS, cadence=False)
    meters.publish_round()

    def everything_retained() -> bool:
        devices = watcher.on("kpm33b/bridge/devices")
        stats = watcher.on("kpm33b/bridge/stats")
        return (all(watcher.on(f"kpm33b/{m}/{leaf}") for m in METERS for leaf in ("seconds", "minutes"))
                and bool(devices) and len(json.loads(devices[-1])) == 3
                and bool(stats) and json.loads(stats[-1])["forwarded"] >= 6
                and bool(watcher.on("kpm33b/bridge/config_sender/stats"))
                and all(b'"applied"' in (watcher.on(f"kpm33b/{m}/config_status") or [b""])[-1] for m in METERS))

    wait_for(everything_retained, timeout=30)
    yield config, watcher


def test_the_json_document_shows_each_meter_of_a_running_system(running_system: tuple[Path, Collector]) -> None:
    config, watcher = running_system

    result = run_status(config, "--json")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    document = json.loads(result.stdout)
    assert document["main_topic"] == "kpm33b"
    assert document["bridge"]["state"] == "online"
    assert document["bridge"]["proxy_stats"]["forwarded"] >= 6
    assert document["bridge"]["config_sender_stats"]["meters"] == 3
    assert document["device_list"] is True and document["unreadable"] == []
    assert [meter["id"] for meter in document["meters"]] == METERS
    for meter in document["meters"]:
        power = latest(watcher, f"kpm33b/{meter['id']}/seconds")
        energy = latest(watcher, f"kpm33b/{meter['id']}/minutes")
        assert meter["name"] == ("Heat pump" if meter["id"] == NAMED else f"KPM33B {meter['id']}")
        assert meter["availability"] == "online"
        assert (meter["active_power"], meter["active_power_time"]) == (power["active_power"], power["time"])
        assert (meter["active_energy"], meter["active_energy_time"]) == (energy["active_energy"], energy["time"])
        assert (meter["upload_frequency_seconds"], meter["upload_frequency_minutes"]) == (60, 1)
        status = latest(watcher, f"kpm33b/{meter['id']}/config_status")  # the config sender's, as it runs
        assert (meter["config_state"], meter["config_updated"]) == ("applied", status["updated"])
        assert meter["clock_offset_seconds"] == status["clock_offset_seconds"]


def test_the_table_shows_the_bridge_and_a_row_per_meter_of_a_running_system(
        running_system: tuple[Path, Collector]) -> None:
    config, watcher = running_system

    result = run_status(config)

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[1] == "bridge         online"
    assert lines[2].startswith("proxy          received ") and "forwarded " in lines[2]
    assert lines[3].startswith("config sender  sent ")
    assert lines[5].split()[:3] == ["ID", "NAME", "AVAIL"]
    rows = lines[6:9]
    assert [row.split()[0] for row in rows] == METERS
    for row in rows:
        meter_id = row.split()[0]
        power = latest(watcher, f"kpm33b/{meter_id}/seconds")["active_power"]
        energy = latest(watcher, f"kpm33b/{meter_id}/minutes")["active_energy"]
        assert ("Heat pump" if meter_id == NAMED else f"KPM33B {meter_id}") in row
        assert " online " in row and f" {power!r} kW " in row and f" {energy!r} kWh " in row
        assert " 60 s / 1 min " in row and " applied " in row
    assert lines[9] == "3 meters: 3 online, 0 offline"


def test_one_meter_only(running_system: tuple[Path, Collector]) -> None:
    config, watcher = running_system
    meter_id = METERS[1]

    document = json.loads(run_status(config, "--json", "--meter", meter_id).stdout)
    table = run_status(config, "--meter", meter_id)

    assert [meter["id"] for meter in document["meters"]] == [meter_id]
    assert document["meters"][0]["active_power"] == latest(watcher, f"kpm33b/{meter_id}/seconds")["active_power"]
    assert document["bridge"]["state"] == "online"
    assert table.returncode == 0
    assert [line.split()[0] for line in table.stdout.splitlines()[6:-1]] == [meter_id]
    assert table.stdout.splitlines()[-1] == "1 meter: 1 online, 0 offline"


def test_a_meter_with_nothing_retained_and_an_invalid_meter_id(tmp_path: Path, central_broker: Mosquitto) -> None:
    config = write_config(tmp_path, config_dict(free_port(), central_broker.port))

    nothing = run_status(config, "--meter", METERS[0])
    invalid = run_status(config, "--meter", "kpm33b/#")

    assert nothing.returncode == 1
    assert nothing.stderr == f"kpm33b_status: nothing retained about meter {METERS[0]} on 127.0.0.1:" \
                             f"{central_broker.port}\n"
    assert invalid.returncode == 2 and invalid.stdout == ""
    assert invalid.stderr == "kpm33b_status: --meter 'kpm33b/#' is not a meter id (exactly 13 letters and digits)\n"


def test_the_configuration_status_and_hostile_payloads_as_retained(tmp_path: Path, central_broker: Mosquitto) -> None:
    config = write_config(tmp_path, config_dict(free_port(), central_broker.port))
    client = publisher(central_broker.port)
    retained = [
        (f"kpm33b/{METERS[0]}/config_status", json.dumps({
            "id": METERS[0], "upload_frequency_seconds": 300, "upload_frequency_minutes": 5, "state": "refused",
            "updated": "2026-01-12T16:38:58Z", "clock_offset_seconds": -125.0})),
        (f"kpm33b/{METERS[0]}/availability", "online"),
        (f"kpm33b/{METERS[1]}/seconds", "\x1b[2J{not json"),
        (f"kpm33b/{METERS[1]}/minutes", json.dumps({"time": 5, "active_energy": "12"})),
        ("kpm33b/bridge/devices", "[{"),
        ("kpm33b/bridge/state", "maybe"),
    ]
    for topic, payload in retained:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)

    table = run_status(config)
    document = json.loads(run_status(config, "--json").stdout)

    assert table.returncode == 0 and table.stderr == ""
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[6:8]}
    assert rows[METERS[0]].split()[1:] == ["-", "online", "-", "-", "-", "-", "300", "s", "/", "5", "min",
                                           "refused", "2026-01-12", "16:38", "-2", "min"]
    assert rows[METERS[1]].split()[1:] == ["-"] * 6 + ["-", "/", "-", "-", "-", "-"]
    assert "\x1b" not in table.stdout
    assert table.stdout.splitlines()[1] == "bridge         -"
    assert document["unreadable"] == ["kpm33b/33B1225950028/seconds", "kpm33b/bridge/devices", "kpm33b/bridge/state"]
    assert document["meters"][0]["config_state"] == "refused"
    assert document["meters"][0]["clock_offset_seconds"] == -125.0
    assert document["meters"][1]["active_energy"] is None


def test_an_unreachable_or_refusing_broker_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    refused = run_status(write_config(tmp_path / "refused", config_dict(free_port(), port)))
    unknown = run_status(write_config(tmp_path / "dns", {"central_broker": {"host": "no-such-host.invalid"}}))
    closed = Mosquitto(anonymous=False).start()  # no accounts at all: every log-in refused
    try:
        unauthorised = run_status(write_config(tmp_path / "auth", config_dict(free_port(), closed.port)))
    finally:
        closed.cleanup()

    for result in (refused, unknown, unauthorised):
        assert result.returncode == 2
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1, result.stderr
    assert refused.stderr.startswith(f"kpm33b_status: cannot read the central broker 127.0.0.1:{port}: "
                                     "connection refused")
    assert unknown.stderr.startswith("kpm33b_status: cannot read the central broker no-such-host.invalid:1883: "
                                     "host name not found")
    assert unauthorised.stderr == (f"kpm33b_status: cannot read the central broker 127.0.0.1:{closed.port}: "
                                   "refused the connection: Not authorized\n")


def test_an_invalid_configuration_is_the_loaders_problem_lines_and_exit_code_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"central_broker": {"host": "127.0.0.1", "port": 0, "colour": "red"}})

    result = run_status(config)

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines()[0] == f"Invalid configuration {config}:"
    assert any(line.startswith("  central_broker.port: 0") for line in result.stderr.splitlines())
    assert any(line.startswith("  central_broker.colour: unknown key") for line in result.stderr.splitlines())


def messages_until_marker(collector: Collector, before: int, client: mqtt.Client, marker: str) -> list[str]:
    """The topics the collector got from the ``before``-th on until a marker published now arrives.

    The broker delivers in order: whatever was published before the marker has arrived by then.
    """
    publish_all(client, [(marker, b"x")])
    wait_for(lambda: marker in collector.topics()[before:], timeout=10)
    topics = collector.topics()[before:]
    return topics[:topics.index(marker)]


def test_it_never_publishes_not_even_a_last_will(tmp_path: Path, central_broker: Mosquitto) -> None:
    config = write_config(tmp_path, config_dict(free_port(), central_broker.port))
    client = publisher(central_broker.port)
    for topic, payload in ((f"kpm33b/{METERS[0]}/availability", "online"), ("kpm33b/bridge/state", "online")):
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    everything = Collector(central_broker.port, "#")
    wait_for(lambda: len(everything.topics()) == 2)

    before = len(everything.topics())
    assert run_status(config).returncode == 0
    assert messages_until_marker(everything, before, client, "marker/1") == []

    # Killed while it reads (connected, subscribing): a last will would be published now.
    before = len(everything.topics())
    process = subprocess.Popen([*STATUS, "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=environment())
    try:
        wait_for(lambda: central_broker.log().count(" as kpm33b_status-") == 2, timeout=10)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(10)
    wait_for(lambda: central_broker.log().count("kpm33b_status-") == 4, timeout=10)  # … closed its connection
    assert messages_until_marker(everything, before, client, "marker/2") == []
    # The retained messages are as they were.
    late = Collector(central_broker.port, "kpm33b/#")
    wait_for(lambda: len(late.topics()) == 2)
    assert sorted(late.topics()) == ["kpm33b/33B1225950027/availability", "kpm33b/bridge/state"]


@pytest.fixture
def amqtt_broker() -> Iterator[Amqtt]:
    broker = Amqtt().start()
    yield broker
    broker.cleanup()


def test_protocol_auto_reads_a_broker_that_speaks_only_mqtt_3_1_1(tmp_path: Path, amqtt_broker: Amqtt) -> None:
    config = write_config(tmp_path, config_dict(free_port(), amqtt_broker.port))
    client = publisher_311(amqtt_broker.port)
    client.publish("kpm33b/bridge/state", "online", qos=1, retain=True).wait_for_publish(5)
    client.publish(f"kpm33b/{METERS[0]}/availability", "offline", qos=1, retain=True).wait_for_publish(5)

    result = run_status(config, "--json")

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["bridge"]["state"] == "online"
    assert [(m["id"], m["availability"]) for m in document["meters"]] == [(METERS[0], "offline")]


def publisher_311(port: int) -> mqtt.Client:
    """A connected MQTT 3.1.1 client (amqtt speaks nothing else)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    PUBLISHERS.append(client)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_for(client.is_connected)
    return client


def test_live_readings_arriving_all_the_time_do_not_keep_it_reading(central_broker: Mosquitto) -> None:
    """Only retained messages hold a step open: a busy fleet's live readings would otherwise run to the cap."""
    client = publisher(central_broker.port)
    client.publish(f"kpm33b/{METERS[0]}/availability", "online", qos=1, retain=True).wait_for_publish(5)
    stop = threading.Event()

    def flood() -> None:
        n = 0
        while not stop.wait(0.01):  # 100 live readings a second, never retained
            n += 1
            client.publish(f"kpm33b/{METERS[1]}/seconds", json.dumps({"active_power": n}), qos=0)

    flooding = threading.Thread(target=flood)
    flooding.start()
    try:
        retained = read_retained(BrokerSettings(host="127.0.0.1", port=central_broker.port),
                                 subscription_steps("kpm33b", None), read_seconds=30)
    finally:
        stop.set()
        flooding.join()

    assert retained.complete  # every step went quiet long before the 30 s
    topics = [topic for topic, _payload in retained.messages]
    assert f"kpm33b/{METERS[0]}/availability" in topics
    assert f"kpm33b/{METERS[1]}/seconds" in topics  # the live readings are kept: they are the newest


def test_the_cap_ends_the_reading_and_says_it_is_incomplete(central_broker: Mosquitto) -> None:
    retained = read_retained(BrokerSettings(host="127.0.0.1", port=central_broker.port),
                             subscription_steps("kpm33b", None), read_seconds=0)

    assert retained.complete is False


def test_a_broker_that_never_answers_is_a_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # takes the connection (the kernel's backlog) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = run_status(write_config(tmp_path, config_dict(free_port(), port)))

    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"kpm33b_status: cannot read the central broker 127.0.0.1:{port}: timed out: no answer "
                             "within 5 s (a firewall, the wrong host, or not an MQTT broker?)\n")


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def test_tls_and_credentials_as_the_daemons_use_them_and_a_wrong_ca_in_one_line(
        tmp_path: Path, certificates: TestCertificates) -> None:
    passwords = tmp_path / "passwd"
    passwords.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "reader", "s3cret"], check=True, timeout=30)
    broker = Mosquitto(anonymous=False, extra_config="\n".join([
        f"cafile {certificates.ca.cert}", f"certfile {certificates.server.cert}",
        f"keyfile {certificates.server.key}", f"password_file {passwords}"])).start()
    try:
        client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        PUBLISHERS.append(client)
        client.tls_set(ca_certs=str(certificates.ca.cert))
        client.username_pw_set("reader", "s3cret")
        client.connect("localhost", broker.port)
        client.loop_start()
        client.publish("kpm33b/bridge/state", "online", qos=1, retain=True).wait_for_publish(5)
        trusted = write_config(tmp_path / "trusted", config_dict(free_port(), broker.port, sections={
            "central_broker": {"host": "localhost", "username": "reader",
                               "tls": {"ca_file": str(certificates.ca.cert)}}}))
        stranger = write_config(tmp_path / "stranger", config_dict(free_port(), broker.port, sections={
            "central_broker": {"host": "localhost", "username": "reader",
                               "tls": {"ca_file": str(certificates.stranger_ca.cert)}}}))

        read = run_status(trusted, "--json", env={"KPM33B_CENTRAL_PASSWORD": "s3cret"})
        wrong_password = run_status(trusted, env={"KPM33B_CENTRAL_PASSWORD": "guess"})
        untrusted = run_status(stranger, env={"KPM33B_CENTRAL_PASSWORD": "s3cret"})
    finally:
        broker.cleanup()

    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout)["bridge"]["state"] == "online"
    assert wrong_password.returncode == 2
    assert wrong_password.stderr == (f"kpm33b_status: cannot read the central broker localhost:{broker.port}: "
                                     "refused the connection: Not authorized\n")
    assert untrusted.returncode == 2 and untrusted.stdout == ""
    assert untrusted.stderr.startswith(f"kpm33b_status: cannot read the central broker localhost:{broker.port}: "
                                       "TLS certificate of the broker not accepted")
    assert len(untrusted.stderr.splitlines()) == 1
