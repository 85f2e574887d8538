"""Any central broker: one that speaks only MQTT 3.1.1, one that announces limits, and honest diagnoses.

Users point ``central_broker`` at whatever broker their installation runs.
Against real brokers started by each test (amqtt for a broker that speaks only
MQTT 3.1.1; Mosquitto with ``retain_available false``, ``max_qos 0`` and
``max_packet_size 512`` for the limits a broker announces in its CONNACK; a
TCP server that never answers; a TLS listener spoken to in plain text), both
daemons run as real processes and what they log and deliver is checked. The
pure pieces (packet sizes, the CONNACK's limits, the hints) are tested without
a broker at the end.
"""

from __future__ import annotations

import json
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from amqtt_broker import Amqtt
from broker import Mosquitto, wait_for
from certs import TestCertificates, make_certificates
from daemons import Collector, DaemonProcess, config_dict, publish_all, publisher, write_config
from paho.mqtt.client import DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

import mqtt_client
from config_loader import BrokerSettings
from mqtt_client import BrokerLimits, ConnectionReporter, broker_limits, publish_packet_size, tls_hint
from tools.meter_simulator import MeterSimulator, encode_payload, eny_now_payload, rt_data_payload

PROXY = "kpm33b_proxy.py"
SENDER = "config_sender.py"
METER = "33B1225950027"
ROUNDS = 5  # one seconds and one minutes reading of METER each
TAKEN_OVER = "took over the session"
CONNACK_TIMEOUT = 10.0

Cleanup = Callable[[Callable[[], object]], None]


# --- helpers -------------------------------------------------------------------------------------


class Consumer311:
    """A consumer speaking MQTT 3.1.1, for a broker that speaks nothing else."""

    def __init__(self, port: int, *topics: str) -> None:
        self._lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"consumer-{port}",
                                  protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_connect = lambda client, *_: client.subscribe([(topic, 1) for topic in topics])
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "the consumer could not subscribe"

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def on(self, topic: str) -> list[bytes]:
        with self._lock:
            return [payload for t, payload in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def daemon(cleanup: Cleanup, script: str, config: Path) -> DaemonProcess:
    process = DaemonProcess(script, config)
    cleanup(lambda: process.kill() if process.alive() else None)
    return process


def answering_meter(cleanup: Cleanup, port: int) -> MeterSimulator:
    """METER on the internal broker, answering commands at once (its readings come from ``send_readings``)."""
    simulator = MeterSimulator("127.0.0.1", port, [METER])
    simulator.start(cadence=False)
    cleanup(simulator.stop)
    assert simulator.wait_connected(10)
    return simulator


def send_readings(cleanup: Cleanup, port: int, rounds: int) -> None:
    """``rounds`` seconds and minutes readings of METER, each with its own second of meter time up to now."""
    rng = random.Random(1)
    start = datetime.now().replace(microsecond=0) - timedelta(seconds=rounds)
    messages: list[tuple[str, bytes | str]] = []
    for index in range(rounds):
        when = start + timedelta(seconds=index + 1)
        messages.append(("MQTT_RT_DATA", encode_payload(rt_data_payload(METER, when, rng))))
        messages.append(("MQTT_ENY_NOW", encode_payload(eny_now_payload(METER, when, 100.0 + index / 1000))))
    feeder = publisher(port)
    cleanup(lambda: (feeder.disconnect(), feeder.loop_stop()))
    publish_all(feeder, messages)


def lines(process: DaemonProcess, text: str, level: str = "") -> list[str]:
    """The log lines containing ``text`` (and `` LEVEL `` when given)."""
    return [line for line in process.output().splitlines()
            if text in line and (not level or f" {level} " in line)]


def connections(log: str, client_prefix: str) -> int:
    """How many times clients whose id starts with ``client_prefix`` connected, by Mosquitto's log."""
    return len(re.findall(rf"New client connected from \S+ as {re.escape(client_prefix)}\S* \(", log))


def latest_stats(collector: Collector) -> dict[str, Any] | None:
    payloads = collector.on("kpm33b/bridge/stats")
    return json.loads(payloads[-1]) if payloads else None


def assert_online_once(states: list[bytes]) -> None:
    """``bridge/state`` went online once and stayed so (connected centrally before it was subscribed
    internally, the proxy says "offline" first)."""
    assert states in ([b"online"], [b"offline", b"online"]), states


def limited_broker(cleanup: Cleanup, setting: str) -> Mosquitto:
    """A central Mosquitto with one limit it announces in its CONNACK."""
    broker = Mosquitto(extra_config=f"{setting}\nlog_type information")
    cleanup(broker.cleanup)
    return broker.start()


@pytest.fixture
def amqtt_broker() -> Iterator[Amqtt]:
    broker = Amqtt().start()
    yield broker
    broker.cleanup()


# --- a broker that speaks only MQTT 3.1.1 ----------------------------------------------------------


@pytest.mark.parametrize("protocol", ["auto", "3.1.1"])
def test_both_daemons_work_end_to_end_with_a_broker_that_speaks_only_mqtt_3_1_1(
        tmp_path: Path, internal_broker: Mosquitto, amqtt_broker: Amqtt, cleanup: Cleanup, protocol: str) -> None:
    consumer = Consumer311(amqtt_broker.port, "kpm33b/#")
    cleanup(consumer.close)
    document = config_dict(internal_broker.port, amqtt_broker.port)
    document["central_broker"]["protocol"] = protocol
    config = write_config(tmp_path, document)
    started = time.monotonic()
    proxy = daemon(cleanup, PROXY, config)
    # auto: the proxy's MQTT 5 CONNECT (with its will) gets no answer from amqtt at all, so the
    # connect timeout decides; the config sender's (without a will) is refused at once.
    wait_for(lambda: consumer.on("kpm33b/bridge/state") or not proxy.alive(), timeout=CONNACK_TIMEOUT + 20)
    online_after = time.monotonic() - started
    assert proxy.alive(), proxy.output()
    # The config sender connects once the proxy's subscriptions are in place: amqtt 0.12 drops a
    # connection whose start meets another client's first subscription to a filter (RuntimeError:
    # dictionary changed size during iteration, in its own log), a fault of that broker alone.
    wait_for(lambda: lines(proxy, "subscribed on the central broker") or not proxy.alive(), timeout=10)
    sender = daemon(cleanup, SENDER, config)
    answering_meter(cleanup, internal_broker.port)
    send_readings(cleanup, internal_broker.port, ROUNDS)
    wait_for(lambda: len(consumer.on(f"kpm33b/{METER}/seconds")) == ROUNDS
             and len(consumer.on(f"kpm33b/{METER}/minutes")) == ROUNDS, timeout=20)
    # The config sender found the meter on amqtt and configured it through the internal broker.
    wait_for(lambda: len(lines(sender, f"meter {METER} acknowledged")) == 2, timeout=20)
    print(f"\n[amqtt, protocol {protocol}] bridge online after {online_after:.1f} s; "
          f"{len(consumer.on(f'kpm33b/{METER}/seconds')) + len(consumer.on(f'kpm33b/{METER}/minutes'))} "
          f"readings arrived")
    for process, name in ((proxy, "proxy"), (sender, "config sender")):
        in_use = lines(process, "using MQTT 3.1.1 with the central broker", "INFO")
        assert len(in_use) == 1, (name, process.output())
        print(f"[amqtt, protocol {protocol}] {name}: {in_use[0].split(': ', 1)[1]}")
        losses = lines(process, "under MQTT 3.1.1 the central broker", "WARNING")
        assert len(losses) == 1, (name, process.output())
        print(f"[amqtt, protocol {protocol}] {name}: {losses[0].split(': ', 1)[1]}")
        output = process.output()
        assert "disconnected from the central broker" not in output
        assert TAKEN_OVER not in output
        assert "Traceback" not in output
    assert "cannot report refused publishes" in lines(proxy, "under MQTT 3.1.1 the central broker")[0]
    if protocol == "auto":
        (timeout_line,) = lines(proxy, "no answer from the central broker", "WARNING")
        print(f"[amqtt, auto] proxy: {timeout_line.split(': ', 1)[1]}")
        assert "not an MQTT broker" in timeout_line and "MQTT 5" in timeout_line and "TLS" in timeout_line
        assert "trying MQTT 3.1.1" in timeout_line
        (refused_line,) = lines(sender, "does not speak MQTT 5", "INFO")
        print(f"[amqtt, auto] config sender: {refused_line.split(': ', 1)[1]}")
        assert CONNACK_TIMEOUT <= online_after < CONNACK_TIMEOUT + 10
        assert "Invalid protocol from" in amqtt_broker.log()  # the MQTT 5 attempts it refused
    else:
        assert online_after < 10
        # 3.1.1 from the first attempt on: amqtt never saw an MQTT 5 CONNECT.
        assert "Invalid protocol" not in amqtt_broker.log()
        assert lines(proxy, "MQTT 5 with the central broker") == lines(sender, "MQTT 5 with the central broker") == []
    states = consumer.on("kpm33b/bridge/state")
    assert_online_once(states)
    assert proxy.terminate() == 0
    assert sender.terminate() == 0
    assert consumer.on("kpm33b/bridge/state")[len(states):] == [b"offline"]


# --- limits Mosquitto announces in its CONNACK --------------------------------------------------------


@pytest.mark.parametrize(("setting", "fix", "what"), [
    ("retain_available false", "retain_available true", "Retain not supported"),
    ("max_qos 0", "max_qos 1", "QoS not supported"),
])
def test_a_broker_without_retained_messages_or_qos_1_is_one_error_naming_the_setting_to_change(
        tmp_path: Path, internal_broker: Mosquitto, cleanup: Cleanup, setting: str, fix: str, what: str) -> None:
    central = limited_broker(cleanup, setting)
    observer = Collector(central.port, "kpm33b/#")
    cleanup(observer.close)
    document = config_dict(internal_broker.port, central.port)
    document["health"] = {"stats_interval_seconds": 1}
    config = write_config(tmp_path, document)

    # The proxy's last will (bridge/state) is retained at QoS 1: the broker refuses its CONNECT.
    before = len(re.findall(r"New connection from ", central.log()))
    proxy = daemon(cleanup, PROXY, config)
    wait_for(lambda: lines(proxy, fix, "ERROR") or not proxy.alive(), timeout=20)
    observed_from = time.monotonic()
    while time.monotonic() - observed_from < 5:  # a quick retry would come within 1-3 s
        assert proxy.alive()
        time.sleep(0.25)
    (error,) = lines(proxy, fix, "ERROR")
    print(f"\n[{setting}] proxy: {error.split(': ', 1)[1]}")
    assert what in error and "retrying slowly" in error
    attempts = len(re.findall(r"New connection from ", central.log())) - before
    print(f"[{setting}] proxy connection attempts in the first ~5 s: {attempts}")
    assert attempts == 1
    output = proxy.output()
    assert "disconnected from the central broker" not in output  # no "(Protocol error)" after the refusal
    assert TAKEN_OVER not in output and "Traceback" not in output

    # The config sender (no will) is accepted; it adapts what it publishes and says so once.
    sender = daemon(cleanup, SENDER, config)
    wait_for(lambda: "ready: subscribed on both brokers" in sender.output() or not sender.alive(), timeout=20)
    assert sender.alive(), sender.output()
    stand_in = publisher(central.port)
    cleanup(lambda: (stand_in.disconnect(), stand_in.loop_stop()))
    stand_in.publish(f"kpm33b/{METER}/availability", "online", qos=0).wait_for_publish(5)
    wait_for(lambda: lines(sender, f"discovered meter {METER}"), timeout=10)
    # Several stats intervals: each publish would otherwise get the sender disconnected.
    wait_for(lambda: len(observer.on("kpm33b/bridge/config_sender/stats")) >= 4, timeout=20)
    (error,) = lines(sender, fix, "ERROR")
    print(f"[{setting}] config sender: {error.split(': ', 1)[1]}")
    output = sender.output()
    assert connections(central.log(), "kpm33b-config-sender-") == 1
    assert "disconnected from the central broker" not in output
    assert TAKEN_OVER not in output and "Traceback" not in output
    assert sender.terminate() == 0
    assert proxy.terminate() == 0


def test_messages_larger_than_the_brokers_maximum_packet_size_are_dropped_counted_and_readings_flow(
        tmp_path: Path, internal_broker: Mosquitto, cleanup: Cleanup) -> None:
    central = limited_broker(cleanup, "max_packet_size 512")
    observer = Collector(central.port, "kpm33b/#", "homeassistant/#")
    cleanup(observer.close)
    document = config_dict(internal_broker.port, central.port)
    document["health"] = {"stats_interval_seconds": 1}
    config = write_config(tmp_path, document)
    proxy = daemon(cleanup, PROXY, config)
    wait_for(lambda: observer.on("kpm33b/bridge/state") or not proxy.alive(), timeout=20)
    assert proxy.alive(), proxy.output()
    send_readings(cleanup, internal_broker.port, ROUNDS)
    wait_for(lambda: len(observer.on(f"kpm33b/{METER}/seconds")) == ROUNDS
             and len(observer.on(f"kpm33b/{METER}/minutes")) == ROUNDS, timeout=20)

    def settled() -> dict[str, Any] | None:
        stats = latest_stats(observer)
        return stats if stats is not None and stats["forwarded"] == 2 * ROUNDS else None

    stats = wait_for(settled, timeout=10)
    assert isinstance(stats, dict)
    too_large = lines(proxy, "more than the 512 bytes the central broker accepts", "WARNING")
    print(f"\n[max_packet_size 512] stats: {json.dumps(stats)}; first of {len(too_large)} warnings: "
          f"{too_large[0].split(': ', 1)[1] if too_large else None}")
    # Home Assistant's four discovery configs of the meter (660 to 840 bytes) and the bridge's four
    # counters (570 to 630 bytes) never went out; only the bridge's connection state (489 bytes) did.
    assert stats["dropped"] == {"too_large": 8}
    sizes = {topic: int(size) for topic, size in
             (re.search(r"not sent: (\S+) is (\d+) bytes", line).groups() for line in too_large)}  # type: ignore[union-attr]
    assert set(sizes) == {*(f"homeassistant/sensor/kpm33b_{METER}/{object_id}/config"
                            for object_id in ("active_power", "active_energy", "configuration", "clock_offset")),
                          *(f"homeassistant/sensor/kpm33b_bridge/{object_id}/config"
                            for object_id in ("readings_forwarded", "readings_dropped", "queue_depth",
                                              "meters_online"))}
    assert all(size > 512 for size in sizes.values())
    assert [topic for topic in observer.topics() if topic.startswith("homeassistant/") and topic.endswith("/config")
            ] == ["homeassistant/binary_sensor/kpm33b_bridge/connection_state/config"]
    # One connection all along: bridge/state never flapped.
    assert_online_once(observer.on("kpm33b/bridge/state"))
    assert connections(central.log(), "kpm33b-proxy-") == 1
    output = proxy.output()
    assert "disconnected from the central broker" not in output and "Traceback" not in output
    assert proxy.terminate() == 0


# --- subscriptions a broker refuses ---------------------------------------------------------------


def dynsec_broker(cleanup: Cleanup, directory: Path, refused: str) -> Mosquitto:
    """A central Mosquitto whose dynamic-security plugin refuses every subscription to ``refused``.

    Mosquitto's plain ACL file grants any subscription and filters what it
    delivers; the dynamic-security plugin (shipped with Debian's mosquitto)
    refuses in the SUBACK, as brokers with subscription ACLs do.
    """
    plugins = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so"))  # /usr/lib/<multiarch>/
    assert plugins, "mosquitto's dynamic-security plugin is missing (Debian's mosquitto package ships it)"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "dynsec.json").write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": True, "unsubscribe": True},
        "clients": [],
        "groups": [{"groupname": "anonymous", "roles": [{"rolename": "limited"}]}],
        "anonymousGroup": "anonymous",
        "roles": [{"rolename": "limited",
                   "acls": [{"acltype": "subscribePattern", "topic": refused, "priority": 0, "allow": False}]}],
    }))
    broker = Mosquitto(extra_config=f"plugin {plugins[0]}\nplugin_opt_config_file {directory / 'dynsec.json'}")
    cleanup(broker.cleanup)
    return broker.start()


@pytest.mark.parametrize(("protocol", "reason"), [("5", "Not authorized"), ("3.1.1", "Unspecified error")])
def test_a_central_subscription_the_broker_refuses_is_an_error_naming_it_and_what_goes_without_it(
        tmp_path: Path, internal_broker: Mosquitto, cleanup: Cleanup, protocol: str, reason: str) -> None:
    central = dynsec_broker(cleanup, tmp_path / "central", "kpm33b/+/availability")
    observer = Collector(central.port, "kpm33b/#")
    cleanup(observer.close)
    document = config_dict(internal_broker.port, central.port)
    document["central_broker"]["protocol"] = protocol
    proxy = daemon(cleanup, PROXY, write_config(tmp_path, document))
    wait_for(lambda: lines(proxy, "subscribed on the central broker") or not proxy.alive(), timeout=20)
    (refused,) = lines(proxy, "the central broker refused the subscription", "ERROR")
    print(f"\n[protocol {protocol}] proxy: {refused.split(': ', 1)[1]}")
    assert f"kpm33b/+/availability ({reason})" in refused
    assert "never marked offline" in refused
    (granted,) = lines(proxy, "subscribed on the central broker", "INFO")
    assert "homeassistant/status" in granted and "kpm33b/+/availability" not in granted
    # The readings flow all the same.
    send_readings(cleanup, internal_broker.port, ROUNDS)
    wait_for(lambda: len(observer.on(f"kpm33b/{METER}/seconds")) == ROUNDS
             and len(observer.on(f"kpm33b/{METER}/minutes")) == ROUNDS, timeout=20)
    output = proxy.output()
    assert "disconnected from the central broker" not in output and "Traceback" not in output
    # The config sender's first filter is the same: it names it too.
    sender = daemon(cleanup, SENDER, write_config(tmp_path, document))
    wait_for(lambda: lines(sender, "refused the subscription") or not sender.alive(), timeout=20)
    (refused,) = lines(sender, "the central broker refused the subscription", "ERROR")
    print(f"[protocol {protocol}] config sender: {refused.split(': ', 1)[1]}")
    assert refused.endswith(f"to the meter topics: kpm33b/+/availability ({reason})")
    assert sender.terminate() == 0
    assert proxy.terminate() == 0


# --- honest diagnoses ------------------------------------------------------------------------------


def test_two_quick_restarts_of_the_central_broker_are_neither_a_second_instance_nor_slowed_down(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto, cleanup: Cleanup) -> None:
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port))
    proxy = daemon(cleanup, PROXY, config)
    connected = "connected to the central broker"
    wait_for(lambda: lines(proxy, connected) or not proxy.alive(), timeout=20)
    for restart in (1, 2):
        central_broker.restart()
        wait_for(lambda restart=restart: len(lines(proxy, connected)) == restart + 1, timeout=20)
    output = proxy.output()
    for line in lines(proxy, "central broker", "WARNING") + lines(proxy, "central broker", "ERROR"):
        print(f"\n[two quick restarts] {line.split(': ', 1)[1]}")
    assert TAKEN_OVER not in output
    assert "retrying slowly" not in output
    assert len(lines(proxy, "disconnected from the central broker", "WARNING")) == 2
    consumer = Collector(central_broker.port, "kpm33b/+/minutes")
    cleanup(consumer.close)
    send_readings(cleanup, internal_broker.port, 1)
    wait_for(lambda: consumer.on(f"kpm33b/{METER}/minutes"), timeout=10)
    assert proxy.terminate() == 0


class SilentServer:
    """A TCP server that accepts connections and never says a word: not an MQTT broker."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _address = self.listener.accept()
            except OSError:
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.listener.close()
        for connection in self.accepted:
            connection.close()


def test_no_connack_within_the_connect_timeout_is_a_warning_naming_the_likely_causes_then_retried(
        tmp_path: Path, internal_broker: Mosquitto, cleanup: Cleanup) -> None:
    silent = SilentServer()
    cleanup(silent.close)
    document = config_dict(internal_broker.port, silent.port)
    document["central_broker"]["protocol"] = 5
    proxy = daemon(cleanup, PROXY, write_config(tmp_path, document))
    wait_for(lambda: len(silent.accepted) == 1, timeout=10)
    first_attempt = time.monotonic()
    wait_for(lambda: lines(proxy, "no answer from the central broker"), timeout=CONNACK_TIMEOUT + 5)
    waited = time.monotonic() - first_attempt
    wait_for(lambda: len(silent.accepted) == 2, timeout=10)  # the usual backoff: 1-2 s
    (warning,) = lines(proxy, "no answer from the central broker")
    print(f"\n[silent server] after {waited:.1f} s: {warning.split(': ', 1)[1]}")
    assert " WARNING " in warning
    assert f"within {CONNACK_TIMEOUT:g} s" in warning
    for cause in ("not an MQTT broker", "does not understand MQTT 5", "TLS"):
        assert cause in warning
    assert CONNACK_TIMEOUT - 1 <= waited < CONNACK_TIMEOUT + 3
    assert "disconnected from the central broker" not in proxy.output()
    assert proxy.terminate() == 0


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> TestCertificates:
    return make_certificates(tmp_path_factory.mktemp("certificates"))


def test_plain_mqtt_to_a_tls_port_is_a_warning_that_mentions_tls_not_a_second_instance(
        tmp_path: Path, internal_broker: Mosquitto, certificates: TestCertificates, cleanup: Cleanup) -> None:
    server = certificates.server
    central = Mosquitto(extra_config=f"cafile {certificates.ca.cert}\ncertfile {server.cert}\nkeyfile {server.key}")
    cleanup(central.cleanup)
    central.start()
    proxy = daemon(cleanup, PROXY, write_config(tmp_path, config_dict(internal_broker.port, central.port)))
    closed = "closed the connection before answering the CONNECT"
    # auto: MQTT 5 first (closed: try 3.1.1), then 3.1.1 (closed too: that is no version problem).
    wait_for(lambda: len(lines(proxy, closed, "WARNING")) >= 2 or not proxy.alive(), timeout=30)
    warnings = lines(proxy, closed, "WARNING")
    for warning in warnings:
        print(f"\n[plain MQTT to a TLS port] {warning.split(': ', 1)[1]}")
        assert "TLS port spoken to in plain text" in warning
    output = proxy.output()
    assert TAKEN_OVER not in output and "retrying slowly" not in output
    assert "disconnected from the central broker" not in output
    assert "connected to the central broker" not in output
    assert proxy.terminate() == 0


def test_tls_to_a_plain_port_is_an_error_that_suggests_plain_mqtt(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto, certificates: TestCertificates,
        cleanup: Cleanup) -> None:
    document = config_dict(internal_broker.port, central_broker.port)
    document["central_broker"]["tls"] = {"ca_file": str(certificates.ca.cert)}
    proxy = daemon(cleanup, PROXY, write_config(tmp_path, document))
    wait_for(lambda: lines(proxy, "cannot connect to the central broker") or not proxy.alive(), timeout=20)
    error = lines(proxy, "cannot connect to the central broker")[0]
    print(f"\n[TLS to a plain port] {error.split(': ', 1)[1]}")
    assert " ERROR " in error
    assert f"does port {central_broker.port} speak plain MQTT? check central_broker.port and .tls" in error
    assert proxy.terminate() == 0


# --- MQTT 3.1.1 towards the internal broker: the persistent session stays ---------------------------


def test_the_proxys_session_on_an_internal_broker_spoken_to_in_mqtt_3_1_1_outlives_a_restart(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto, cleanup: Cleanup) -> None:
    consumer = Collector(central_broker.port, "kpm33b/+/minutes")
    cleanup(consumer.close)
    document = config_dict(internal_broker.port, central_broker.port)
    document["internal_broker"]["protocol"] = "3.1.1"
    config = write_config(tmp_path, document)
    proxy = daemon(cleanup, PROXY, config)
    wait_for(lambda: "bridge state online" in proxy.output() or not proxy.alive(), timeout=20)
    assert proxy.terminate() == 0
    # Published while the proxy is away: the broker keeps them in the proxy's session.
    send_readings(cleanup, internal_broker.port, ROUNDS)
    proxy = daemon(cleanup, PROXY, config)
    wait_for(lambda: len(consumer.on(f"kpm33b/{METER}/minutes")) == ROUNDS, timeout=20)
    # MQTT 3.1.1 ("p2") without a clean session ("c0"), both times.
    assert len(re.findall(r"New client connected from \S+ as kpm33b-proxy \(p2, c0, ", internal_broker.log())) == 2
    assert len(lines(proxy, "using MQTT 3.1.1 with the internal broker", "INFO")) == 1
    (losses,) = lines(proxy, "under MQTT 3.1.1 the internal broker", "WARNING")
    print(f"\n[internal broker, MQTT 3.1.1] {losses.split(': ', 1)[1]}")
    assert proxy.terminate() == 0


# --- the pure pieces ---------------------------------------------------------------------------------


def test_the_computed_packet_size_is_exact_against_mosquittos_maximum_packet_size(cleanup: Cleanup) -> None:
    """The largest message the proxy would send is taken, and the count is exact to the byte.

    MQTT 5 counts the whole packet; Mosquitto 2.0 leaves out the remaining
    length's own bytes (two here), so it still takes 514 bytes and closes the
    connection at 515. Counting as MQTT 5 says is the safe side for any broker,
    and an error of one byte either way would change one of the outcomes.
    """
    central = limited_broker(cleanup, "max_packet_size 512")
    topic = "kpm33b/33B1225950027/seconds"
    payload_size = max(size for size in range(600) if publish_packet_size(topic, size, 1, mqtt5=True) <= 512)
    assert publish_packet_size(topic, payload_size, 1, mqtt5=True) == 512
    outcomes: list[str] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="packet-size", protocol=MQTTProtocolVersion.MQTTv5)
    client.on_publish = lambda _c, _u, _mid, reason_code, _p: outcomes.append(f"acked: {reason_code}")
    client.on_disconnect = lambda _c, _u, _f, reason_code, _p: outcomes.append(f"closed: {reason_code}")
    client.connect("127.0.0.1", central.port)
    client.loop_start()
    cleanup(client.loop_stop)
    wait_for(client.is_connected)
    for extra in (0, 2, 3):
        client.publish(topic, b"x" * (payload_size + extra), qos=1)
        wait_for(lambda extra=extra: len(outcomes) > [0, 2, 3].index(extra), timeout=5)
    assert outcomes[:3] == ["acked: No matching subscribers", "acked: No matching subscribers",
                            "closed: Packet too large"]


def test_every_connection_of_a_daemon_sends_without_nagles_algorithm(cleanup: Cleanup) -> None:
    """Each MQTT packet leaves at once: no small write waits for the ACK of the one before.

    With Nagle's algorithm a PUBLISH or PUBACK written while an earlier small
    segment is unacknowledged waits for that ACK, which the peer may delay
    by 40 ms (delayed ACK): the stalls of the latency benchmark. paho writes
    whole packets and leaves the option alone, so the daemons' clients (built
    by ``make_client``, run by a ``ConnectionReporter``) set TCP_NODELAY, on
    every connection, reconnections included.
    """
    broker = Mosquitto()
    cleanup(broker.cleanup)
    broker.start()
    settings = BrokerSettings(host="127.0.0.1", port=broker.port)
    client = mqtt_client.make_client(settings, "nodelay-test")
    ConnectionReporter(client, "central", settings, logging.getLogger("test_nodelay"))
    mqtt_client.connect_in_background(client, settings)
    cleanup(lambda: (client.disconnect(), client.loop_stop()))
    sockets = []
    for _connection in range(2):
        wait_for(lambda: client.is_connected() and client.socket() not in sockets, timeout=30)
        sock = client.socket()
        assert sock is not None
        sockets.append(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        broker.restart()  # the next connection is a new socket


@pytest.mark.parametrize(("topic", "payload", "qos", "mqtt5", "size"), [
    ("a/b", 0, 0, False, 7),  # 1 type, 1 length, 2+3 topic
    ("a/b", 10, 1, False, 19),  # + 2 packet id + 10
    ("a/b", 10, 1, True, 20),  # + 1 properties length
    ("a/b", 114, 1, True, 124),  # remaining length 122: still one byte
    ("a/b", 120, 1, True, 131),  # remaining length 128: two bytes
    ("kpm33b/é", 0, 1, True, 16),  # the topic counts in UTF-8 bytes: 9, not 8
])
def test_publish_packet_size(topic: str, payload: int, qos: int, mqtt5: bool, size: int) -> None:
    assert publish_packet_size(topic, payload, qos, mqtt5) == size


def test_broker_limits_are_read_from_the_connack_and_nonsense_counts_as_not_announced() -> None:
    connack = Properties(PacketTypes.CONNACK)
    assert broker_limits(connack) == BrokerLimits(retain_available=True, maximum_qos=2, maximum_packet_size=None)
    connack.RetainAvailable = 0
    connack.MaximumQoS = 0
    connack.MaximumPacketSize = 512
    assert broker_limits(connack) == BrokerLimits(retain_available=False, maximum_qos=0, maximum_packet_size=512)
    assert broker_limits(None) == BrokerLimits()

    class Hostile:
        RetainAvailable = "no"
        MaximumQoS = 7
        MaximumPacketSize = -1

    assert broker_limits(Hostile()) == BrokerLimits()


@pytest.mark.parametrize(("port", "tls", "hint"), [
    (8883, False, "port 8883 usually speaks MQTT over TLS: set central_broker.tls"),
    (443, False, "port 443 usually speaks MQTT over TLS: set central_broker.tls"),
    (1883, True, "port 1883 usually speaks plain MQTT: check central_broker.port and central_broker.tls"),
    (8883, True, ""),
    (1883, False, ""),
    (18830, False, ""),
])
def test_tls_hint_from_the_port_and_the_setting(port: int, tls: bool, hint: str) -> None:
    assert tls_hint(port, tls, "central_broker") == hint


# --- the reporter's reasoning, without a broker ------------------------------------------------------


class Clock:
    """Stands in for time.monotonic in mqtt_client."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reporter(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Iterator[tuple[Any, Clock]]:
    clock = Clock()
    monkeypatch.setattr(mqtt_client.time, "monotonic", clock)
    caplog.set_level(logging.DEBUG, logger="test_reporter")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test", protocol=MQTTProtocolVersion.MQTTv5)
    settings = BrokerSettings(host="broker", port=1883)
    yield ConnectionReporter(client, "central", settings, logging.getLogger("test_reporter")), clock


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= level]


def connack(name: str = "Success") -> ReasonCode:
    return ReasonCode(PacketTypes.CONNACK, name)


LOST = ReasonCode(PacketTypes.DISCONNECT, "Unspecified error")
NOT_FROM_BROKER = DisconnectFlags(is_disconnect_packet_from_server=False)
FROM_BROKER = DisconnectFlags(is_disconnect_packet_from_server=True)


def test_the_brokers_session_taken_over_is_an_error_at_once(reporter: tuple[Any, Clock],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    connection, clock = reporter
    assert connection.connected(connack())
    clock.now += 60
    connection.disconnected(ReasonCode(PacketTypes.DISCONNECT, "Session taken over"), False, FROM_BROKER)
    connection.disconnected(LOST, False, NOT_FROM_BROKER)  # the socket closing after it: no news
    assert messages(caplog, logging.WARNING) == [
        "another client with the same client id took over the session on the central broker broker:1883 "
        "(Session taken over; a second instance running?); retrying slowly"]
    assert connection.slowed


def test_a_reason_the_broker_gives_is_said_once_and_explains_a_short_connection(
        reporter: tuple[Any, Clock], caplog: pytest.LogCaptureFixture) -> None:
    connection, clock = reporter
    for _ in range(5):
        connection._on_pre_connect(connection.client, None)
        assert connection.connected(connack())
        clock.now += 1
        connection.disconnected(ReasonCode(PacketTypes.DISCONNECT, "Packet too large"), False, FROM_BROKER)
        connection.disconnected(LOST, False, NOT_FROM_BROKER)
    assert messages(caplog, logging.WARNING) == [
        "the central broker broker:1883 closed the connection: Packet too large; reconnecting"] * 5
    assert not connection.slowed


def test_a_second_instance_takes_three_unexplained_short_connections_and_an_unreachable_broker_resets_that(
        reporter: tuple[Any, Clock], caplog: pytest.LogCaptureFixture) -> None:
    connection, clock = reporter

    def short_connection() -> None:
        connection._on_pre_connect(connection.client, None)
        assert connection.connected(connack())
        clock.now += 2
        connection.disconnected(LOST, False, NOT_FROM_BROKER)

    short_connection()
    short_connection()
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except ConnectionRefusedError:
        connection._on_connect_fail(connection.client, None)  # the broker was down: a restart
    short_connection()
    short_connection()
    assert not connection.slowed
    assert TAKEN_OVER not in "\n".join(messages(caplog))
    short_connection()
    assert connection.slowed
    assert TAKEN_OVER in messages(caplog, logging.ERROR)[-1]


def test_auto_falls_back_only_until_a_version_was_accepted(reporter: tuple[Any, Clock],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    connection, _clock = reporter
    client = connection.client
    connection._on_pre_connect(client, None)
    assert client._protocol == MQTTProtocolVersion.MQTTv5
    assert not connection.connected(connack("Unsupported protocol version"))
    connection.disconnected(ReasonCode(PacketTypes.DISCONNECT, "Protocol error"), False, NOT_FROM_BROKER)
    connection._on_pre_connect(client, None)
    assert client._protocol == MQTTProtocolVersion.MQTTv311
    assert connection.connected(connack())
    connection.disconnected(LOST, False, NOT_FROM_BROKER)
    # Closed before the CONNACK now (a restart, say): 3.1.1 worked before, so it stays.
    connection._on_pre_connect(client, None)
    connection._on_socket_open(client, None, None)
    connection.disconnected(LOST, False, NOT_FROM_BROKER)
    connection._on_pre_connect(client, None)
    assert client._protocol == MQTTProtocolVersion.MQTTv311
    assert messages(caplog) == [
        "the central broker broker:1883 does not speak MQTT 5 (Unsupported protocol version): trying MQTT 3.1.1",
        "using MQTT 3.1.1 with the central broker broker:1883 (protocol: auto)",
        "disconnected from the central broker broker:1883 (Unspecified error); reconnecting",
        "the central broker broker:1883 closed the connection before answering the CONNECT (MQTT 3.1.1): not an "
        "MQTT broker, a broker that does not understand MQTT 3.1.1 or refuses this client at once, or a TLS port "
        "spoken to in plain text; retrying",
    ]


def test_a_fixed_version_is_never_changed_and_paho_s_own_fall_back_to_3_1_is_undone(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="test_reporter")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test", protocol=MQTTProtocolVersion.MQTTv5)
    client.connect_async("broker", 1883, clean_start=False)
    connection = ConnectionReporter(client, "internal", BrokerSettings(host="broker", port=1883, protocol="3.1.1"),
                                    logging.getLogger("test_reporter"))
    connection._on_pre_connect(client, None)
    assert (client._protocol, client._clean_session) == (MQTTProtocolVersion.MQTTv311, False)
    client._protocol = MQTTProtocolVersion.MQTTv31  # what paho does when a broker refuses 3.1.1
    assert not connection.connected(connack("Unsupported protocol version"))
    connection._on_pre_connect(client, None)
    assert client._protocol == MQTTProtocolVersion.MQTTv311
    assert messages(caplog, logging.ERROR) == [
        "the internal broker broker:1883 refused the connection: it does not speak MQTT 3.1.1 "
        "(Unsupported protocol version); set internal_broker.protocol to auto"]
