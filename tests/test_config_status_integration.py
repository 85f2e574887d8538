"""The retained configuration status per meter, against real Mosquitto brokers.

The config sender runs in-process; the meters are ``tools/meter_simulator.py``
on the internal broker, answering at once (``prompt``), never (``none``) or
with code 02 (``error``); a stand-in for the proxy announces them on the
central broker. A collector subscribed before the meters appear sees every
status the sender publishes, in order.

"Retained" and "not retained" are read without sleeping: a fresh client
subscribes to the status topics and to a probe topic in one SUBSCRIBE, then
a probe is published. The broker queues the retained messages at the
subscription, before the probe: once the probe is in, every retained status is.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from broker import Mosquitto, wait_for
from daemons import MAIN, Collector, ProxyStandIn, config_dict, publish_all, publisher, simulated_meters, write_config
from test_refused_publishes import CENTRAL_PASSWORD, SENDER_USER, acl_central_broker

import config_loader
from config_sender import ConfigSender
from daemon import ALERT
from tools.meter_simulator import MeterSimulator

HEAT_PUMP = "33B1225950027"
OFFICE = "33B1225950028"
STATUSES = f"{MAIN}/+/config_status"
KEYS = ["id", "upload_frequency_seconds", "upload_frequency_minutes", "state", "updated", "clock_offset_seconds"]


def status_topic(meter_id: str) -> str:
    return f"{MAIN}/{meter_id}/config_status"


def statuses(collector: Collector, meter_id: str) -> list[dict[str, Any] | None]:
    """The statuses of a meter the collector saw, decoded, in order (None: cleared)."""
    return [json.loads(payload) if payload else None for payload in collector.on(status_topic(meter_id))]


def states(collector: Collector, meter_id: str) -> list[str | None]:
    return [status["state"] if status else None for status in statuses(collector, meter_id)]


def retained_statuses(port: int) -> dict[str, bytes]:
    """The retained status of every meter on the broker now: topic → payload (see the module's docstring)."""
    probe = f"test/probe/{uuid.uuid4().hex}"
    reader = Collector(port, STATUSES, probe)
    try:
        publish_all(publisher(port), [(probe, b"probe")])
        wait_for(lambda: reader.on(probe), timeout=5)
        return {topic: payload for topic, payload, retain in list(reader.messages) if retain and topic != probe}
    finally:
        reader.close()


def sender_records(caplog: pytest.LogCaptureFixture, level: int, contains: str = "") -> list[logging.LogRecord]:
    return [r for r in list(caplog.records)
            if r.name == "config_sender" and r.levelno == level and contains in r.getMessage()]


@pytest.fixture
def watcher(central_broker: Mosquitto) -> Collector:
    """Every status the sender publishes from now on."""
    return Collector(central_broker.port, STATUSES)


@pytest.fixture
def fleet(internal_broker: Mosquitto) -> Callable[..., MeterSimulator]:
    """Simulated meters that only answer commands, each in its reply mode: ``fleet(**{meter_id: mode})``."""

    def make(**reply_modes: str) -> MeterSimulator:
        return simulated_meters(internal_broker.port, list(reply_modes), cadence=False, reply_mode=reply_modes)

    return make


# --- through each state ------------------------------------------------------------------------


def test_an_answering_meter_goes_pending_then_applied_retained_with_its_own_intervals(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, watcher: Collector,
        fleet: Callable[..., MeterSimulator], central_broker: Mosquitto) -> None:
    fleet(**{HEAT_PUMP: "prompt", OFFICE: "prompt"})
    sender = start_sender(upload_frequency_seconds=300, upload_frequency_minutes=5,
                          devices={HEAT_PUMP: {"name": "Heat pump", "upload_frequency_seconds": 30}})
    began = datetime.now().astimezone()
    central.online(HEAT_PUMP, OFFICE)
    wait_for(lambda: states(watcher, HEAT_PUMP) == ["pending", "applied"]
             and states(watcher, OFFICE) == ["pending", "applied"], timeout=5)

    pending, applied = statuses(watcher, HEAT_PUMP)
    assert pending is not None and applied is not None
    assert list(applied) == KEYS
    assert {key: applied[key] for key in KEYS if key != "updated"} == {
        "id": HEAT_PUMP, "upload_frequency_seconds": 30, "upload_frequency_minutes": 5, "state": "applied",
        "clock_offset_seconds": None}  # no reading seen: the offset is not known
    assert pending["upload_frequency_seconds"] == 30 and pending["upload_frequency_minutes"] == 5
    assert statuses(watcher, OFFICE)[-1]["upload_frequency_seconds"] == 300  # type: ignore[index]
    updated = datetime.fromisoformat(applied["updated"])
    assert applied["updated"].endswith("Z") and updated.utcoffset() == timedelta(0)
    assert began - timedelta(seconds=2) <= updated <= datetime.now().astimezone() + timedelta(seconds=1)

    retained = retained_statuses(central_broker.port)
    assert {topic: json.loads(payload)["state"] for topic, payload in retained.items()} == {
        status_topic(HEAT_PUMP): "applied", status_topic(OFFICE): "applied"}
    wait_for(lambda: sender.stats()["config_status_published"] == 4, timeout=5)
    assert sender.stats()["config_status_refused"] == 0


def test_a_silent_meter_is_no_reply_after_the_alert_and_stays_so_through_its_retries(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, watcher: Collector,
        fleet: Callable[..., MeterSimulator], caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: "none"})
    sender = start_sender(retry_delays=(0.5,), ack_timeout_seconds=0.5)
    central.online(OFFICE)
    wait_for(lambda: states(watcher, OFFICE) == ["pending", "no_reply"], timeout=5)
    assert len(sender_records(caplog, ALERT, f"meter {OFFICE} did not reply")) >= 1
    # The retries go unanswered too (two more ALERTs): the status says so once, not per attempt.
    wait_for(lambda: sender.counters()["alerted"] == 4 and sender.counters()["pending"] == 0, timeout=5)
    wait_for(lambda: sender.stats()["config_status_published"] == 2, timeout=5)
    assert states(watcher, OFFICE) == ["pending", "no_reply"]


def test_a_refusing_meter_is_refused(start_sender: Callable[..., ConfigSender], central: ProxyStandIn,
                                     watcher: Collector, fleet: Callable[..., MeterSimulator]) -> None:
    fleet(**{OFFICE: "error"})  # answers "code":"02"
    sender = start_sender()
    central.online(OFFICE)
    wait_for(lambda: states(watcher, OFFICE) == ["pending", "refused"], timeout=5)
    assert sender.counters()["failed"] == 2


# --- exclusion, restarts, the clock -------------------------------------------------------------------


def test_a_meter_excluded_at_a_reload_has_its_status_cleared(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, watcher: Collector,
        fleet: Callable[..., MeterSimulator], internal_broker: Mosquitto, central_broker: Mosquitto,
        tmp_path: Path) -> None:
    fleet(**{HEAT_PUMP: "prompt", OFFICE: "prompt"})
    sender = start_sender()
    central.online(HEAT_PUMP, OFFICE)
    wait_for(lambda: states(watcher, OFFICE) == ["pending", "applied"]
             and states(watcher, HEAT_PUMP) == ["pending", "applied"], timeout=5)

    write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, exclude=[OFFICE]))
    wait_for(lambda: states(watcher, OFFICE) == ["pending", "applied", None], timeout=5)
    assert watcher.on(status_topic(OFFICE))[-1] == b""
    assert retained_statuses(central_broker.port).keys() == {status_topic(HEAT_PUMP)}
    # The heat pump, configured again by the reload, keeps a status.
    wait_for(lambda: states(watcher, HEAT_PUMP) == ["pending", "applied", "pending", "applied"], timeout=5)
    assert sender.config.meters.exclude == {OFFICE}


def test_a_restarted_sender_pushes_again_to_online_meters_and_leaves_an_offline_ones_status_alone(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, watcher: Collector,
        fleet: Callable[..., MeterSimulator], central_broker: Mosquitto) -> None:
    fleet(**{HEAT_PUMP: "prompt", OFFICE: "prompt"})
    first = start_sender()
    central.online(HEAT_PUMP, OFFICE)
    wait_for(lambda: states(watcher, OFFICE) == ["pending", "applied"]
             and states(watcher, HEAT_PUMP) == ["pending", "applied"], timeout=5)
    first.stop()
    office_status = retained_statuses(central_broker.port)[status_topic(OFFICE)]
    central.publish(f"{MAIN}/{OFFICE}/availability", "offline", retain=True)  # gone while the sender was down

    second = start_sender()
    # The heat pump is pushed again: pending, then applied, honestly. The office's status would have
    # been published before the heat pump's last one (one client, in order): it was not.
    wait_for(lambda: states(watcher, HEAT_PUMP) == ["pending", "applied", "pending", "applied"], timeout=5)
    assert second.known_meters() == {HEAT_PUMP, OFFICE}
    assert states(watcher, OFFICE) == ["pending", "applied"]
    assert retained_statuses(central_broker.port)[status_topic(OFFICE)] == office_status


def test_the_clock_offset_of_a_meter_whose_readings_carry_a_time(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, watcher: Collector,
        fleet: Callable[..., MeterSimulator]) -> None:
    fleet(**{OFFICE: "prompt"})
    start_sender()
    # A live reading discovers the meter; its clock is 100 s ahead (within max_clock_drift_seconds: not set).
    central.reading(OFFICE, datetime.now() + timedelta(seconds=100))
    wait_for(lambda: states(watcher, OFFICE) == ["pending", "applied"], timeout=5)
    for status in statuses(watcher, OFFICE):
        assert status is not None
        offset = status["clock_offset_seconds"]
        print(f"{status['state']}: clock_offset_seconds {offset}")
        assert isinstance(offset, int) and 99 <= offset <= 101


# --- the central broker refuses -----------------------------------------------------------------------


def test_statuses_the_central_broker_refuses_are_errors_and_counted(
        internal_broker: Mosquitto, tmp_path: Path, cleanup: Callable[[Callable[[], object]], None],
        fleet: Callable[..., MeterSimulator], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="config_sender")
    # The sender may write its stats, not the meters' statuses.
    central = acl_central_broker(cleanup, tmp_path / "central", (
        "topic readwrite #\n"  # anonymous: the test's stand-in for the proxy
        f"user {SENDER_USER}\n"
        f"topic read {MAIN}/#\n"
        f"topic write {MAIN}/bridge/#\n"
    ), SENDER_USER)
    fleet(**{OFFICE: "prompt"})
    path = write_config(tmp_path, config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"username": SENDER_USER, "password": CENTRAL_PASSWORD},
        "health": {"stats_interval_seconds": 1}}))
    sender = ConfigSender(config_loader.load_config(path, {}), path, environ={}, client_id_prefix="test-refused")
    sender.start()
    cleanup(sender.stop)
    assert sender.wait_ready(10)
    stand_in = ProxyStandIn(central.port)
    cleanup(stand_in.close)
    stats = Collector(central.port, f"{MAIN}/bridge/config_sender/stats")
    stand_in.online(OFFICE)

    wait_for(lambda: sender.stats()["config_status_refused"] == 2, timeout=10)  # pending, then applied
    errors = [r.getMessage() for r in sender_records(caplog, logging.ERROR, status_topic(OFFICE))]
    print(f"\n[refused status] {errors[0]}")
    assert errors[0] == (f"the central broker refused {status_topic(OFFICE)}: Not authorized; "
                         f"the configuration status of meter {OFFICE} is not published")
    assert sender.stats()["config_status_published"] == 0
    # The stats still go out, and say so.
    wait_for(lambda: any(json.loads(p)["config_status_refused"] == 2 for p in stats.on(
        f"{MAIN}/bridge/config_sender/stats")), timeout=5)


# --- many meters at once -------------------------------------------------------------------------------


def test_a_thousand_meters_configured_at_once_all_end_applied_retained_in_at_most_two_messages_each(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, watcher: Collector,
        fleet: Callable[..., MeterSimulator], central_broker: Mosquitto) -> None:
    meter_ids = [f"33B12261{n:05d}" for n in range(1000)]
    fleet(**dict.fromkeys(meter_ids, "prompt"))
    sender = start_sender()
    began = time.monotonic()
    central.online(*meter_ids)

    def all_applied() -> bool:
        return sender.counters()["acked"] == 2000 and sender.stats()["config_status_published"] >= 1000 and all(
            states(watcher, meter_id)[-1:] == ["applied"] for meter_id in meter_ids)

    wait_for(all_applied, timeout=30, interval=0.2)
    elapsed = time.monotonic() - began
    messages = watcher.count("/config_status")
    print(f"\n1,000 meters: all applied {elapsed:.2f} s after they appeared; {messages} status messages; "
          f"sender healthy: {sender.is_healthy()}")
    assert messages <= 2000
    assert all(states(watcher, meter_id) in (["pending", "applied"], ["applied"]) for meter_id in meter_ids)
    assert sender.is_healthy()
    retained = retained_statuses(central_broker.port)
    assert len(retained) == 1000
    assert {json.loads(payload)["state"] for payload in retained.values()} == {"applied"}
