"""The proxy's energy journal between real Mosquitto processes: only the truth on disk, and damage survived.

The journal holds, per meter, the last energy the central broker acknowledged:
the counter guard restored from it at the next start must never be ahead of
what consumers have, or the readings in between are dropped as
``energy_decrease`` when the internal broker delivers them again. Each test
drives the proxy as a real process and breaks it at a chosen moment (SIGKILL,
a frozen central broker, a damaged journal, a full file system).
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, wait_for
from daemons import Collector, DaemonProcess, config_dict, publish_all, write_config
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from tools.meter_simulator import encode_payload, eny_now_payload

PROXY_SCRIPT = "kpm33b_proxy.py"
METER = "33B1225950027"
BASE_TIME = datetime(2026, 1, 12, 0, 0, 0)
# The journal is compacted once it holds more than 4 lines per meter + 10,000 (one meter here):
# 30,000 readings drained in one go cross that twice and leave about 10,000 after the second.
DRAIN_READINGS = 30_000
COMPACTION_LINES = 10_000


# --- helpers -------------------------------------------------------------------


def energy_of(index: int) -> float:
    """The energy of reading ``index``: +0.01 kWh a minute (0.6 kW), far below any rate guard."""
    return round(1_000 + index / 100, 3)


def readings(first: int, count: int, meter: str = METER) -> list[tuple[str, bytes]]:
    """``count`` rising ENY_NOW readings of one meter, one minute apart (valid calendar dates)."""
    return [("MQTT_ENY_NOW", encode_payload(eny_now_payload(meter, BASE_TIME + timedelta(minutes=index),
                                                           energy_of(index))))
            for index in range(first, first + count)]


def send(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 and wait until the internal broker has every message."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(500)  # paho's default of 20 makes 30,000 readings slow to send
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        wait_for(client.is_connected)
        publish_all(client, messages)
    finally:
        client.disconnect()
        client.loop_stop()


def energies(collector: Collector, meter: str = METER) -> list[float]:
    """The energies that arrived on the central broker for ``meter``, in order."""
    return [json.loads(payload)["active_energy"] for payload in collector.on(f"kpm33b/{meter}/minutes")]


def last_stats(output: str) -> dict[str, Any] | None:
    """The proxy's latest ``stats:`` log line, decoded."""
    found = re.findall(r"stats: (\{.*\})", output)
    return json.loads(found[-1]) if found else None


def journal_lines(path: Path) -> int:
    """Complete lines in the journal file right now (0 when it does not exist)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def proxy_document(internal_port: int, central_port: int) -> dict[str, Any]:
    document = config_dict(internal_port, central_port)
    document["logging"] = {"level": "INFO"}
    document["health"] = {"stats_interval_seconds": 1}
    return document


@pytest.fixture
def internal_broker() -> Iterator[Mosquitto]:
    """The internal broker with the shipped limits (mosquitto/internal.conf).

    At Mosquitto's default queue of 1,000 messages a client, 2.0.11 drops part of
    a resumed session holding tens of thousands of unacknowledged readings and
    never answers the proxy's subscription: the broker's limit, not the proxy's.
    """
    broker = Mosquitto(extra_config="max_queued_messages 200000\nmax_inflight_messages 100").start()
    yield broker
    broker.cleanup()


@pytest.fixture
def central_broker() -> Iterator[Mosquitto]:
    """The central broker, with room to queue a whole drain for the test's consumer."""
    broker = Mosquitto(extra_config="max_queued_messages 1000000").start()
    yield broker
    if broker.process is not None:
        broker.process.send_signal(signal.SIGCONT)  # a test may have left it frozen
    broker.cleanup()


@pytest.fixture
def start_proxy(cleanup: Callable[[Callable[[], object]], None]) -> Callable[..., DaemonProcess]:
    """Start the proxy from a config in ``directory`` (its state in ``state``, else beside the config).

    Waits until it forwards unless told not to.
    """

    def start(directory: Path, document: dict[str, Any], state: Path | None = None,
              wait_online: bool = True) -> DaemonProcess:
        directory.mkdir(parents=True, exist_ok=True)
        env = {"STATE_DIRECTORY": str(state)} if state is not None else None
        daemon = DaemonProcess(PROXY_SCRIPT, write_config(directory, document), env=env)
        cleanup(lambda: daemon.kill() if daemon.alive() else None)
        if wait_online:
            wait_for(lambda: "bridge state online" in daemon.output() or not daemon.alive(), timeout=20)
            assert daemon.alive(), daemon.output()
        return daemon

    return start


# --- 1. only what the central broker acknowledged -------------------------------


class Shrinks:
    """Watches the journal file and counts how often it got shorter (a compaction)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.longest = journal_lines(path)
        self.count = 0

    def poll(self) -> int:
        lines = journal_lines(self.path)
        if lines < self.longest:
            self.count += 1
        self.longest = lines
        return self.count


@pytest.mark.parametrize("fault", ["sigkill-after-compaction-1", "sigkill-after-compaction-2",
                                   "central-frozen-then-sigterm"])
def test_a_proxy_stopped_mid_drain_restarts_without_losing_a_reading(
        tmp_path, internal_broker, central_broker, start_proxy, cleanup, fault):
    document = proxy_document(internal_broker.port, central_broker.port)
    consumer = Collector(central_broker.port, "kpm33b/+/minutes", client_id="drain-consumer", persistent=True)
    cleanup(consumer.close)
    state = tmp_path / "state"
    proxy = start_proxy(tmp_path / "first", document, state)
    journal = state / "energy.journal"

    central_broker.stop()
    wait_for(lambda: "disconnected from the central broker" in proxy.output(), timeout=10)
    send(internal_broker.port, readings(0, DRAIN_READINGS))
    wait_for(lambda: (s := last_stats(proxy.output())) and s["received"] >= DRAIN_READINGS, timeout=60)
    shrinks = Shrinks(journal)
    central_broker.start()

    if fault.startswith("sigkill"):
        wanted = int(fault[-1])
        wait_for(lambda: shrinks.poll() >= wanted, timeout=120, interval=0.005)
        proxy.kill()  # at once: mid-drain, just after a compaction
    else:
        # Frozen while the journal is about to be compacted (or just was): the compaction
        # then runs while the central broker acknowledges nothing more.
        wait_for(lambda: shrinks.poll() or journal_lines(journal) > COMPACTION_LINES, timeout=120,
                 interval=0.005)
        central_broker.process.send_signal(signal.SIGSTOP)
        wait_for(lambda: shrinks.poll(), timeout=10, interval=0.005)
        assert proxy.terminate(timeout=60) == 0
        central_broker.process.send_signal(signal.SIGCONT)
    arrived_before_restart = len(energies(consumer))

    restarted = start_proxy(tmp_path / "restarted", document, state)
    expected = [energy_of(index) for index in range(DRAIN_READINGS)]
    try:
        wait_for(lambda: energies(consumer)[-1:] == expected[-1:], timeout=120)
    finally:
        got = energies(consumer)
        missing = sorted(set(expected) - set(got))
        print(f"\n[{fault}] readings sent {len(expected)}, arrived {len(got)} ({arrived_before_restart} before the "
              f"restart), missing {len(missing)} (first {missing[:3]}), repeated {len(got) - len(set(got))}")
    assert restarted.terminate() == 0
    stats = last_stats(restarted.output())
    print(f"  restarted proxy: {stats}")
    assert not missing
    assert "energy_decrease" not in stats["dropped"]
    assert stats["forwarded"] >= 1_000, "the proxy was not stopped mid-drain"
