"""The fleet at a glance between real Mosquitto processes: the proxy's device list, the config sender using it."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import Collector, DaemonProcess, config_dict, publish_all, publisher, write_config

from config_loader import load_config
from config_sender import ConfigSender

METER = "33B1225950027"
OTHER = "33B1225950028"
THIRD = "33B1225950029"
DEVICES = "kpm33b/bridge/devices"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def rt_data(meter_id: str, n: int = 0) -> str:
    """An RT_DATA packet of a meter, ``n`` seconds after 2026-01-12 17:00:00 on its clock."""
    return json.dumps({"id": meter_id, "zyggl": 1.5 + n, "time": f"202601121700{n:02d}", "isend": "1"})


def start_proxy(config: Path, central_port: int) -> DaemonProcess:
    """The proxy daemon, once it says ``online`` (forwarding)."""
    bridge = Collector(central_port, "kpm33b/bridge/state")
    daemon = DaemonProcess("kpm33b_proxy.py", config)
    wait_for(lambda: bridge.on("kpm33b/bridge/state")[-1:] == [b"online"], timeout=15)
    bridge.close()
    return daemon


def lists(collector: Collector) -> list[list[dict[str, object]]]:
    """Every non-empty device list received."""
    return [json.loads(payload) for payload in collector.on(DEVICES) if payload]


def ids(device_list: list[dict[str, object]]) -> list[object]:
    return [entry["id"] for entry in device_list]


def test_the_proxy_publishes_a_retained_sorted_device_list_when_meters_appear_not_per_reading(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, devices={
        OTHER: {"name": "Heat pump", "upload_frequency_seconds": 30}}))
    collector = Collector(central_broker.port, DEVICES, "kpm33b/+/seconds")
    proxy = start_proxy(config, central_broker.port)
    client = publisher(internal_broker.port)
    before = time.time()

    publish_all(client, [("MQTT_RT_DATA", rt_data(OTHER)), ("MQTT_RT_DATA", rt_data(METER))])
    wait_for(lambda: lists(collector) and ids(lists(collector)[-1]) == [METER, OTHER], timeout=15)
    latest = lists(collector)[-1]
    for entry in latest:
        seen = datetime.strptime(str(entry["last_seen"]), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        assert ISO_UTC.fullmatch(str(entry["last_seen"])) and before - 1 <= seen <= time.time() + 1
        del entry["last_seen"]
    assert latest == [
        {"id": METER, "name": f"KPM33B {METER}", "model": "KPM33B", "availability": "online",
         "upload_frequency_seconds": 60, "upload_frequency_minutes": 1},
        {"id": OTHER, "name": "Heat pump", "model": "KPM33B", "availability": "online",
         "upload_frequency_seconds": 30, "upload_frequency_minutes": 1},
    ]
    published = len(collector.on(DEVICES))
    # Readings of known meters change nothing in the list: the next list is the one a new meter brings.
    publish_all(client, [("MQTT_RT_DATA", rt_data(meter_id, n)) for n in range(1, 11) for meter_id in (METER, OTHER)])
    wait_for(lambda: collector.count("/seconds") == 22, timeout=15)
    time.sleep(1.5)  # not for correctness: gives a list published per reading the time to show up
    publish_all(client, [("MQTT_RT_DATA", rt_data(THIRD))])
    wait_for(lambda: ids(lists(collector)[-1]) == [METER, OTHER, THIRD], timeout=15)
    assert len(collector.on(DEVICES)) == published + 1
    assert proxy.terminate() == 0
    # Retained: a newcomer gets the list at once.
    late = Collector(central_broker.port, DEVICES)
    wait_for(lambda: lists(late) and ids(lists(late)[-1]) == [METER, OTHER, THIRD], timeout=5)
    late.close()
    client.disconnect()
    collector.close()


def test_above_device_list_max_meters_the_list_is_cleared_with_one_warning(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    document = config_dict(internal_broker.port, central_broker.port)
    document["health"] = {"device_list_max_meters": 1}
    config = write_config(tmp_path, document)
    collector = Collector(central_broker.port, DEVICES, "kpm33b/+/availability")
    proxy = start_proxy(config, central_broker.port)
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_RT_DATA", rt_data(meter_id)) for meter_id in (METER, OTHER, THIRD)])
    wait_for(lambda: collector.count("/availability") == 3 and "health.device_list_max_meters (1)" in proxy.output(),
             timeout=15)
    wait_for(lambda: collector.on(DEVICES)[-1:] == [b""], timeout=5)
    publish_all(client, [("MQTT_RT_DATA", rt_data(meter_id, 1)) for meter_id in (METER, OTHER, THIRD)])
    assert proxy.terminate() == 0
    warnings = [line for line in proxy.output().splitlines() if "WARNING" in line and "device_list_max" in line]
    assert len(warnings) == 1 and "3 meters" in warnings[0] and DEVICES in warnings[0]
    assert all(len(entries) <= 1 for entries in lists(collector))
    client.disconnect()
    collector.close()


@pytest.fixture
def limited_central_broker() -> Iterator[Mosquitto]:
    """A central broker that queues at most 10 messages per client beyond those in flight."""
    broker = Mosquitto(extra_config="max_queued_messages 10").start()
    yield broker
    broker.cleanup()


def test_a_restarted_config_sender_discovers_300_meters_from_the_device_list_despite_a_queue_limit_of_10(
        tmp_path: Path, internal_broker: Mosquitto, limited_central_broker: Mosquitto) -> None:
    meter_ids = [f"33B12260{n:05d}" for n in range(300)]
    document = config_dict(internal_broker.port, limited_central_broker.port)
    document["homeassistant"] = {"discovery": False}
    config = write_config(tmp_path, document)
    collector = Collector(limited_central_broker.port, DEVICES)
    proxy = start_proxy(config, limited_central_broker.port)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_RT_DATA", rt_data(meter_id)) for meter_id in meter_ids])
    wait_for(lambda: lists(collector) and len(lists(collector)[-1]) == 300, timeout=30)
    # Each meter also has its retained availability and reading: 600 messages the broker
    # would have to queue for a subscriber, of which it keeps only 10 beyond those in flight.

    for attempt in range(2):  # a first start, and a restart
        sender = ConfigSender(load_config(config, {}), config, environ={}, client_id_prefix=f"fleet-{attempt}")
        sender.start()
        try:
            assert sender.wait_ready(10)
            wait_for(lambda sender=sender: len(sender.known_meters()) == 300, timeout=15)
            assert sender.known_meters() == set(meter_ids)
        finally:
            sender.stop()
    assert proxy.terminate() == 0
    client.disconnect()
    collector.close()
