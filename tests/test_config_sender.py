"""Integration tests of config_sender against real Mosquitto brokers.

The sender runs in-process (so its log records can be captured and timed),
except for one test that runs it as a real process to check signals and exit
codes. A small fake fleet of meters on the internal broker answers commands
the way the protocol says, per meter: promptly, late, with code 02, or never.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from broker import Mosquitto, wait_for
from daemons import DaemonProcess
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from config_loader import load_config
from config_sender import ConfigSender
from daemon import ALERT
from tools.meter_simulator import MeterSimulator

ROOT = Path(__file__).resolve().parent.parent
HEAT_PUMP = "33B1225950027"
OFFICE = "33B1225950028"
EXCLUDED = "33B1225950099"
MAIN = "kpm33b"


# --- helpers: a fake fleet, a central publisher, configuration files --------------------------


@dataclass(frozen=True)
class ReceivedCommand:
    """A command as a meter got it."""

    meter_id: str
    topic: str
    payload: dict[str, Any]
    received_at: float  # time.time()


class FakeMeters:
    """Meters on the internal broker answering commands per meter: ack, fail, late or silent.

    One paho client sees every command topic; it maps the last 8 characters of
    the topic back to the meter id. A persistent session
    keeps its subscriptions across a broker restart, like a meter that
    reconnects.
    """

    def __init__(self, port: int, meters: dict[str, str | tuple[str, Any]]) -> None:
        self.behaviour = dict(meters)
        self.by_suffix = {meter_id[-8:]: meter_id for meter_id in meters}
        self.received: list[ReceivedCommand] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._timers: list[threading.Timer] = []
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=f"fake-meters-{port}", protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", port, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self._subscribed.wait(5)

    def _on_connect(self, client: mqtt.Client, *_args: Any) -> None:
        # Everything, so that a command to a meter that should get none shows too.
        client.subscribe("#", 1)

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        prefix, _, suffix = message.topic.rpartition("_")
        if prefix not in ("MQTT_COMMOD_SET", "MQTT_SETTIME") or len(suffix) != 8:
            return  # a reply or a reading, not a command
        meter_id = self.by_suffix.get(suffix, "unknown")
        payload = json.loads(message.payload)
        with self._lock:
            self.received.append(ReceivedCommand(meter_id, message.topic, payload, time.time()))
        behaviour = self.behaviour.get(meter_id, "ack")
        reply_topic = "MQTT_METER_TIME_REP" if message.topic.startswith("MQTT_SETTIME_") else "MQTT_COMMOD_SET_REP"
        reply = {"id": meter_id, "oprid": payload["oprid"], "code": "01"}
        match behaviour:
            case "ack":
                client.publish(reply_topic, json.dumps(reply), qos=1)
            case ("fail", msg):
                client.publish(reply_topic, json.dumps({**reply, "code": "02", "msg": msg}), qos=1)
            case ("late", delay):
                timer = threading.Timer(delay, client.publish, (reply_topic, json.dumps(reply), 1))
                self._timers.append(timer)
                timer.start()
            case "silent":
                pass

    def commands(self, meter_id: str | None = None) -> list[ReceivedCommand]:
        """What the meters received so far (of one meter, if given)."""
        with self._lock:
            return [c for c in self.received if meter_id is None or c.meter_id == meter_id]

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self.client.disconnect()
        self.client.loop_stop()


class Central:
    """A publisher on the central broker, standing in for the proxy."""

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
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def online(self, *meter_ids: str) -> None:
        """Announce meters the way the proxy does: retained availability."""
        infos = [self.client.publish(f"{MAIN}/{m}/availability", "online", qos=1, retain=True) for m in meter_ids]
        for info in infos:
            info.wait_for_publish(5)

    def reading(self, meter_id: str, meter_time: datetime, retain: bool = False) -> None:
        payload = {"id": meter_id, "time": meter_time.isoformat(timespec="seconds"), "active_power": 6.6905}
        self.publish(f"{MAIN}/{meter_id}/seconds", json.dumps(payload), retain=retain)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def write_config(path: Path, internal: Mosquitto, central: Mosquitto, sections: dict[str, Any] | None = None,
                 **meters: Any) -> Path:
    """A config.yaml for the test brokers; ``meters`` keys go into the ``meters`` section."""
    document = {
        "internal_broker": {"host": "127.0.0.1", "port": internal.port},
        "central_broker": {"host": "127.0.0.1", "port": central.port},
        "meters": meters,
        "logging": {"level": "DEBUG"},
        **(sections or {}),
    }
    text = yaml.safe_dump(document)
    path.write_text(text)
    return path


def sender_records(caplog: pytest.LogCaptureFixture, level: int | None = None,
                   contains: str = "") -> list[logging.LogRecord]:
    """The sender's log records so far, filtered."""
    return [r for r in list(caplog.records)
            if r.name == "config_sender" and (level is None or r.levelno == level) and contains in r.getMessage()]


@pytest.fixture
def central(central_broker: Mosquitto) -> Iterator[Central]:
    publisher = Central(central_broker.port)
    yield publisher
    publisher.close()


@pytest.fixture
def fleet(internal_broker: Mosquitto) -> Iterator[Callable[..., FakeMeters]]:
    made: list[FakeMeters] = []

    def make(**meters: str | tuple[str, Any]) -> FakeMeters:
        fake = FakeMeters(internal_broker.port, meters)
        made.append(fake)
        return fake

    yield make
    for fake in made:
        fake.close()


@pytest.fixture
def start_sender(internal_broker: Mosquitto, central_broker: Mosquitto, tmp_path: Path,
                 caplog: pytest.LogCaptureFixture) -> Iterator[Callable[..., ConfigSender]]:
    """Start an in-process sender on the test brokers; stopped at the end of the test."""
    caplog.set_level(logging.DEBUG, logger="config_sender")
    started: list[ConfigSender] = []

    def start(retry_delays: tuple[float, ...] = (10.0, 60.0, 300.0), sections: dict[str, Any] | None = None,
              **meters: Any) -> ConfigSender:
        path = tmp_path / "config.yaml"
        if meters or sections or not path.exists():
            write_config(path, internal_broker, central_broker, sections, **meters)
        sender = ConfigSender(load_config(path, {}), path, environ={}, retry_delays=retry_delays,
                              client_id_prefix=f"test-sender-{len(started)}")
        sender.start()
        started.append(sender)
        assert sender.wait_ready(10), "sender did not connect and subscribe to both brokers"
        return sender

    yield start
    for sender in started:
        sender.stop()


def acked(caplog: pytest.LogCaptureFixture, meter_id: str) -> int:
    return len(sender_records(caplog, logging.INFO, f"meter {meter_id} acknowledged"))


# --- discovery and interval commands ---------------------------------------------------------


def test_discovered_meters_get_both_interval_commands_with_override_and_exclusion(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{HEAT_PUMP: "ack", OFFICE: "ack", EXCLUDED: "ack"})
    sender = start_sender(upload_frequency_seconds=300, upload_frequency_minutes=5, exclude=[EXCLUDED],
                          devices={HEAT_PUMP: {"name": "Heat pump", "upload_frequency_seconds": 30}})
    central.publish(f"{MAIN}/bridge/state", "online", retain=True)
    central.online(HEAT_PUMP, EXCLUDED)
    central.reading(OFFICE, datetime.now())  # a meter is discovered from its readings too

    wait_for(lambda: acked(caplog, HEAT_PUMP) == 2 and acked(caplog, OFFICE) == 2, timeout=5)
    assert sender.known_meters() == {HEAT_PUMP, OFFICE, EXCLUDED}
    for meter_id, seconds in ((HEAT_PUMP, "30"), (OFFICE, "300")):
        commands = meters.commands(meter_id)
        assert [c.topic for c in commands] == [f"MQTT_COMMOD_SET_{meter_id[-8:]}"] * 2
        assert [(c.payload["Cmd"], c.payload["value"], c.payload["types"]) for c in commands] == [
            ("0000", seconds, "1"), ("0001", "5", "1")]
        assert all(len(c.payload["oprid"]) == 32 and set(c.payload) == {"oprid", "Cmd", "value", "types"}
                   for c in commands)
    assert len({c.payload["oprid"] for c in meters.commands()}) == 4
    assert meters.commands(EXCLUDED) == []
    assert meters.commands("unknown") == []
    assert sender_records(caplog, contains=f"discovered meter {EXCLUDED} (from availability): excluded")


def test_prompt_reply_is_logged_at_info_with_its_latency(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{OFFICE: "ack"})
    sender = start_sender()
    central.online(OFFICE)
    wait_for(lambda: acked(caplog, OFFICE) == 2, timeout=5)
    oprid = meters.commands(OFFICE)[0].payload["oprid"]
    [record] = sender_records(caplog, logging.INFO, oprid)
    assert record.getMessage().startswith(f"meter {OFFICE} acknowledged seconds interval (Cmd 0000) = 60 in 0.")
    assert record.getMessage().endswith(f" s (oprid {oprid})")
    assert sender.counters()["acked"] == 2
    assert sender_records(caplog, ALERT) == []


def test_missing_reply_is_exactly_one_alert_between_3_and_3_5_seconds_after_the_command(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{OFFICE: "silent"})
    sender = start_sender()  # the default ack_timeout_seconds: 3
    central.online(OFFICE)
    wait_for(lambda: len(sender_records(caplog, ALERT)) == 2, timeout=6)
    for command in meters.commands(OFFICE):
        oprid = command.payload["oprid"]
        [sent] = [r for r in sender_records(caplog, logging.DEBUG, oprid) if r.getMessage().startswith("sent ")]
        [alert] = sender_records(caplog, ALERT, oprid)
        print(f"ALERT {alert.created - sent.created:.3f} s after the command")
        assert 3.0 <= alert.created - sent.created <= 3.5
        kind = "seconds interval (Cmd 0000)" if command.payload["Cmd"] == "0000" else "minutes interval (Cmd 0001)"
        value = command.payload["value"]
        assert alert.getMessage() == (f"meter {OFFICE} did not reply to {kind} = {value} within 3 s "
                                      f"(oprid {oprid}); retry 1 of 3 in 10 s")
    assert sender.counters()["alerted"] == 2


def test_refusal_with_code_02_is_an_alert_with_the_meters_msg(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: ("fail", "value out of range")})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(OFFICE)
    wait_for(lambda: len(sender_records(caplog, ALERT)) == 2, timeout=5)
    messages = [r.getMessage() for r in sender_records(caplog, ALERT)]
    assert all(m.startswith(f"meter {OFFICE} refused ") and "msg 'value out of range'" in m for m in messages)
    assert sender.counters()["failed"] == 2


def test_reply_after_the_timeout_is_an_alert_then_a_warning(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: ("late", 0.8)})
    sender = start_sender(ack_timeout_seconds=0.4)
    central.online(OFFICE)
    wait_for(lambda: len(sender_records(caplog, logging.WARNING, "late reply")) == 2, timeout=5)
    assert len(sender_records(caplog, ALERT, "did not reply")) == 2
    late = sender_records(caplog, logging.WARNING, "late reply")[0].getMessage()
    assert late.startswith(f"late reply from meter {OFFICE} to ") and "accepted; retries stopped" in late
    assert sender.counters()["late"] == 2


def test_hostile_replies_are_counted_and_the_sender_keeps_working(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        internal_broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    fake = fleet(**{OFFICE: "ack"})
    sender = start_sender()
    for payload in (b"{not json", json.dumps({"oprid": "f" * 32, "code": "01"}).encode(),
                    json.dumps({"oprid": 5, "code": ["01"]}).encode(), b"\xff" * 10):
        fake.client.publish("MQTT_COMMOD_SET_REP", payload, qos=1).wait_for_publish(5)
    wait_for(lambda: sender.counters()["rejected_replies"] == 4, timeout=5)
    assert {r.getMessage().split(": ")[1] for r in sender_records(caplog, logging.WARNING, "rejected reply")} == {
        "malformed JSON", "unknown oprid", "bad oprid"}
    central.online(OFFICE)
    wait_for(lambda: acked(caplog, OFFICE) == 2, timeout=5)


def test_counters_are_published_retained_on_the_central_broker(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: "ack"})
    sender = start_sender(sections={"health": {"stats_interval_seconds": 1}})
    topic = f"{MAIN}/bridge/config_sender/stats"
    central.watch(topic)
    central.online(OFFICE)
    wait_for(lambda: topic in central.latest and json.loads(central.latest[topic])["acked"] == 2, timeout=5)
    stats = json.loads(central.latest[topic])
    assert {key: stats[key] for key in ("sent", "acked", "alerted", "late", "failed", "pending", "retried",
                                        "rejected_replies", "meters")} == {
        "sent": 2, "acked": 2, "alerted": 0, "late": 0, "failed": 0, "pending": 0, "retried": 0,
        "rejected_replies": 0, "meters": 1}
    assert sender_records(caplog, logging.INFO, "stats: {")
    assert sender.stats()["acked"] == 2


# --- many meters at once -----------------------------------------------------------------


def test_200_meters_at_once_half_silent_all_settle_within_one_timeout(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    meter_ids = [f"33B12260{n:05d}" for n in range(200)]
    fleet(**{meter_id: ("ack" if n % 2 else "silent") for n, meter_id in enumerate(meter_ids)})
    sender = start_sender(ack_timeout_seconds=1)
    began = time.monotonic()
    central.online(*meter_ids)
    wait_for(lambda: sender.counters()["acked"] == 200 and sender.counters()["alerted"] == 200, timeout=5)
    elapsed = time.monotonic() - began
    print(f"200 meters: 400 commands acked or alerted in {elapsed:.3f} s (ack timeout 1 s)")
    assert elapsed <= 1 + 1.0
    assert sender.counters()["pending"] == 0
    assert len(sender_records(caplog, ALERT)) == 200


# --- configuration changes --------------------------------------------------------------------


def _edit_resends_to_every_meter(start_sender: Callable[..., ConfigSender], central: Central,
                                 fleet: Callable[..., FakeMeters], caplog: pytest.LogCaptureFixture,
                                 tmp_path: Path, edit: Callable[[Path, str], None]) -> None:
    meter_ids = [HEAT_PUMP, OFFICE, "33B1225950029"]
    meters = fleet(**dict.fromkeys(meter_ids, "ack"))
    sender = start_sender(ack_timeout_seconds=1)
    central.online(*meter_ids)
    wait_for(lambda: sender.counters()["acked"] == 6, timeout=5)
    path = tmp_path / "config.yaml"
    text = path.read_text().replace("ack_timeout_seconds: 1", "ack_timeout_seconds: 1\n  upload_frequency_seconds: 900")
    assert "900" in text
    saved = time.time()
    edit(path, text)

    def resent() -> bool:
        return all(any(c.payload.get("value") == "900" for c in meters.commands(m)) for m in meter_ids)

    wait_for(resent, timeout=2)
    new_commands = [c for c in meters.commands() if c.payload.get("value") == "900"]
    first = min(c.received_at for c in new_commands) - saved
    last = max(c.received_at for c in new_commands) - saved
    print(f"config save to first command {first * 1000:.0f} ms, to the last of 3 meters {last * 1000:.0f} ms")
    assert last <= 1.0
    wait_for(lambda: sender.counters()["acked"] == 12, timeout=5)
    assert sender.config.meters.upload_frequency_seconds == 900


def test_editing_config_in_place_resends_to_every_known_meter_within_a_second(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    def in_place(path: Path, text: str) -> None:
        with path.open("r+") as file:
            file.write(text)
            file.truncate()

    _edit_resends_to_every_meter(start_sender, central, fleet, caplog, tmp_path, in_place)


def test_replacing_config_by_atomic_rename_resends_to_every_known_meter_within_a_second(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    def atomic_rename(path: Path, text: str) -> None:
        temporary = path.with_name(".config.yaml.swp")
        temporary.write_text(text)
        os.replace(temporary, path)

    _edit_resends_to_every_meter(start_sender, central, fleet, caplog, tmp_path, atomic_rename)


def test_invalid_edit_sends_nothing_and_a_later_valid_edit_works(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    meters = fleet(**{OFFICE: "ack"})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(OFFICE)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)
    path = tmp_path / "config.yaml"
    write_config(path, internal_broker, central_broker, ack_timeout_seconds=1, upload_frequency_seconds=61,
                 colour="blue")
    wait_for(lambda: sender_records(caplog, logging.ERROR, "keeping the last good configuration"), timeout=3)
    problems = [r.getMessage() for r in sender_records(caplog, logging.ERROR, "invalid configuration")]
    assert len(problems) == 2
    assert any("meters.upload_frequency_seconds: 61 is not allowed" in p for p in problems)
    assert any("meters.colour: unknown key" in p for p in problems)
    assert len(meters.commands()) == 2
    assert sender.config.meters.upload_frequency_seconds == 60

    write_config(path, internal_broker, central_broker, ack_timeout_seconds=1, upload_frequency_seconds=1800)
    wait_for(lambda: [c for c in meters.commands() if c.payload.get("value") == "1800"], timeout=2)
    wait_for(lambda: sender.counters()["acked"] == 4, timeout=5)


def test_changed_broker_settings_are_a_warning_and_wait_for_a_restart(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    meters = fleet(**{OFFICE: "ack"})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(OFFICE)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)
    path = tmp_path / "config.yaml"
    document = yaml.safe_load(path.read_text())
    document["central_broker"]["keepalive_seconds"] = 30
    document["meters"]["upload_frequency_minutes"] = 60
    path.write_text(yaml.safe_dump(document))
    wait_for(lambda: [c for c in meters.commands() if c.payload.get("value") == "60"
                      and c.payload.get("Cmd") == "0001"], timeout=2)
    [warning] = sender_records(caplog, logging.WARNING, "take effect only when config_sender restarts")
    assert warning.getMessage().startswith("central_broker changed in ")
    assert sender.config.central_broker.keepalive_seconds == 60


def test_symlinked_config_is_reloaded_when_the_target_is_edited_and_when_the_link_is_repointed(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    """config.yaml -> a/site-a.yaml; then ``ln -sfn b/site-b.yaml config.yaml``: both kinds of change count."""
    meters = fleet(**{OFFICE: "ack"})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    target_a = write_config(tmp_path / "a" / "site-a.yaml", internal_broker, central_broker, ack_timeout_seconds=1)
    target_b = write_config(tmp_path / "b" / "site-b.yaml", internal_broker, central_broker, ack_timeout_seconds=1,
                            upload_frequency_seconds=1800)
    link = tmp_path / "config.yaml"
    link.symlink_to("a/site-a.yaml")
    sender = start_sender()
    central.online(OFFICE)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)

    def sent(value: str) -> list[ReceivedCommand]:
        return [c for c in meters.commands(OFFICE) if c.payload.get("Cmd") == "0000" and c.payload["value"] == value]

    write_config(target_a, internal_broker, central_broker, ack_timeout_seconds=1, upload_frequency_seconds=900)
    wait_for(lambda: sent("900"), timeout=2)

    repointed = tmp_path / ".config.yaml.new"  # what `ln -sfn` does: a new link renamed over the old one
    repointed.symlink_to("b/site-b.yaml")
    os.replace(repointed, link)
    wait_for(lambda: sent("1800"), timeout=2)

    write_config(target_a, internal_broker, central_broker, ack_timeout_seconds=1, upload_frequency_seconds=300)
    write_config(target_b, internal_broker, central_broker, ack_timeout_seconds=1, upload_frequency_seconds=3600)
    wait_for(lambda: sent("3600"), timeout=2)
    wait_for(lambda: sender.counters()["pending"] == 0, timeout=5)
    assert sent("300") == []  # the old target is no longer the configuration
    assert sender.config.meters.upload_frequency_seconds == 3600


# --- the meter clock ---------------------------------------------------------------------------


def test_clock_command_for_a_2005_clock_but_not_for_a_good_clock_or_a_retained_old_reading(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    retained_meter, good_meter, bad_meter = HEAT_PUMP, OFFICE, "33B1225950029"
    meters = fleet(**dict.fromkeys((retained_meter, good_meter, bad_meter), "ack"))
    central.reading(retained_meter, datetime(2005, 3, 1, 12, 0), retain=True)
    sender = start_sender(ack_timeout_seconds=1)
    wait_for(lambda: acked(caplog, retained_meter) == 2, timeout=5)
    central.reading(good_meter, datetime.now())
    central.reading(bad_meter, datetime(2005, 3, 1, 12, 0))
    clock_commands = wait_for(lambda: [c for c in meters.commands() if c.topic.startswith("MQTT_SETTIME_")],
                              timeout=5)
    [command] = clock_commands  # type: ignore[misc]
    assert command.meter_id == bad_meter and command.topic == f"MQTT_SETTIME_{bad_meter[-8:]}"
    assert set(command.payload) == {"oprid", "time"} and len(command.payload["oprid"]) == 32
    sent_time = datetime.strptime(command.payload["time"], "%Y%m%d%H%M%S")
    assert abs((sent_time - datetime.now()).total_seconds()) < 5
    wait_for(lambda: sender_records(caplog, logging.INFO, f"meter {bad_meter} acknowledged clock = "), timeout=5)
    assert sender_records(caplog, logging.WARNING, f"meter {bad_meter} clock reads 2005-03-01T12:00:00")
    # At most one an hour: another reading from 2005 sends nothing more.
    central.reading(bad_meter, datetime(2005, 3, 1, 12, 1))
    central.reading(good_meter, datetime.now())  # processed after the one above
    wait_for(lambda: sender.counters()["acked"] == 7, timeout=5)
    assert len([c for c in meters.commands() if c.topic.startswith("MQTT_SETTIME_")]) == 1


# --- restarts and outages ----------------------------------------------------------------------


def test_restarted_sender_rediscovers_meters_from_retained_availability(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{HEAT_PUMP: "ack", OFFICE: "ack"})
    first = start_sender(ack_timeout_seconds=1)
    central.online(HEAT_PUMP, OFFICE)
    wait_for(lambda: first.counters()["acked"] == 4, timeout=5)
    first.stop()
    second = start_sender()
    wait_for(lambda: second.counters()["acked"] == 4, timeout=5)
    assert second.known_meters() == {HEAT_PUMP, OFFICE}
    assert len({c.payload["oprid"] for c in meters.commands()}) == 8


def test_internal_broker_restart_queues_commands_and_sends_them_on_reconnect(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        internal_broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{HEAT_PUMP: "ack", OFFICE: "ack"})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(HEAT_PUMP)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)

    internal_broker.stop()
    wait_for(lambda: not sender.internal_ready, timeout=5)
    central.online(OFFICE)  # discovered while the internal broker is down: queued
    wait_for(lambda: OFFICE in sender.known_meters(), timeout=5)
    assert sender.counters()["sent"] == 2
    internal_broker.start()

    wait_for(lambda: acked(caplog, OFFICE) == 2, timeout=10)
    assert [c.payload["Cmd"] for c in meters.commands(OFFICE)] == ["0000", "0001"]
    assert sender_records(caplog, ALERT) == []
    assert sender.internal_ready and sender.is_healthy()


# --- the real process -------------------------------------------------------------------------


def test_daemon_process_alerts_with_syslog_priority_1_notifies_systemd_and_exits_0_on_sigterm(
        internal_broker: Mosquitto, central_broker: Mosquitto, central: Central,
        fleet: Callable[..., FakeMeters], tmp_path: Path) -> None:
    meters = fleet(**{OFFICE: "ack", HEAT_PUMP: "silent"})
    path = write_config(tmp_path / "config.yaml", internal_broker, central_broker, ack_timeout_seconds=0.5)
    notify_path = tmp_path / "notify.sock"
    notify_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_socket.bind(str(notify_path))
    notify_socket.settimeout(0.1)
    notifications: list[str] = []

    def notified(text: str) -> bool:
        with contextlib.suppress(TimeoutError):
            notifications.append(notify_socket.recv(4096).decode())
        return any(text in n for n in notifications)

    log_path = tmp_path / "stdout.log"
    # As under systemd: JOURNAL_STREAM makes each line start with its syslog priority.
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", "JOURNAL_STREAM": "8:12345",
                   "NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "1000000"}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "config_sender.py"), "--config", str(path)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=environment)
    try:
        wait_for(lambda: notified("READY=1"), timeout=10)
        assert "<6>config_sender: ready: subscribed on both brokers" in log_path.read_text()
        central.online(OFFICE, HEAT_PUMP)
        wait_for(lambda: log_path.read_text().count(f"<1>config_sender: meter {HEAT_PUMP} did not reply") == 2,
                 timeout=5)
        wait_for(lambda: notified("WATCHDOG=1"), timeout=5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        wait_for(lambda: notified("STOPPING=1"), timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
        notify_socket.close()
    output = log_path.read_text()
    assert "<6>config_sender: starting: internal broker mqtt://127.0.0.1:" in output
    assert output.count(f"<6>config_sender: meter {OFFICE} acknowledged") == 2
    assert [line for line in output.splitlines() if line.startswith("<1>")] == [
        line for line in output.splitlines() if f"meter {HEAT_PUMP} did not reply" in line]
    assert "SIGTERM received, shutting down" in output
    assert "Traceback" not in output
    assert len(meters.commands(OFFICE)) == 2


def test_check_config_on_a_bad_file_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("central_broker: {host: 127.0.0.1}\n"
                    "meters:\n  upload_frequency_seconds: 61\n  ack_timeout_seconds: -1\n  colour: blue\n")
    result = subprocess.run([sys.executable, str(ROOT / "config_sender.py"), "--config", str(path),
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"Invalid configuration {path}:"
    assert len(lines) == 4
    assert "meters.upload_frequency_seconds: 61" in lines[1]
    assert "Traceback" not in result.stderr


def test_check_config_on_a_good_file_exits_0(tmp_path: Path, internal_broker: Mosquitto,
                                             central_broker: Mosquitto) -> None:
    path = write_config(tmp_path / "config.yaml", internal_broker, central_broker)
    result = subprocess.run([sys.executable, str(ROOT / "config_sender.py"), "--config", str(path),
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{path}: valid")


# --- SIGHUP: reload now -------------------------------------------------------------------------


def test_sighup_reloads_even_an_unchanged_file_and_keeps_the_last_good_one_when_invalid(
        internal_broker: Mosquitto, central_broker: Mosquitto, central: Central,
        fleet: Callable[..., FakeMeters], tmp_path: Path) -> None:
    """``systemctl reload`` (SIGHUP) re-reads the file and re-sends; the daemon goes on running."""
    meters = fleet(**{OFFICE: "ack"})
    path = write_config(tmp_path / "config.yaml", internal_broker, central_broker, ack_timeout_seconds=1)
    log_path = tmp_path / "stdout.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "config_sender.py"), "--config", str(path)],
                                   stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: "ready: subscribed on both brokers" in log_path.read_text(), timeout=10)
        central.online(OFFICE)
        wait_for(lambda: log_path.read_text().count(f"meter {OFFICE} acknowledged") == 2, timeout=5)

        process.send_signal(signal.SIGHUP)  # the file is unchanged: reloaded and re-sent all the same
        wait_for(lambda: log_path.read_text().count(f"meter {OFFICE} acknowledged") == 4, timeout=5)
        assert process.poll() is None
        assert "SIGHUP received: reloading the configuration" in log_path.read_text()
        assert len(meters.commands(OFFICE)) == 4

        path.write_text("meters: {upload_frequency_seconds: 61}\n")  # invalid: noticed by the watcher
        wait_for(lambda: log_path.read_text().count("keeping the last good configuration") == 1, timeout=5)
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: log_path.read_text().count("keeping the last good configuration") == 2, timeout=5)
        assert process.poll() is None
        assert len(meters.commands(OFFICE)) == 4
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log_path.read_text()
    assert "meters.upload_frequency_seconds: 61 is not allowed" in output
    assert "Traceback" not in output


# --- a file that is not a configuration -------------------------------------------------------


def test_truncated_config_keeps_the_last_good_one_and_sends_nothing_not_even_to_excluded_meters(
        start_sender: Callable[..., ConfigSender], central: Central, fleet: Callable[..., FakeMeters],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    meters = fleet(**{OFFICE: "ack", EXCLUDED: "ack"})
    sender = start_sender(ack_timeout_seconds=1, upload_frequency_seconds=300, exclude=[EXCLUDED])
    central.online(OFFICE, EXCLUDED)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)
    path = tmp_path / "config.yaml"

    path.write_text("")  # truncated, e.g. by a full disk or `> config.yaml`
    wait_for(lambda: sender_records(caplog, logging.ERROR, "keeping the last good configuration"), timeout=3)
    assert sender_records(caplog, logging.ERROR, f"invalid configuration {path}: {path}: the file is empty")

    path.write_text("internal_broker:\n  port: 1\n")  # no central broker
    wait_for(lambda: len(sender_records(caplog, logging.ERROR, "keeping the last good configuration")) == 2,
             timeout=3)
    assert sender_records(caplog, logging.ERROR, "central_broker.host: not set; set it to the address")

    assert sender.config.meters.exclude == {EXCLUDED}
    assert sender.config.meters.upload_frequency_seconds == 300
    assert meters.commands(EXCLUDED) == []
    assert len(meters.commands(OFFICE)) == 2
    # A later valid file applies again.
    write_config(path, internal_broker, central_broker, ack_timeout_seconds=1, upload_frequency_seconds=600,
                 exclude=[EXCLUDED])
    wait_for(lambda: [c for c in meters.commands(OFFICE) if c.payload.get("value") == "600"], timeout=2)
    assert meters.commands(EXCLUDED) == []


@pytest.mark.parametrize(("text", "problem"), [
    ("", "the file is empty"),
    ("internal_broker:\n", "central_broker.host: not set; set it to the address"),
])
def test_check_config_on_an_empty_file_or_one_without_the_central_broker_exits_2(
        tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, str(ROOT / "config_sender.py"), "--config", str(path),
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "valid (" not in result.stdout
    assert problem in result.stderr


# --- meters that are not there ---------------------------------------------------------------


def test_saves_reach_the_meters_online_now_and_silent_ones_get_the_settings_when_heard_again(
        internal_broker: Mosquitto, central_broker: Mosquitto, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Two meters fall silent; the proxy still says ``online`` (its limit is 75 s). Four saves: no ALERT.

    The simulator runs its meters at 1/100 of real time (intervals of 0.25 s,
    commanded intervals scaled by 0.01), and the sender's silence limits are
    scaled to match: 30 s / 1 min intervals give 2.5 x 30 s = 75 s, here 6 s.
    """
    caplog.set_level(logging.DEBUG, logger="config_sender")
    live, gone = ["33B1225960001", "33B1225960002"], ["33B1225960003", "33B1225960004"]
    sections = {"meters": {"upload_frequency_seconds": 30, "upload_frequency_minutes": 1, "ack_timeout_seconds": 1},
                "logging": {"level": "DEBUG"}}
    (tmp_path / "proxy").mkdir()
    proxy_path = tmp_path / "proxy" / "config.yaml"
    proxy_path.write_text(yaml.safe_dump({"internal_broker": {"host": "127.0.0.1", "port": internal_broker.port},
                                          "central_broker": {"host": "127.0.0.1", "port": central_broker.port},
                                          **sections}))
    proxy = DaemonProcess("kpm33b_proxy.py", proxy_path)
    path = tmp_path / "config.yaml"

    def save(minutes: int) -> None:
        document = yaml.safe_load(proxy_path.read_text())
        document["meters"]["upload_frequency_minutes"] = minutes
        path.write_text(yaml.safe_dump(document))

    save(1)
    sender = ConfigSender(load_config(path, {}), path, environ={}, silence_scale=0.08,
                          client_id_prefix="test-sender-silence")
    simulators: list[MeterSimulator] = []

    def simulate(meter_ids: list[str]) -> MeterSimulator:
        simulator = MeterSimulator("127.0.0.1", internal_broker.port, meter_ids, seconds_interval=0.25,
                                   minutes_interval=0.5, interval_scale=0.01)
        simulators.append(simulator)
        simulator.start()
        assert simulator.wait_connected(10)
        return simulator

    def got(simulator: MeterSimulator, meter_id: str, cmd: str, value: str) -> bool:
        return any(c.meter_id == meter_id and c.payload.get("Cmd") == cmd and c.payload.get("value") == value
                   for c in simulator.received_commands)

    def sent_to(meter_id: str) -> int:
        return len([r for r in sender_records(caplog, logging.DEBUG, f"sent meter {meter_id} ")])

    try:
        sender.start()
        assert sender.wait_ready(10)
        present = simulate(live)
        leaving = simulate(gone)
        wait_for(lambda: sender.counters()["acked"] == 8, timeout=15)
        leaving.stop()
        wait_for(lambda: sender.away_meters() == set(gone), timeout=15)
        assert sender.away_meters() == set(gone)

        for minutes in (5, 10, 15, 20):
            save(minutes)
            wait_for(lambda m=minutes: all(got(present, meter_id, "0001", str(m)) for meter_id in live), timeout=5)
        wait_for(lambda: sender.counters()["pending"] == 0, timeout=5)
        assert sender_records(caplog, ALERT) == []
        assert [sent_to(meter_id) for meter_id in gone] == [2, 2]  # the discovery's two commands, nothing since
        assert len(sender_records(caplog, logging.INFO, "is away")) >= 2

        back = simulate(gone)  # the same meters reconnect and publish again
        wait_for(lambda: all(got(back, meter_id, "0001", "20") and got(back, meter_id, "0000", "30")
                             for meter_id in gone), timeout=10)
        wait_for(lambda: sender.counters()["pending"] == 0, timeout=5)
        assert sender_records(caplog, ALERT) == []
        assert sender.away_meters() == set()
        assert sender_records(caplog, logging.INFO, f"meter {gone[0]} is back online: configuring it again")
    finally:
        sender.stop()
        for simulator in simulators:
            simulator.stop()
        proxy.terminate()


def test_an_outage_of_the_central_broker_does_not_count_as_the_meters_silence(
        internal_broker: Mosquitto, central_broker: Mosquitto, fleet: Callable[..., FakeMeters], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Deaf for longer than the meters' silence limit: their next readings configure nobody again."""
    caplog.set_level(logging.DEBUG, logger="config_sender")
    newcomer = "33B1225950029"
    meters = fleet(**{OFFICE: "ack", newcomer: "ack"})
    path = write_config(tmp_path / "config.yaml", internal_broker, central_broker, ack_timeout_seconds=1)
    sender = ConfigSender(load_config(path, {}), path, environ={}, silence_scale=0.01,  # limit 1.5 s
                          client_id_prefix="test-sender-outage")
    sender.start()
    try:
        assert sender.wait_ready(10)
        central = Central(central_broker.port)
        central.reading(OFFICE, datetime.now())
        central.close()
        wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)

        central_broker.stop()
        wait_for(lambda: not sender.central_ready, timeout=5)
        wait_for(lambda: OFFICE in sender.away_meters(), timeout=5)  # silent while we could not listen
        central_broker.start()
        wait_for(lambda: sender.central_ready, timeout=15)
        assert sender.away_meters() == set()

        central = Central(central_broker.port)
        central.reading(OFFICE, datetime.now())
        central.reading(newcomer, datetime.now())  # handled after the office's reading
        central.close()
        wait_for(lambda: len(meters.commands(newcomer)) == 2, timeout=5)
        assert len(meters.commands(OFFICE)) == 2
        assert not sender_records(caplog, logging.INFO, f"meter {OFFICE} is back online")
    finally:
        sender.stop()
