"""The proxy between two real Mosquitto processes: raw in, clean out."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tracemalloc
from datetime import datetime
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import (
    PROXY_SCRIPT,
    ROOT,
    Collector,
    DaemonProcess,
    config_dict,
    energies,
    publish_all,
    publisher,
    start_proxy,
    write_config,
)
from payloads import RT_DATA, capture, eny_now, minute, minute_times

import config_loader
import meter_table
from data_mapping import MeterDataProcessor
from kpm33b_proxy import Proxy, unpack_outgoing
from topics import MINUTES

NEW_YEAR = datetime(2026, 1, 1)  # the first of the many distinct meter times a stream test sends


@pytest.fixture
def proxy_config(tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> Path:
    return write_config(tmp_path, config_dict(internal_broker.port, central_broker.port,
                                              exclude=["33B9999999999"]))


@pytest.fixture
def proxy(proxy_config: Path) -> DaemonProcess:
    return start_proxy(proxy_config)


def test_raw_readings_come_out_clean_retained_on_both_topics(proxy, internal_broker, central_broker):
    live = Collector(central_broker.port, "kpm33b/#")
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_RT_DATA", RT_DATA), ("MQTT_ENY_NOW", eny_now("33B1225950027", "20260117211500",
                                                                             163.486))])
    wait_for(lambda: live.count("/minutes") and live.count("/seconds"))
    assert not any(retained for _topic, _payload, retained in live.messages if "33B" in _topic)
    live.close()
    collector = Collector(central_broker.port, "kpm33b/#")
    wait_for(lambda: collector.count("/minutes") and collector.count("/seconds"))
    assert collector.on("kpm33b/33B1225950027/seconds") == [
        b'{"id": "33B1225950027", "time": "2026-01-12T16:39:00", "active_power": 6.6905}'
    ]
    assert collector.on("kpm33b/33B1225950027/minutes") == [
        b'{"id": "33B1225950027", "time": "2026-01-17T21:15:00", "active_energy": 163.486}'
    ]
    assert collector.on("kpm33b/33B1225950027/availability") == [b"online"]
    assert collector.on("kpm33b/bridge/state") == [b"online"]
    # The late subscriber got all of them from the broker's retained store.
    assert all(retained for _topic, _payload, retained in collector.messages)
    client.disconnect()
    collector.close()


def test_capture_replay_through_the_daemon_equals_the_pure_mapping(proxy, internal_broker, central_broker):
    messages = capture("MQTT_ENY_NOW_2026-01-12.log")
    processor = MeterDataProcessor()
    expected = [
        (f"kpm33b/{o.message.meter_id}/minutes", json.dumps(o.message.payload).encode())
        for o in (processor.process(MINUTES, payload, 0.0) for _topic, payload in messages)
        if o.message is not None
    ]
    assert len(expected) == 624
    collector = Collector(central_broker.port, "kpm33b/+/minutes")
    client = publisher(internal_broker.port)
    publish_all(client, messages)  # 2072 at once: above the 1,000 queue
    wait_for(lambda: collector.count("/minutes") >= 624, timeout=30)
    received = [(topic, payload) for topic, payload, _ in collector.messages]
    assert received == expected
    energies: dict[str, float] = {}
    for topic, payload in received:
        reading = json.loads(payload)
        assert reading["active_energy"] > 0
        assert reading["active_energy"] >= energies.get(topic, 0.0)
        energies[topic] = reading["active_energy"]
    client.disconnect()
    collector.close()


GARBAGE: list[bytes] = [
    b"garbage",
    b"",
    b"\xff\xfe\x00 not utf-8",
    b"[1, 2, 3]",
    b'{"id": "33B12/5950027", "zygsz": 1.0, "time": "20260112170000", "isend": "1"}',
    b'{"id": "33B1225950+27", "zygsz": 1.0, "time": "20260112170000", "isend": "1"}',
    b'{"id": "33B12259500#7", "zygsz": 1.0, "time": "20260112170000", "isend": "1"}',
    b'{"id": "33B1225950027", "zygsz": NaN, "time": "20260112170000", "isend": "1"}',
    b'{"id": "33B1225950027", "zygsz": "12", "time": "20260112170000", "isend": "1"}',
    b'{"id": "33B1225950027", "zygsz": 1.0, "time": "2026-01-12", "isend": "1"}',
    b'{"id": "33B1225950027", "zygsz": 1.0, "time": "20260112170000", "isend": 1}',
    b"[" * 100_000,
    b'{"id": "33B1225950027", "pad": "' + b"x" * 60_000 + b'"}',
]


def test_garbage_is_rejected_and_every_valid_reading_arrives(proxy, internal_broker, central_broker):
    collector = Collector(central_broker.port, "kpm33b/#")
    client = publisher(internal_broker.port)
    times = minute_times(1500, NEW_YEAR)
    messages: list[tuple[str, bytes | str]] = []
    for index, meter_time in enumerate(times):
        messages.append(("MQTT_ENY_NOW", eny_now("33B1225950027", meter_time, 100.0 + index)))
        messages.append(("MQTT_ENY_NOW", GARBAGE[index % len(GARBAGE)]))
    publish_all(client, messages)
    wait_for(lambda: collector.count("/minutes") >= 1500, timeout=30)
    assert [json.loads(p)["time"] for p in collector.on("kpm33b/33B1225950027/minutes")] == [
        f"{t[0:4]}-{t[4:6]}-{t[6:8]}T{t[8:10]}:{t[10:12]}:{t[12:14]}" for t in times
    ]
    assert all(topic.startswith("kpm33b/33B1225950027/") or topic in ("kpm33b/bridge/state", "kpm33b/bridge/devices")
               for topic in collector.topics())
    assert proxy.alive()
    client.disconnect()
    collector.close()
    assert proxy.terminate() == 0
    output = proxy.output()
    assert output.count("rejected a message on MQTT_ENY_NOW") == 10  # rate-limited
    assert "more rejected messages not logged" in output


def test_central_broker_restart_mid_stream_loses_nothing(proxy, internal_broker, central_broker):
    collector = Collector(central_broker.port, "kpm33b/+/minutes", client_id="restart-test", persistent=True)
    client = publisher(internal_broker.port)
    times = minute_times(1200, NEW_YEAR)
    publish_all(client, [("MQTT_ENY_NOW", eny_now("33B1225950027", t, 10.0 + i))
                         for i, t in enumerate(times[:600])])
    wait_for(lambda: collector.count() >= 600, timeout=30)
    central_broker.stop()
    publish_all(client, [("MQTT_ENY_NOW", eny_now("33B1225950027", t, 610.0 + i))
                         for i, t in enumerate(times[600:])])
    central_broker.start()
    wait_for(lambda: collector.count() >= 1200, timeout=60)
    assert energies(collector, "33B1225950027") == [10.0 + i for i in range(600)] + [610.0 + i for i in range(600)]
    client.disconnect()
    collector.close()


def test_last_will_reports_offline_when_the_proxy_is_killed(proxy, central_broker):
    collector = Collector(central_broker.port, "kpm33b/bridge/state")
    wait_for(lambda: collector.on("kpm33b/bridge/state") == [b"online"])
    proxy.kill()
    wait_for(lambda: collector.on("kpm33b/bridge/state") == [b"online", b"offline"])
    collector.close()


def test_sigterm_publishes_offline_and_exits_zero(proxy, central_broker):
    collector = Collector(central_broker.port, "kpm33b/bridge/state")
    wait_for(lambda: collector.on("kpm33b/bridge/state") == [b"online"])
    assert proxy.terminate() == 0
    wait_for(lambda: collector.on("kpm33b/bridge/state") == [b"online", b"offline"])
    collector.close()
    assert "Traceback" not in proxy.output()


def test_excluded_meter_is_ignored_entirely(proxy, internal_broker, central_broker):
    collector = Collector(central_broker.port, "kpm33b/#")
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now("33B9999999999", "20260117211500", 5.0)),
                         ("MQTT_ENY_NOW", eny_now("33B1225950027", "20260117211500", 5.0))])
    wait_for(lambda: collector.count("/minutes"))
    assert not [t for t in collector.topics() if "33B9999999999" in t]
    client.disconnect()
    collector.close()


def test_energy_guard_holds_across_a_restart(proxy_config, internal_broker, central_broker):
    collector = Collector(central_broker.port, "kpm33b/+/minutes")
    client = publisher(internal_broker.port)
    first = DaemonProcess(PROXY_SCRIPT, proxy_config)
    wait_for(lambda: "subscribed to" in first.output())
    publish_all(client, [("MQTT_ENY_NOW", eny_now("33B1225950027", "20260117211500", 163.486))])
    wait_for(lambda: collector.count() == 1)
    assert first.terminate() == 0
    second = DaemonProcess(PROXY_SCRIPT, proxy_config)
    wait_for(lambda: "subscribed to" in second.output())
    publish_all(client, [("MQTT_ENY_NOW", eny_now("33B1225950027", "20260117213000", 31.057)),
                         ("MQTT_ENY_NOW", eny_now("33B1225950027", "20260117214500", 163.5))])
    wait_for(lambda: collector.count() == 2)
    assert energies(collector, "33B1225950027") == [163.486, 163.5]
    assert "loaded the last energy of 1 meters" in second.output()
    assert second.terminate() == 0
    client.disconnect()
    collector.close()


def test_a_second_proxy_on_the_same_state_directory_refuses_to_start(proxy, proxy_config):
    second = DaemonProcess(PROXY_SCRIPT, proxy_config)
    assert second.wait(15) == 3
    assert "is in use by another kpm33b_proxy process" in second.output()
    assert proxy.alive()


def test_saving_when_a_large_fleet_was_last_heard_builds_no_object_per_meter(tmp_path: Path) -> None:
    """20,000 meters: the last-seen file is written from a copy of availability's arrays, a line at a time.

    It was written from a list of (id, time, online) tuples made with
    availability's lock held, which the readings wait for: 157 bytes per meter
    at once, every minute (100,000 meters: 15.7 MB, and 49 ms with the lock
    held; now 1.6 ms). Measured: a peak of 3.2 MB for 20,000 meters before,
    0.5 MB after.
    """
    proxy = Proxy(config_loader.parse_config(config_dict(1883, 1884), {}), tmp_path / "state")
    (tmp_path / "state").mkdir()
    for number in range(20_000):
        proxy.availability.seen(f"33B{number:010d}", time.monotonic())
    proxy.availability.went_offline(time.monotonic() + 3600)  # offline ones are saved too
    proxy.availability.seen("33B0000000007", time.monotonic())
    tracemalloc.start()
    try:
        proxy._save_last_seen(time.monotonic())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    lines = (tmp_path / "state" / "last_seen").read_text().splitlines()
    assert len(lines) == 20_000
    assert sum(line.endswith(" online") for line in lines) == 1
    assert any(line.startswith("33B0000000007 ") and line.endswith(" online") for line in lines)
    assert peak < 1_000_000, peak


def test_a_fleet_in_service_keeps_each_meter_id_once_not_once_per_table(tmp_path: Path) -> None:
    """10,000 meters each heard twice, every reading delivered: the per-meter tables' bytes per meter.

    The filters, the energy journal, availability and discovery (its known
    meters and those whose diagnostic configs are still to go) each kept the
    13-byte id and a hash index of every meter: five copies of the same
    fleet. Measured: 245 bytes per meter before they shared one
    ``MeterIds``, 139 after; 122 with the filters' and the journal's four
    meter times in four bytes each instead of eight; 130 with the ids grown
    by an eighth rather than by half (room for 10,983 meters here where
    there was room for 10,390; for 102,908 at 100,000, not 118,342).
    """
    proxy = Proxy(config_loader.parse_config(config_dict(1883, 1884), {}), tmp_path / "state")
    proxy.journal.open()
    meters = [f"33B{number:010d}" for number in range(10_000)]

    def hear_every_meter(reading: int) -> None:
        for number, meter_id in enumerate(meters):
            proxy.handle_raw("MQTT_ENY_NOW", eny_now(meter_id, minute(reading),
                                                      1000.0 + number + reading).encode())
            queue = proxy.outgoing._queue
            while queue:
                proxy._delivered(unpack_outgoing(queue.popleft()))

    tracemalloc.start()
    try:
        hear_every_meter(0)
        hear_every_meter(1)
        kept = sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, meter_table.__file__)]).statistics("filename"))
    finally:
        tracemalloc.stop()
        proxy.journal.close()
    assert proxy.counters.get("forwarded") == 2 * len(meters)
    assert len(proxy.availability) == len(proxy.discovery._diagnostics) == len(meters)
    assert kept / len(meters) < 135, kept / len(meters)


def test_a_burst_of_new_meters_waits_in_the_queue_as_one_object_per_message_not_a_dozen(tmp_path: Path) -> None:
    """2,000 new meters, one reading each, queued while the central broker is away: the small objects they leave.

    Each new meter queues four messages (two Home Assistant configs, its
    availability, its reading). Kept as they were made (a tuple, a topic
    string, the payload, the energy to journal with its id, float and
    time), they were 15 small objects per meter, about 1.1 KB: a burst of
    10,000 new meters spread them over arenas of Python's allocator that a
    few longer-lived objects then keep (``make bench``, 100,000 meters in
    service: 63.5 MB before, 55.6 after). Each message now waits as one
    bytes object.
    Measured: 14.2 small objects per meter before, 2.2 after.
    """
    proxy = Proxy(config_loader.parse_config(config_dict(1883, 1884), {}), tmp_path / "state")
    readings = [eny_now(f"33B{number:010d}", minute(0), 1000.0 + number).encode() for number in range(2_000)]
    tracemalloc.start()
    try:
        for payload in readings:
            proxy.handle_raw("MQTT_ENY_NOW", payload)
        kept = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, meter_table.__file__)])
    finally:
        tracemalloc.stop()
    assert proxy.outgoing.depth() >= 4 * len(readings)  # and the bridge's own configs
    small = sum(1 for trace in kept.traces if trace.size <= 512)  # Python's allocator's own (larger: malloc)
    assert small / len(readings) < 4, small / len(readings)


def test_meter_goes_offline_after_silence_and_online_again(tmp_path, internal_broker, central_broker):
    config = config_loader.parse_config(config_dict(internal_broker.port, central_broker.port), {})
    collector = Collector(central_broker.port, "kpm33b/+/availability")
    proxy = Proxy(config, tmp_path / "state")
    proxy.start()
    try:
        wait_for(lambda: proxy.forwarding)
        client = publisher(internal_broker.port)
        publish_all(client, [("MQTT_RT_DATA", RT_DATA)])
        wait_for(lambda: collector.on("kpm33b/33B1225950027/availability") == [b"online"])
        proxy.tick(time.monotonic() + 2.5 * 60 + 1)  # silent for longer than 2.5 x 60 s
        wait_for(lambda: collector.on("kpm33b/33B1225950027/availability") == [b"online", b"offline"])
        publish_all(client, [("MQTT_RT_DATA", RT_DATA)])
        wait_for(lambda: collector.on("kpm33b/33B1225950027/availability") == [b"online", b"offline", b"online"])
        client.disconnect()
    finally:
        proxy.stop()
        collector.close()


@pytest.mark.parametrize(("document", "code"), [
    ({"central_broker": {"host": "127.0.0.1"}, "meters": {"upload_frequency_seconds": 45}}, 2),
    ({"central_broker": {"host": "127.0.0.1"}}, 0),  # the one key a configuration must set
])
def test_check_config_reports_problems_with_exit_code_two(tmp_path, document, code):
    path = write_config(tmp_path, document)
    result = subprocess.run([sys.executable, str(ROOT / PROXY_SCRIPT), "--config", str(path), "--check-config"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    if code:
        assert result.stderr.splitlines()[1:] == [
            "  meters.upload_frequency_seconds: 45 is not allowed; expected one of 30, 60, 300, 600, 900, 1200, "
            "1800, 3600"
        ]


def test_proxy_tells_systemd_it_is_ready_and_pings_the_watchdog(proxy_config, systemd):
    notifications, environment = systemd
    daemon = start_proxy(proxy_config, env={**environment, "WATCHDOG_USEC": "400000"}, wait_online=False)
    wait_for(lambda: "READY=1" in notifications.lines() and notifications.lines().count("WATCHDOG=1") >= 3,
             timeout=15)
    assert "subscribed to" in daemon.output()  # ready means forwarding
    assert daemon.terminate() == 0
    wait_for(lambda: "STOPPING=1" in notifications.lines(), timeout=15)
