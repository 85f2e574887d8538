"""Helpers for integration tests: configurations, the daemons as processes, simulated meters, MQTT clients.

Each exists once, so that every test file writes a configuration, starts a
daemon, drives meters and watches a broker the same way, and a test reads as
the scenario it checks. What the meters send is in ``payloads.py``, the
brokers are in ``broker.py``. Everything a test starts here is remembered
until it has ended, so that a failing test cannot leave a daemon, a simulator
or a client running (``stop_leftovers``, called by the fixtures in conftest).
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import yaml
from broker import wait_for
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tools.meter_simulator import MeterSimulator

ROOT = Path(__file__).resolve().parent.parent
PROXY_SCRIPT = "kpm33b_proxy.py"
SENDER_SCRIPT = "config_sender.py"
MAIN = "kpm33b"  # the central tree's main topic in every test configuration (the default)

# --- configurations ------------------------------------------------------------------------


def config_dict(internal_port: int, central_port: int, *, level: str = "DEBUG",
                sections: Mapping[str, Any] | None = None, **meters: Any) -> dict[str, Any]:
    """A configuration for brokers on 127.0.0.1 at the given ports, logging at ``level``.

    ``meters`` keys make the ``meters`` section, and nothing else does (the
    intervals default to 60 s and 1 min): a test that edits the file as text
    finds only what it set. ``sections`` are merged into the sections of the
    same name (a mapping into a mapping, key by key) or added. The document is
    the caller's own: changing it changes nothing shared.
    """
    document: dict[str, Any] = {
        "internal_broker": {"host": "127.0.0.1", "port": internal_port},
        "central_broker": {"host": "127.0.0.1", "port": central_port},
        "meters": copy.deepcopy(meters),
        "logging": {"level": level},
    }
    for key, value in copy.deepcopy(dict(sections or {})).items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key] = {**document[key], **value}
        else:
            document[key] = value
    return document


def write_config(directory: Path, document: Mapping[str, Any], *, name: str = "config.yaml",
                 atomic: bool = False) -> Path:
    """Write ``document`` as YAML to ``directory/name`` (the directory is created); the file's path.

    By default the file is rewritten in place, as ``>`` in a shell does;
    ``atomic`` saves it as most editors do, a new file renamed over the old one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    text = yaml.safe_dump(dict(document))
    if atomic:
        temporary = path.with_name(path.name + ".swp")
        temporary.write_text(text)
        os.replace(temporary, path)
    else:
        path.write_text(text)
    return path


# --- MQTT clients --------------------------------------------------------------------------


class Collector:
    """Subscribes to topics on a broker and records every message it receives."""

    opened: ClassVar[list[Collector]] = []

    def __init__(self, port: int, *topics: str, client_id: str = "", persistent: bool = False,
                 username: str | None = None, password: str | None = None, ca_file: Path | None = None,
                 cert_file: Path | None = None, key_file: Path | None = None) -> None:
        """``persistent``: a session that the broker keeps (and persists) across a restart of either side.

        ``ca_file`` connects over TLS, trusting that CA; ``cert_file`` and
        ``key_file`` add a client certificate.
        """
        self.messages: list[tuple[str, bytes, bool]] = []
        # QoS 1 is at-least-once between the broker and this collector too: after a
        # broker restart it may resend what we had received (flagged DUP). Those are
        # counted here and left out of `messages`, which then shows what the
        # publisher sent, duplicates included.
        self.redelivered = 0
        self._seen: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file), certfile=None if cert_file is None else str(cert_file),
                                keyfile=None if key_file is None else str(key_file))
        if username is not None:
            self.client.username_pw_set(username, password)
        # With a session kept by the broker the subscriptions are still there:
        # subscribing again would replay the retained messages as if new.
        self.client.on_connect = lambda c, _u, flags, *_: (
            None if flags.session_present else c.subscribe([(topic, 1) for topic in topics]))
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        Collector.opened.append(self)
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("collector could not subscribe")

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        key = (message.topic, message.payload)
        with self._lock:
            if message.dup and key in self._seen:
                self.redelivered += 1
                return
            self._seen.add(key)
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        """Payloads received on ``topic``, in order."""
        with self._lock:
            return [payload for t, payload, _retain in self.messages if t == topic]

    def topics(self) -> list[str]:
        """Topics of all messages, in order of arrival."""
        with self._lock:
            return [topic for topic, _payload, _retain in self.messages]

    def count(self, suffix: str = "") -> int:
        """How many messages arrived on topics ending with ``suffix``."""
        with self._lock:
            return sum(1 for topic, _p, _r in self.messages if topic.endswith(suffix))

    def close(self) -> None:
        """Disconnect (again: harmless)."""
        if self in Collector.opened:
            Collector.opened.remove(self)
        self.client.disconnect()
        self.client.loop_stop()


# Publishers a test opened; disconnected at its end if it did not (see ``stop_leftovers``).
PUBLISHERS: list[mqtt.Client] = []


def publisher(port: int, *, max_inflight: int | None = None) -> mqtt.Client:
    """A connected MQTT client for publishing test input.

    ``max_inflight``: more unacknowledged publishes than paho's 20, which make
    tens of thousands of readings slow to send.
    """
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    if max_inflight is not None:
        client.max_inflight_messages_set(max_inflight)
    PUBLISHERS.append(client)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_for(client.is_connected)
    return client


def publish_all(client: mqtt.Client, messages: Sequence[tuple[str, bytes | str]]) -> None:
    """Publish at QoS 1 and wait until the broker has every message."""
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout=30)


class ProxyStandIn:
    """A publisher on the central broker, standing in for the proxy: what the config sender discovers meters by."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"central-{port}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.latest: dict[str, bytes] = {}
        self.client.on_message = lambda _client, _userdata, message: self.latest.__setitem__(
            message.topic, message.payload)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def watch(self, topic: str) -> None:
        """Keep the latest payload on ``topic`` in ``latest``."""
        self.client.subscribe(topic, 1)

    def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        """Publish at QoS 1 and wait until the broker has it."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def online(self, *meter_ids: str) -> None:
        """Announce meters the way the proxy does: retained availability."""
        infos = [self.client.publish(f"{MAIN}/{m}/availability", "online", qos=1, retain=True) for m in meter_ids]
        for info in infos:
            info.wait_for_publish(5)

    def reading(self, meter_id: str, meter_time: datetime, retain: bool = False) -> None:
        """A clean power reading of ``meter_id`` as the proxy forwards it, dated ``meter_time``."""
        payload = {"id": meter_id, "time": meter_time.isoformat(timespec="seconds"), "active_power": 6.6905}
        self.publish(f"{MAIN}/{meter_id}/seconds", json.dumps(payload), retain=retain)

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


# --- what the daemons published and logged -------------------------------------------------


def energies(collector: Collector, meter_id: str) -> list[float]:
    """The energies that arrived on ``meter_id``'s minutes topic, in order."""
    return [json.loads(payload)["active_energy"] for payload in collector.on(f"{MAIN}/{meter_id}/minutes")]


def latest_stats(collector: Collector, topic: str = f"{MAIN}/bridge/stats") -> dict[str, Any] | None:
    """The latest stats document a daemon published on ``topic`` (the proxy's by default), decoded."""
    payloads = collector.on(topic)
    return json.loads(payloads[-1]) if payloads else None


def logged_stats(output: str) -> dict[str, Any] | None:
    """The latest ``stats:`` line a daemon logged (the proxy logs them when it stops too), decoded."""
    found = re.findall(r"stats: (\{.*\})", output)
    return json.loads(found[-1]) if found else None


def lines_with(output: str, text: str = "", *, level: str | None = None) -> list[str]:
    """The lines of a daemon's log that contain ``text``, at ``level`` (INFO, WARNING, ERROR …) if given."""
    return [line for line in output.splitlines() if text in line and (level is None or f" {level} " in line)]


# --- the daemons as processes ---------------------------------------------------------------


class DaemonProcess:
    """One of the project's daemons as a real process, its output captured to a file.

    Every instance is remembered until it has ended, so that a failing test
    cannot leave a daemon running (see ``stop_leftovers``).
    """

    started: ClassVar[list[DaemonProcess]] = []

    def __init__(self, script: str, config_path: Path, env: dict[str, str] | None = None,
                 stdout: int | None = None) -> None:
        """``stdout``: a file descriptor for standard output (a pipe the test controls); the log file then
        captures standard error only."""
        self.log_path = config_path.parent / f"{Path(script).stem}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in wait/stop)
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / script), "--config", str(config_path)],
            stdout=self._log if stdout is None else stdout,
            stderr=subprocess.STDOUT if stdout is None else self._log,
            env=environment, cwd=config_path.parent,
        )
        DaemonProcess.started.append(self)

    def output(self) -> str:
        """What the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        self.process.kill()
        self.wait(10)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the exit; the exit code."""
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None


def start_proxy(config: Path, *, state: Path | None = None, env: dict[str, str] | None = None,
                wait_online: bool = True) -> DaemonProcess:
    """The proxy as a process, with ``config``; its state in ``state`` if given, else beside the configuration.

    With ``wait_online`` it returns once the proxy forwards (it logs ``bridge
    state online``: connected to both brokers and subscribed to the meters),
    and fails with the proxy's output if it died instead.
    """
    environment = {**(env or {}), **({"STATE_DIRECTORY": str(state)} if state is not None else {})}
    daemon = DaemonProcess(PROXY_SCRIPT, config, env=environment)
    if wait_online:
        wait_for(lambda: "bridge state online" in daemon.output() or not daemon.alive(), timeout=20)
        assert daemon.alive(), daemon.output()
    return daemon


def start_config_sender(config: Path, *, env: dict[str, str] | None = None,
                        wait_ready: bool = True) -> DaemonProcess:
    """The config sender as a process, with ``config``.

    With ``wait_ready`` it returns once the sender is subscribed on both
    brokers (from then on it sees every meter the proxy announces), and fails
    with its output if it died instead.
    """
    daemon = DaemonProcess(SENDER_SCRIPT, config, env=env)
    if wait_ready:
        wait_for(lambda: "ready: subscribed on both brokers" in daemon.output() or not daemon.alive(), timeout=10)
        assert daemon.alive(), daemon.output()
    return daemon


class FakeSystemd:
    """A bound AF_UNIX datagram socket that records what a service sends to systemd, with arrival times."""

    def __init__(self, address: str | bytes) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.append((time.monotonic(), data.decode()))

    def received(self) -> list[str]:
        """The datagrams so far, in order."""
        with self._lock:
            return [message for _, message in self.messages]

    def lines(self) -> list[str]:
        """The assignments so far (``READY=1``, ``WATCHDOG=1`` …), one a line, in order."""
        return [line for message in self.received() for line in message.splitlines()]

    def times_of(self, message: str) -> list[float]:
        """When each datagram equal to ``message`` arrived (time.monotonic)."""
        with self._lock:
            return [arrival for arrival, text in self.messages if text == message]

    def close(self) -> None:
        """Stop receiving and close the socket."""
        self._stop.set()
        self._thread.join(timeout=2)
        self.socket.close()


# --- simulated meters ------------------------------------------------------------------------

# Simulators a test started; stopped at its end if it did not (see ``stop_leftovers``).
SIMULATORS: list[MeterSimulator] = []


def simulated_meters(port: int, meter_ids: Sequence[str], *, cadence: bool = True,
                     **options: Any) -> MeterSimulator:
    """Meters of ``tools/meter_simulator.py`` on the broker at ``port``, connected and subscribed.

    ``options`` go to ``MeterSimulator`` (reply modes, intervals, clocks …).
    Without ``cadence`` the meters publish nothing by themselves and only
    answer commands (see ``MeterSimulator.start``). Commands published before
    the subscriptions stand would be lost, so this returns only after them.
    """
    simulator = MeterSimulator("127.0.0.1", port, list(meter_ids), **options)
    SIMULATORS.append(simulator)
    simulator.start(cadence=cadence)
    if not simulator.wait_connected(10):
        raise AssertionError(f"the simulated meters did not connect to port {port}")
    return simulator


# --- after each test ----------------------------------------------------------------------


def stop_leftovers() -> None:
    """Kill the daemons, stop the simulated meters and disconnect the clients a test left running.

    A failing test skips its own clean-up: without this its daemon would go on
    running and its clients would go on reconnecting to a broker long gone.
    The fixtures in conftest call it before they stop a broker, so that nothing
    waits for a broker that is no longer there, and once more at the very end.
    """
    while DaemonProcess.started:
        daemon = DaemonProcess.started.pop()
        if daemon.alive():
            daemon.kill()
    while SIMULATORS:
        SIMULATORS.pop().stop()
    while Collector.opened:
        Collector.opened[-1].close()
    while PUBLISHERS:
        client = PUBLISHERS.pop()
        client.disconnect()
        client.loop_stop()
