"""Publishes a broker refuses (PUBACK reason ≥ 0x80), against real Mosquitto ACLs.

Mosquitto 2.0 answers a QoS 1 publish of an MQTT 5 client that its ACL does
not allow with PUBACK reason 0x87 "Not authorized" (and delivers it to no
one). Such a message was never delivered: a refused reading must not be
counted as forwarded nor journalled, and the operator must read why in an
ERROR that names the topic, rate-limited like the rejections. The config
sender must not take a refused command for sent, nor raise an ALERT for a
meter that never got it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import (
    MAIN,
    Collector,
    ProxyStandIn,
    config_dict,
    latest_stats,
    publish_all,
    publisher,
    start_proxy,
    write_config,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from payloads import eny_now, minute
from test_internal_broker_config import METER_A, OBSERVER, SENDER, USER_A, InternalBroker
from test_internal_broker_config import PASSWORD as INTERNAL_PASSWORD

import config_loader
import daemon
from command_tracking import CommandKind, CommandTracker, SlotStatus
from config_loader import MeterSettings
from config_sender import ConfigSender
from daemon import ALERT, RateLimitedLog
from kpm33b_proxy import Outgoing, Proxy
from mqtt_client import refusal

PROXY_USER = "kpm33b-proxy"
SENDER_USER = "kpm33b-config-sender"
CENTRAL_PASSWORD = "central-secret"
METER = "33B1225950027"
LOCAL_NOW = datetime(2026, 1, 12, 16, 39, 5)
NO_ACCOUNT = "33B1225950031"  # discovered on the central broker, but without an account on the internal one
READINGS = 100
FIRST_READING = datetime(2026, 1, 17, 10, 0)
BURST = 10  # RateLimitedLog's default: lines per minute before the rest are only counted
REFUSED_LINE = re.compile(r" ERROR kpm33b_proxy: the central broker refused (\S+) \(([^)]*)\)")
REFUSAL_SUMMARY = re.compile(r"(\d+) more refused publishes not logged \(([^)]*)\)")


def acl_central_broker(cleanup: Callable[[Callable[[], object]], None], directory: Path, acl: str,
                       *users: str) -> Mosquitto:
    """A central broker with a password file for ``users`` and ``acl``; anonymous clients as the ACL says."""
    directory.mkdir(parents=True, exist_ok=True)
    passwd = directory / "passwd"
    passwd.touch()
    for user in users:
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, CENTRAL_PASSWORD], check=True, timeout=30)
    (directory / "acl").write_text(acl)
    broker = Mosquitto(extra_config=f"password_file {passwd}\nacl_file {directory / 'acl'}")
    cleanup(broker.cleanup)
    return broker.start()


# --- the proxy ----------------------------------------------------------------------------


def test_readings_and_discovery_configs_the_central_broker_refuses_are_dropped_and_logged(
        tmp_path: Path, internal_broker: Mosquitto, cleanup: Callable[[Callable[[], object]], None]) -> None:
    # The proxy's account may write its bridge topics only: not the readings, not Home Assistant's configs.
    central = acl_central_broker(cleanup, tmp_path / "central", (
        "topic read #\n"  # anonymous: the test's observer
        f"user {PROXY_USER}\n"
        "topic readwrite kpm33b/bridge/#\n"
        "topic read homeassistant/#\n"
    ), PROXY_USER)
    observer = Collector(central.port, "kpm33b/#", "homeassistant/#")
    cleanup(observer.close)
    proxy = start_proxy(write_config(tmp_path, config_dict(internal_broker.port, central.port, sections={
        "central_broker": {"username": PROXY_USER, "password": CENTRAL_PASSWORD},
        "health": {"stats_interval_seconds": 1}})))

    feeder = publisher(internal_broker.port)
    cleanup(lambda: (feeder.disconnect(), feeder.loop_stop()))
    # Distinct readings: each its own minute and a rising counter.
    publish_all(feeder, [("MQTT_ENY_NOW", eny_now(METER, minute(index, FIRST_READING), 100.0 + index))
                         for index in range(READINGS)])

    def settled() -> dict[str, object] | None:
        stats = latest_stats(observer)
        if stats is None or stats["received"] != READINGS or stats["queue_depth"] != 0:
            return None
        dropped = stats["dropped"]
        assert isinstance(dropped, dict)
        return stats if stats["forwarded"] + dropped.get("refused_by_central", 0) == READINGS else None

    stats = wait_for(settled, timeout=20)
    assert isinstance(stats, dict)
    print(f"\n[refused readings] stats: {json.dumps(stats)}")
    assert stats["forwarded"] == 0
    assert stats["dropped"] == {"refused_by_central": READINGS}

    # The broker delivered none of them; the proxy said so, naming the topic and the broker's reason.
    assert [topic for topic in observer.topics() if not topic.startswith("kpm33b/bridge/")] == []
    refused = REFUSED_LINE.findall(proxy.output())
    # Among the first BURST lines: the bridge's five discovery configs, the meter's availability and the
    # configs of its two sensors, all ahead of its first reading (its two diagnostic configs follow at the
    # next tick; the rest is counted in the summary below).
    assert (f"kpm33b/{METER}/availability", "Not authorized") in refused
    assert (f"homeassistant/sensor/kpm33b_{METER}/active_energy/config", "Not authorized") in refused
    assert ("homeassistant/binary_sensor/kpm33b_bridge/connection_state/config", "Not authorized") in refused
    assert proxy.terminate() == 0

    # Rate-limited: the first BURST refusals in full, the rest counted in one summary at shutdown.
    output = proxy.output()
    logged = len(REFUSED_LINE.findall(output))
    summaries = REFUSAL_SUMMARY.findall(output)
    summarised = sum(int(count) for count, _reasons in summaries)
    # Each reading, its meter's availability, its four discovery configs and the bridge's five.
    refused_messages = READINGS + 1 + 4 + 5
    print(f"[refused readings] ERROR lines: {logged}; summarised: {summaries}")
    assert logged == BURST
    assert logged + summarised == refused_messages
    assert summaries == [(str(READINGS), f"Not authorized {READINGS}")]  # the readings
    assert f'stats: {{"received": {READINGS}, "forwarded": 0, "dropped": {{"refused_by_central": {READINGS}}}' \
        in output
    assert "Traceback" not in output

    # Never delivered, so never journalled: the next start must not trust these counters.
    journal = tmp_path / "state" / "energy.journal"
    assert journal.exists()
    assert METER not in journal.read_text()


def test_a_refusal_acknowledged_before_publish_returned_is_still_a_refusal(tmp_path: Path) -> None:
    """The PUBACK can beat ``publish()`` back to the caller: the refusal must survive that race."""
    config = config_loader.load_config(write_config(tmp_path, config_dict(1, 2)), {})
    proxy = Proxy(config, tmp_path / "state")
    acked: list[int] = []
    proxy.internal.ack = lambda mid, qos: acked.append(mid)  # type: ignore[method-assign]
    answers = iter([ReasonCode(PacketTypes.PUBACK, "Not authorized"), ReasonCode(PacketTypes.PUBACK, "Success")])

    class Info:
        mid = 0

    def publish_acknowledged_at_once(topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        Info.mid += 1
        proxy._on_central_publish(proxy.central, None, Info.mid, next(answers), None)
        return Info()

    proxy.central.publish = publish_acknowledged_at_once  # type: ignore[assignment,method-assign]
    proxy.outgoing.set_connected(True)  # published at once from this thread (no publisher thread started)
    proxy.journal.open()
    try:
        for source_mid, energy in ((7, 101.0), (8, 102.0)):
            proxy.outgoing.put(Outgoing(f"kpm33b/{METER}/minutes", b"{}", True, source_mid=source_mid, reading=True,
                                        energy=(METER, energy, "20260112170000")))
        proxy.journal.flush()
        journal = proxy.journal.path.read_text()
    finally:
        proxy.journal.close()
    assert proxy.counters.get("forwarded") == 1
    assert proxy.stats(0.0)["dropped"] == {"refused_by_central": 1}
    assert acked == [7, 8]  # both handled: a refusal is not retried
    assert "101.0" not in journal and "102.0" in journal
    assert proxy.outgoing.pending() == 0


# --- the config sender ---------------------------------------------------------------------


def test_commands_and_stats_the_brokers_refuse_are_errors_not_alerts(
        tmp_path: Path, cleanup: Callable[[Callable[[], object]], None], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="config_sender")
    # The production ACL: the sender may command only the meters that have an account.
    internal = InternalBroker(tmp_path / "internal")
    internal.mosquitto.start()
    cleanup(internal.close)
    meter = internal.login(USER_A)
    meter.subscribe(f"MQTT_COMMOD_SET_{USER_A}")
    observer = internal.login(OBSERVER)
    observer.subscribe("#")
    # Centrally the sender may read the meters' topics, but not publish its stats.
    central = acl_central_broker(cleanup, tmp_path / "central", (
        "topic readwrite #\n"  # anonymous: the test's stand-in for the proxy
        f"user {SENDER_USER}\n"
        f"topic read {MAIN}/#\n"
    ), SENDER_USER)
    path = write_config(tmp_path, config_dict(internal.port, central.port, ack_timeout_seconds=3, sections={
        "internal_broker": {"username": SENDER, "password": INTERNAL_PASSWORD},
        "central_broker": {"username": SENDER_USER, "password": CENTRAL_PASSWORD},
        "health": {"stats_interval_seconds": 1}}))
    sender = ConfigSender(config_loader.load_config(path, {}), path, environ={}, client_id_prefix="test-refused")
    sender.start()
    cleanup(sender.stop)
    assert sender.wait_ready(10)
    stand_in = ProxyStandIn(central.port)
    cleanup(stand_in.close)
    stand_in.online(METER_A, NO_ACCOUNT)

    # The meter with an account gets its two commands and answers them.
    wait_for(lambda: len(meter.messages) == 2, timeout=10)
    for _topic, payload in list(meter.messages):
        assert not meter.publish("MQTT_COMMOD_SET_REP", json.dumps(
            {"id": METER_A, "oprid": json.loads(payload)["oprid"], "code": "01"})).is_failure

    def errors(text: str) -> list[str]:
        return [record.getMessage() for record in caplog.records
                if record.name == "config_sender" and record.levelno == logging.ERROR and text in record.getMessage()]

    refused_topic = f"MQTT_COMMOD_SET_{NO_ACCOUNT[-8:]}"
    wait_for(lambda: len(errors(refused_topic)) == 2, timeout=10)
    for line in errors(refused_topic):
        print(f"\n[refused command] {line}")
        assert line.startswith(f"the internal broker refused meter {NO_ACCOUNT} ")
        assert line.endswith(f" on {refused_topic}: Not authorized; not sent")
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=10)
    counters = sender.counters()
    # Nothing is pending any more, so no deadline is left that could raise an ALERT later.
    assert {key: counters[key] for key in ("sent", "refused_by_broker", "acked", "pending", "alerted")} == {
        "sent": 2, "refused_by_broker": 2, "acked": 2, "pending": 0, "alerted": 0}
    assert not [record for record in caplog.records if record.levelno == ALERT]
    assert refused_topic not in observer.topics()

    # The stats the central broker refuses: an ERROR naming the topic and the reason.
    stats_topic = f"{MAIN}/bridge/config_sender/stats"
    wait_for(lambda: errors(stats_topic), timeout=10)
    print(f"[refused stats] {errors(stats_topic)[0]}")
    assert errors(stats_topic)[0] == f"the central broker refused {stats_topic}: Not authorized"


def test_a_refused_command_is_neither_sent_nor_alerted_nor_retried() -> None:
    tracker = CommandTracker(MeterSettings(), retry_delays=(10.0,))
    tracker.observe_availability(NO_ACCOUNT, "online", now=0.0)
    seconds, minutes = tracker.pop_outgoing(LOCAL_NOW), tracker.pop_outgoing(LOCAL_NOW)
    assert seconds is not None and minutes is not None and tracker.pop_outgoing(LOCAL_NOW) is None
    tracker.mark_sent(seconds, 0.0)
    tracker.mark_sent(minutes, 0.0)
    assert (seconds.kind, minutes.kind) == (CommandKind.SECONDS_INTERVAL, CommandKind.MINUTES_INTERVAL)
    tracker.refused_by_broker(seconds)
    counters = tracker.counters()
    assert (counters["sent"], counters["refused_by_broker"], counters["pending"]) == (1, 1, 1)
    assert tracker.slot_status(NO_ACCOUNT, CommandKind.SECONDS_INTERVAL) is SlotStatus.REFUSED
    # Past every deadline and retry: only the command the broker took times out and is retried.
    events = tracker.tick(5.0) + tracker.tick(20.0)
    assert [(type(event).__name__, event.command.kind) for event in events] == [  # type: ignore[union-attr]
        ("NoReply", CommandKind.MINUTES_INTERVAL), ("Retrying", CommandKind.MINUTES_INTERVAL)]
    retry = tracker.pop_outgoing(LOCAL_NOW)
    assert retry is not None and retry.kind is CommandKind.MINUTES_INTERVAL
    assert tracker.pop_outgoing(LOCAL_NOW) is None
    assert tracker.counters()["alerted"] == 1


# --- what a PUBACK says, and the rate-limited log ------------------------------


@pytest.mark.parametrize(("name", "expected"), [
    ("Success", None),
    ("No matching subscribers", None),  # 0x10: delivered to nobody, but accepted
    ("Not authorized", "Not authorized"),
    ("Quota exceeded", "Quota exceeded"),
    ("Payload format invalid", "Payload format invalid"),
    ("Unspecified error", "Unspecified error"),
])
def test_refusal_is_the_reason_of_a_failing_puback_only(name: str, expected: str | None) -> None:
    assert refusal(ReasonCode(PacketTypes.PUBACK, name)) == expected


def test_refusal_of_something_that_is_not_a_reason_code_is_none() -> None:
    assert refusal(None) is None
    assert refusal(0) is None


def test_rate_limited_errors_are_errors_and_their_summary_too(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_refused")
    caplog.set_level(logging.DEBUG, logger="test_refused")
    limited = RateLimitedLog(logger, burst=2, what="refused publishes")
    for index in range(5):
        limited.error("Not authorized", "refused %d", index)
    limited.flush()
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.ERROR, "refused 0"),
        (logging.ERROR, "refused 1"),
        (logging.ERROR, "3 more refused publishes not logged (Not authorized 3)"),
    ]


def test_warnings_keep_their_level_and_wording(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test_refused")
    caplog.set_level(logging.DEBUG, logger="test_refused")
    limited = RateLimitedLog(logger, burst=1)
    for index in range(3):
        limited.warning("bad json", "rejected %d", index)
    limited.flush()
    assert [(record.levelno, record.getMessage()) for record in caplog.records] == [
        (logging.WARNING, "rejected 0"),
        (logging.WARNING, "2 more rejected messages not logged (bad json 2)"),
    ]


def test_the_summary_at_shutdown_survives_a_start_time_that_rounds_badly(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    # (4053.7071533203184 + 60) - 4053.7071533203184 < 60 in floating point.
    monkeypatch.setattr(daemon.time, "monotonic", lambda: 4053.7071533203184)
    logger = logging.getLogger("test_refused")
    caplog.set_level(logging.DEBUG, logger="test_refused")
    limited = RateLimitedLog(logger, burst=1, what="refused publishes")
    for index in range(3):
        limited.error("Not authorized", "refused %d", index)
    limited.flush()
    assert [record.getMessage() for record in caplog.records] == [
        "refused 0", "2 more refused publishes not logged (Not authorized 2)"]
