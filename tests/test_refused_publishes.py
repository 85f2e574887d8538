"""Publishes a broker refuses (PUBACK reason ≥ 0x80), against real Mosquitto ACLs.

Mosquitto 2.0 answers a QoS 1 publish of an MQTT 5 client that its ACL does
not allow with PUBACK reason 0x87 "Not authorized" (and delivers it to no
one). Such a message was never delivered: a refused reading must not be
counted as forwarded nor journalled, and the operator must read why in an
ERROR that names the topic, rate-limited like the rejections.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import Collector, DaemonProcess, config_dict, publish_all, publisher, write_config
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

import config_loader
import mqtt_common
from kpm33b_proxy import Outgoing, Proxy
from mqtt_common import RateLimitedLog, refusal

PROXY_SCRIPT = "kpm33b_proxy.py"
PROXY_USER = "kpm33b-proxy"
CENTRAL_PASSWORD = "central-secret"
METER = "33B1225950027"
READINGS = 100
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


def eny_now(index: int) -> tuple[str, str]:
    """A distinct energy reading of METER: its own minute and a rising counter."""
    return ("MQTT_ENY_NOW", json.dumps({"id": METER, "zygsz": 100.0 + index, "fygsz": 0.0,
                                        "time": f"20260117{10 + index // 60:02d}{index % 60:02d}00", "isend": "1"}))


def latest_stats(collector: Collector) -> dict[str, object] | None:
    payloads = collector.on("kpm33b/bridge/stats")
    return json.loads(payloads[-1]) if payloads else None


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
    document = config_dict(internal_broker.port, central.port)
    document["central_broker"].update(username=PROXY_USER, password=CENTRAL_PASSWORD)
    document["health"] = {"stats_interval_seconds": 1}
    config = write_config(tmp_path, document)
    proxy = DaemonProcess(PROXY_SCRIPT, config)
    wait_for(lambda: "bridge state online" in proxy.output() or not proxy.alive(), timeout=20)
    assert proxy.alive(), proxy.output()

    feeder = publisher(internal_broker.port)
    cleanup(lambda: (feeder.disconnect(), feeder.loop_stop()))
    publish_all(feeder, [eny_now(index) for index in range(READINGS)])

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
    assert (f"kpm33b/{METER}/minutes", "Not authorized") in refused
    assert (f"homeassistant/sensor/kpm33b_{METER}/active_energy/config", "Not authorized") in refused
    assert proxy.terminate() == 0

    # Rate-limited: the first BURST refusals in full, the rest counted in one summary at shutdown.
    output = proxy.output()
    logged = len(REFUSED_LINE.findall(output))
    summaries = REFUSAL_SUMMARY.findall(output)
    summarised = sum(int(count) for count, _reasons in summaries)
    # Each reading, its meter's availability and its two discovery configs.
    refused_messages = READINGS + 1 + 2
    print(f"[refused readings] ERROR lines: {logged}; summarised: {summaries}")
    assert logged == BURST
    assert logged + summarised == refused_messages
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
    proxy.journal.open()
    try:
        for source_mid, energy in ((7, 101.0), (8, 102.0)):
            proxy.queue.outstanding += 1  # as _enqueue counts it
            proxy._hand_over(Outgoing(f"kpm33b/{METER}/minutes", b"{}", True, source_mid=source_mid, reading=True,
                                      energy=(METER, energy)))
        proxy.journal.flush()
        journal = proxy.journal.path.read_text()
    finally:
        proxy.journal.close()
    assert proxy.counters.get("forwarded") == 1
    assert proxy.stats(0.0)["dropped"] == {"refused_by_central": 1}
    assert acked == [7, 8]  # both handled: a refusal is not retried
    assert "101.0" not in journal and "102.0" in journal
    assert proxy.queue.outstanding == 0
    assert proxy._acked_early == {} and proxy._handed == {}


# --- mqtt_common: what a PUBACK says, and the rate-limited log ------------------------------


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
    monkeypatch.setattr(mqtt_common.time, "monotonic", lambda: 4053.7071533203184)
    logger = logging.getLogger("test_refused")
    caplog.set_level(logging.DEBUG, logger="test_refused")
    limited = RateLimitedLog(logger, burst=1, what="refused publishes")
    for index in range(3):
        limited.error("Not authorized", "refused %d", index)
    limited.flush()
    assert [record.getMessage() for record in caplog.records] == [
        "refused 0", "2 more refused publishes not logged (Not authorized 2)"]
