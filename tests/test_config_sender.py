"""Integration tests of config_sender against real Mosquitto brokers.

The sender runs in-process (so its log records can be captured and timed),
except for the tests that run it as a real process to check signals and exit
codes. The meters are those of ``tools/meter_simulator.py`` on the internal
broker, answering commands the way the protocol says, per meter: promptly
(``prompt``), late (``delay``), with code 02 (``error``), or never (``none``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from broker import Mosquitto, wait_for
from daemons import (
    MAIN,
    ROOT,
    SENDER_SCRIPT,
    Collector,
    FakeSystemd,
    ProxyStandIn,
    config_dict,
    publish_all,
    publisher,
    simulated_meters,
    start_config_sender,
    start_proxy,
    write_config,
)

from config_loader import load_config
from config_sender import ConfigSender
from daemon import ALERT
from tools.meter_simulator import MeterSimulator, ReceivedCommand

HEAT_PUMP = "33B1225950027"
OFFICE = "33B1225950028"
EXCLUDED = "33B1225950099"


# --- helpers: simulated meters, the proxy's stand-in, the sender in-process -------------------


def commands(meters: MeterSimulator, meter_id: str | None = None) -> list[ReceivedCommand]:
    """What the simulated meters received so far (of one meter, if given)."""
    return [command for command in meters.received_commands if meter_id is None or command.meter_id == meter_id]


def commands_to_unknown_meters(internal: Collector, meters: MeterSimulator) -> list[str]:
    """The command topics seen on the internal broker that address none of the simulated meters."""
    known = {meter_id[-8:] for meter_id in meters.meter_ids}
    return [topic for topic in internal.topics()
            if (parts := topic.rpartition("_"))[0] in ("MQTT_COMMOD_SET", "MQTT_SETTIME")
            and len(parts[2]) == 8 and parts[2] not in known]


def sender_records(caplog: pytest.LogCaptureFixture, level: int | None = None,
                   contains: str = "") -> list[logging.LogRecord]:
    """The sender's log records so far, filtered."""
    return [r for r in list(caplog.records)
            if r.name == "config_sender" and (level is None or r.levelno == level) and contains in r.getMessage()]


@pytest.fixture
def fleet(internal_broker: Mosquitto) -> Callable[..., MeterSimulator]:
    """Simulated meters on the internal broker: ``fleet(**{meter_id: reply_mode}, reply_delay=…)``.

    They publish no readings (the proxy is not part of these tests) and only
    answer commands, each in its reply mode (see ``MeterSimulator``).
    """

    def make(reply_delay: float = 5.0, **reply_modes: str) -> MeterSimulator:
        return simulated_meters(internal_broker.port, list(reply_modes), cadence=False, reply_mode=reply_modes,
                                reply_delay=reply_delay)

    return make


def acked(caplog: pytest.LogCaptureFixture, meter_id: str) -> int:
    return len(sender_records(caplog, logging.INFO, f"meter {meter_id} acknowledged"))


# --- discovery and interval commands ---------------------------------------------------------


def test_discovered_meters_get_both_interval_commands_with_override_and_exclusion(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        internal_broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{HEAT_PUMP: "prompt", OFFICE: "prompt", EXCLUDED: "prompt"})
    internal = Collector(internal_broker.port, "#")  # a command to a meter not simulated shows here
    sender = start_sender(upload_frequency_seconds=300, upload_frequency_minutes=5, exclude=[EXCLUDED],
                          devices={HEAT_PUMP: {"name": "Heat pump", "upload_frequency_seconds": 30}})
    central.publish(f"{MAIN}/bridge/state", "online", retain=True)
    central.online(HEAT_PUMP, EXCLUDED)
    central.reading(OFFICE, datetime.now())  # a meter is discovered from its readings too

    wait_for(lambda: acked(caplog, HEAT_PUMP) == 2 and acked(caplog, OFFICE) == 2, timeout=5)
    assert sender.known_meters() == {HEAT_PUMP, OFFICE, EXCLUDED}
    for meter_id, seconds in ((HEAT_PUMP, "30"), (OFFICE, "300")):
        received = commands(meters, meter_id)
        assert [c.topic for c in received] == [f"MQTT_COMMOD_SET_{meter_id[-8:]}"] * 2
        assert [(c.payload["Cmd"], c.payload["value"], c.payload["types"]) for c in received] == [
            ("0000", seconds, "1"), ("0001", "5", "1")]
        assert all(len(c.payload["oprid"]) == 32 and set(c.payload) == {"oprid", "Cmd", "value", "types"}
                   for c in received)
    assert len({c.payload["oprid"] for c in commands(meters)}) == 4
    assert commands(meters, EXCLUDED) == []
    assert commands_to_unknown_meters(internal, meters) == []
    assert sender_records(caplog, contains=f"discovered meter {EXCLUDED} (from availability): excluded")


def test_prompt_reply_is_logged_at_info_with_its_latency(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{OFFICE: "prompt"})
    sender = start_sender()
    central.online(OFFICE)
    wait_for(lambda: acked(caplog, OFFICE) == 2, timeout=5)
    oprid = commands(meters, OFFICE)[0].payload["oprid"]
    [record] = sender_records(caplog, logging.INFO, oprid)
    assert record.getMessage().startswith(f"meter {OFFICE} acknowledged seconds interval (Cmd 0000) = 60 in 0.")
    assert record.getMessage().endswith(f" s (oprid {oprid})")
    assert sender.counters()["acked"] == 2
    assert sender_records(caplog, ALERT) == []


def test_missing_reply_is_exactly_one_alert_between_3_and_3_5_seconds_after_the_command(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{OFFICE: "none"})
    sender = start_sender()  # the default ack_timeout_seconds: 3
    central.online(OFFICE)
    wait_for(lambda: len(sender_records(caplog, ALERT)) == 2, timeout=6)
    for command in commands(meters, OFFICE):
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
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: "error"})  # answers "code":"02" with "msg":"simulated failure"
    sender = start_sender(ack_timeout_seconds=1)
    central.online(OFFICE)
    wait_for(lambda: len(sender_records(caplog, ALERT)) == 2, timeout=5)
    messages = [r.getMessage() for r in sender_records(caplog, ALERT)]
    assert all(m.startswith(f"meter {OFFICE} refused ") and "msg 'simulated failure'" in m for m in messages)
    assert sender.counters()["failed"] == 2


def test_reply_after_the_timeout_is_an_alert_then_a_warning(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    fleet(reply_delay=0.8, **{OFFICE: "delay"})
    sender = start_sender(ack_timeout_seconds=0.4)
    central.online(OFFICE)
    wait_for(lambda: len(sender_records(caplog, logging.WARNING, "late reply")) == 2, timeout=5)
    assert len(sender_records(caplog, ALERT, "did not reply")) == 2
    late = sender_records(caplog, logging.WARNING, "late reply")[0].getMessage()
    assert late.startswith(f"late reply from meter {OFFICE} to ") and "accepted; retries stopped" in late
    assert sender.counters()["late"] == 2


def test_hostile_replies_are_counted_and_the_sender_keeps_working(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        internal_broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: "prompt"})
    sender = start_sender()
    publish_all(publisher(internal_broker.port), [
        ("MQTT_COMMOD_SET_REP", payload)
        for payload in (b"{not json", json.dumps({"oprid": "f" * 32, "code": "01"}).encode(),
                        json.dumps({"oprid": 5, "code": ["01"]}).encode(), b"\xff" * 10)])
    wait_for(lambda: sender.counters()["rejected_replies"] == 4, timeout=5)
    assert {r.getMessage().split(": ")[1] for r in sender_records(caplog, logging.WARNING, "rejected reply")} == {
        "malformed JSON", "unknown oprid", "bad oprid"}
    central.online(OFFICE)
    wait_for(lambda: acked(caplog, OFFICE) == 2, timeout=5)


def test_counters_are_published_retained_on_the_central_broker(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    fleet(**{OFFICE: "prompt"})
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
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    meter_ids = [f"33B12260{n:05d}" for n in range(200)]
    fleet(**{meter_id: ("prompt" if n % 2 else "none") for n, meter_id in enumerate(meter_ids)})
    sender = start_sender(ack_timeout_seconds=1)
    began = time.monotonic()
    central.online(*meter_ids)
    wait_for(lambda: sender.counters()["acked"] == 200 and sender.counters()["alerted"] == 200, timeout=10)
    elapsed = time.monotonic() - began
    print(f"200 meters: 400 commands acked or alerted in {elapsed:.3f} s (ack timeout 1 s)")
    # One timeout for all, not one after another (that would take 100 s): the margin is for a loaded
    # machine; the figure itself (ack timeout + 0.5 s) is make bench's to measure.
    assert elapsed <= 1 + 3.0
    assert sender.counters()["pending"] == 0
    assert len(sender_records(caplog, ALERT)) == 200


# --- configuration changes --------------------------------------------------------------------


def _edit_resends_to_every_meter(start_sender: Callable[..., ConfigSender], central: ProxyStandIn,
                                 fleet: Callable[..., MeterSimulator], caplog: pytest.LogCaptureFixture,
                                 tmp_path: Path, edit: Callable[[Path, str], None]) -> None:
    meter_ids = [HEAT_PUMP, OFFICE, "33B1225950029"]
    meters = fleet(**dict.fromkeys(meter_ids, "prompt"))
    sender = start_sender(ack_timeout_seconds=1)
    central.online(*meter_ids)
    wait_for(lambda: sender.counters()["acked"] == 6, timeout=5)
    path = tmp_path / "config.yaml"
    text = path.read_text().replace("ack_timeout_seconds: 1", "ack_timeout_seconds: 1\n  upload_frequency_seconds: 900")
    assert "900" in text
    saved = time.monotonic()  # the simulated meters time what they receive on this clock
    edit(path, text)

    def resent() -> bool:
        return all(any(c.payload.get("value") == "900" for c in commands(meters, m)) for m in meter_ids)

    wait_for(resent, timeout=2)
    new_commands = [c for c in commands(meters) if c.payload.get("value") == "900"]
    first = min(c.received_at for c in new_commands) - saved
    last = max(c.received_at for c in new_commands) - saved
    print(f"config save to first command {first * 1000:.0f} ms, to the last of 3 meters {last * 1000:.0f} ms")
    assert last <= 1.0
    wait_for(lambda: sender.counters()["acked"] == 12, timeout=5)
    assert sender.config.meters.upload_frequency_seconds == 900


def test_editing_config_in_place_resends_to_every_known_meter_within_a_second(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    def in_place(path: Path, text: str) -> None:
        with path.open("r+") as file:
            file.write(text)
            file.truncate()

    _edit_resends_to_every_meter(start_sender, central, fleet, caplog, tmp_path, in_place)


def test_replacing_config_by_atomic_rename_resends_to_every_known_meter_within_a_second(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    def atomic_rename(path: Path, text: str) -> None:
        temporary = path.with_name(".config.yaml.swp")
        temporary.write_text(text)
        os.replace(temporary, path)

    _edit_resends_to_every_meter(start_sender, central, fleet, caplog, tmp_path, atomic_rename)


def test_invalid_edit_sends_nothing_and_a_later_valid_edit_works(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    meters = fleet(**{OFFICE: "prompt"})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(OFFICE)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)
    write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                       upload_frequency_seconds=61, colour="blue"))
    wait_for(lambda: sender_records(caplog, logging.ERROR, "keeping the last good configuration"), timeout=3)
    problems = [r.getMessage() for r in sender_records(caplog, logging.ERROR, "invalid configuration")]
    assert len(problems) == 2
    assert any("meters.upload_frequency_seconds: 61 is not allowed" in p for p in problems)
    assert any("meters.colour: unknown key" in p for p in problems)
    assert len(commands(meters)) == 2
    assert sender.config.meters.upload_frequency_seconds == 60

    write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                       upload_frequency_seconds=1800))
    wait_for(lambda: [c for c in commands(meters) if c.payload.get("value") == "1800"], timeout=2)
    wait_for(lambda: sender.counters()["acked"] == 4, timeout=5)


def test_changed_broker_settings_are_a_warning_and_wait_for_a_restart(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    meters = fleet(**{OFFICE: "prompt"})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(OFFICE)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)
    path = tmp_path / "config.yaml"
    document = yaml.safe_load(path.read_text())
    document["central_broker"]["keepalive_seconds"] = 30
    document["meters"]["upload_frequency_minutes"] = 60
    write_config(tmp_path, document)
    wait_for(lambda: [c for c in commands(meters) if c.payload.get("value") == "60"
                      and c.payload.get("Cmd") == "0001"], timeout=2)
    [warning] = sender_records(caplog, logging.WARNING, "take effect only when config_sender restarts")
    assert warning.getMessage().startswith("central_broker changed in ")
    assert sender.config.central_broker.keepalive_seconds == 60


def test_symlinked_config_is_reloaded_when_the_target_is_edited_and_when_the_link_is_repointed(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    """config.yaml -> a/site-a.yaml; then ``ln -sfn b/site-b.yaml config.yaml``: both kinds of change count."""
    meters = fleet(**{OFFICE: "prompt"})
    write_config(tmp_path / "a", config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1),
                 name="site-a.yaml")
    write_config(tmp_path / "b", config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                             upload_frequency_seconds=1800), name="site-b.yaml")
    link = tmp_path / "config.yaml"
    link.symlink_to("a/site-a.yaml")
    sender = start_sender()
    central.online(OFFICE)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)

    def sent(value: str) -> list[ReceivedCommand]:
        return [c for c in commands(meters, OFFICE) if c.payload.get("Cmd") == "0000" and c.payload["value"] == value]

    write_config(tmp_path / "a", config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                             upload_frequency_seconds=900), name="site-a.yaml")
    wait_for(lambda: sent("900"), timeout=2)

    repointed = tmp_path / ".config.yaml.new"  # what `ln -sfn` does: a new link renamed over the old one
    repointed.symlink_to("b/site-b.yaml")
    os.replace(repointed, link)
    wait_for(lambda: sent("1800"), timeout=2)

    write_config(tmp_path / "a", config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                             upload_frequency_seconds=300), name="site-a.yaml")
    write_config(tmp_path / "b", config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                             upload_frequency_seconds=3600), name="site-b.yaml")
    wait_for(lambda: sent("3600"), timeout=2)
    wait_for(lambda: sender.counters()["pending"] == 0, timeout=5)
    assert sent("300") == []  # the old target is no longer the configuration
    assert sender.config.meters.upload_frequency_seconds == 3600


# --- the meter clock ---------------------------------------------------------------------------


def test_clock_command_for_a_2005_clock_but_not_for_a_good_clock_or_a_retained_old_reading(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    retained_meter, good_meter, bad_meter = HEAT_PUMP, OFFICE, "33B1225950029"
    meters = fleet(**dict.fromkeys((retained_meter, good_meter, bad_meter), "prompt"))
    central.reading(retained_meter, datetime(2005, 3, 1, 12, 0), retain=True)
    sender = start_sender(ack_timeout_seconds=1)
    wait_for(lambda: acked(caplog, retained_meter) == 2, timeout=5)
    central.reading(good_meter, datetime.now())
    central.reading(bad_meter, datetime(2005, 3, 1, 12, 0))
    clock_commands = wait_for(lambda: [c for c in commands(meters) if c.topic.startswith("MQTT_SETTIME_")],
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
    assert len([c for c in commands(meters) if c.topic.startswith("MQTT_SETTIME_")]) == 1


# --- restarts and outages ----------------------------------------------------------------------


def test_restarted_sender_rediscovers_meters_from_retained_availability(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{HEAT_PUMP: "prompt", OFFICE: "prompt"})
    first = start_sender(ack_timeout_seconds=1)
    central.online(HEAT_PUMP, OFFICE)
    wait_for(lambda: first.counters()["acked"] == 4, timeout=5)
    first.stop()
    second = start_sender()
    wait_for(lambda: second.counters()["acked"] == 4, timeout=5)
    assert second.known_meters() == {HEAT_PUMP, OFFICE}
    assert len({c.payload["oprid"] for c in commands(meters)}) == 8


def test_internal_broker_restart_queues_commands_and_sends_them_on_reconnect(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        internal_broker: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    meters = fleet(**{HEAT_PUMP: "prompt", OFFICE: "prompt"})
    sender = start_sender(ack_timeout_seconds=1)
    central.online(HEAT_PUMP)
    wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)

    internal_broker.stop()
    wait_for(lambda: not sender.internal_ready, timeout=5)
    central.online(OFFICE)  # discovered while the internal broker is down: queued
    wait_for(lambda: OFFICE in sender.known_meters(), timeout=5)
    assert sender.counters()["sent"] == 2
    # The simulated meters (clean sessions) are subscribed again about 0.1 s after the restart
    # (their first retry); the sender's first retry comes 1-2 s after it lost the broker
    # (mqtt_client.RECONNECT_MIN_DELAY): its queued commands find them listening.
    internal_broker.start()

    wait_for(lambda: acked(caplog, OFFICE) == 2, timeout=10)
    assert [c.payload["Cmd"] for c in commands(meters, OFFICE)] == ["0000", "0001"]
    assert sender_records(caplog, ALERT) == []
    assert sender.internal_ready and sender.is_healthy()


# --- the real process -------------------------------------------------------------------------


def test_daemon_process_alerts_with_syslog_priority_1_notifies_systemd_and_exits_0_on_sigterm(
        internal_broker: Mosquitto, central_broker: Mosquitto, central: ProxyStandIn,
        fleet: Callable[..., MeterSimulator], tmp_path: Path, systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    meters = fleet(**{OFFICE: "prompt", HEAT_PUMP: "none"})
    path = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=0.5))
    notifications, environment = systemd
    # As under systemd: JOURNAL_STREAM makes each line start with its syslog priority.
    sender = start_config_sender(path, env={**environment, "PYTHONUNBUFFERED": "1", "JOURNAL_STREAM": "8:12345",
                                            "WATCHDOG_USEC": "1000000"}, wait_ready=False)
    wait_for(lambda: "READY=1" in notifications.lines(), timeout=10)
    assert "<6>config_sender: ready: subscribed on both brokers" in sender.output()
    central.online(OFFICE, HEAT_PUMP)
    wait_for(lambda: sender.output().count(f"<1>config_sender: meter {HEAT_PUMP} did not reply") == 2, timeout=5)
    wait_for(lambda: "WATCHDOG=1" in notifications.lines(), timeout=5)
    assert sender.terminate(timeout=10) == 0
    wait_for(lambda: "STOPPING=1" in notifications.lines(), timeout=2)
    output = sender.output()
    assert "<6>config_sender: starting: internal broker mqtt://127.0.0.1:" in output
    assert output.count(f"<6>config_sender: meter {OFFICE} acknowledged") == 2
    assert [line for line in output.splitlines() if line.startswith("<1>")] == [
        line for line in output.splitlines() if f"meter {HEAT_PUMP} did not reply" in line]
    assert "SIGTERM received, shutting down" in output
    assert "Traceback" not in output
    assert len(commands(meters, OFFICE)) == 2


def test_check_config_on_a_bad_file_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("central_broker: {host: 127.0.0.1}\n"
                    "meters:\n  upload_frequency_seconds: 61\n  ack_timeout_seconds: -1\n  colour: blue\n")
    result = subprocess.run([sys.executable, str(ROOT / SENDER_SCRIPT), "--config", str(path),
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == f"Invalid configuration {path}:"
    assert len(lines) == 4
    assert "meters.upload_frequency_seconds: 61" in lines[1]
    assert "Traceback" not in result.stderr


def test_check_config_on_a_good_file_exits_0(tmp_path: Path, internal_broker: Mosquitto,
                                             central_broker: Mosquitto) -> None:
    path = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port))
    result = subprocess.run([sys.executable, str(ROOT / SENDER_SCRIPT), "--config", str(path),
                             "--check-config"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{path}: valid")


# --- SIGHUP: reload now -------------------------------------------------------------------------


def test_sighup_reloads_even_an_unchanged_file_and_keeps_the_last_good_one_when_invalid(
        internal_broker: Mosquitto, central_broker: Mosquitto, central: ProxyStandIn,
        fleet: Callable[..., MeterSimulator], tmp_path: Path) -> None:
    """``systemctl reload`` (SIGHUP) re-reads the file and re-sends; the daemon goes on running."""
    meters = fleet(**{OFFICE: "prompt"})
    path = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1))
    sender = start_config_sender(path, env={"PYTHONUNBUFFERED": "1"})
    central.online(OFFICE)
    wait_for(lambda: sender.output().count(f"meter {OFFICE} acknowledged") == 2, timeout=5)

    sender.process.send_signal(signal.SIGHUP)  # the file is unchanged: reloaded and re-sent all the same
    wait_for(lambda: sender.output().count(f"meter {OFFICE} acknowledged") == 4, timeout=5)
    assert sender.alive()
    assert "SIGHUP received: reloading the configuration" in sender.output()
    assert len(commands(meters, OFFICE)) == 4

    path.write_text("meters: {upload_frequency_seconds: 61}\n")  # invalid: noticed by the watcher
    wait_for(lambda: sender.output().count("keeping the last good configuration") == 1, timeout=5)
    sender.process.send_signal(signal.SIGHUP)
    wait_for(lambda: sender.output().count("keeping the last good configuration") == 2, timeout=5)
    assert sender.alive()
    assert len(commands(meters, OFFICE)) == 4
    assert sender.terminate(timeout=10) == 0
    output = sender.output()
    assert "meters.upload_frequency_seconds: 61 is not allowed" in output
    assert "Traceback" not in output


# --- a file that is not a configuration -------------------------------------------------------


def test_truncated_config_keeps_the_last_good_one_and_sends_nothing_not_even_to_excluded_meters(
        start_sender: Callable[..., ConfigSender], central: ProxyStandIn, fleet: Callable[..., MeterSimulator],
        caplog: pytest.LogCaptureFixture, tmp_path: Path, internal_broker: Mosquitto,
        central_broker: Mosquitto) -> None:
    meters = fleet(**{OFFICE: "prompt", EXCLUDED: "prompt"})
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
    assert commands(meters, EXCLUDED) == []
    assert len(commands(meters, OFFICE)) == 2
    # A later valid file applies again.
    write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1,
                                       upload_frequency_seconds=600, exclude=[EXCLUDED]))
    wait_for(lambda: [c for c in commands(meters, OFFICE) if c.payload.get("value") == "600"], timeout=2)
    assert commands(meters, EXCLUDED) == []


@pytest.mark.parametrize(("text", "problem"), [
    ("", "the file is empty"),
    ("internal_broker:\n", "central_broker.host: not set; set it to the address"),
])
def test_check_config_on_an_empty_file_or_one_without_the_central_broker_exits_2(
        tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = subprocess.run([sys.executable, str(ROOT / SENDER_SCRIPT), "--config", str(path),
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
    document = config_dict(internal_broker.port, central_broker.port, upload_frequency_seconds=30,
                           upload_frequency_minutes=1, ack_timeout_seconds=1)
    proxy = start_proxy(write_config(tmp_path / "proxy", document), wait_online=False)

    def save(minutes: int) -> Path:
        document["meters"]["upload_frequency_minutes"] = minutes
        return write_config(tmp_path, document)

    path = save(1)
    sender = ConfigSender(load_config(path, {}), path, environ={}, silence_scale=0.08,
                          client_id_prefix="test-sender-silence")

    def simulate(meter_ids: list[str]) -> MeterSimulator:
        return simulated_meters(internal_broker.port, meter_ids, seconds_interval=0.25, minutes_interval=0.5,
                                interval_scale=0.01)

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
        proxy.terminate()


def test_an_outage_of_the_central_broker_does_not_count_as_the_meters_silence(
        internal_broker: Mosquitto, central_broker: Mosquitto, fleet: Callable[..., MeterSimulator], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Deaf for longer than the meters' silence limit: their next readings configure nobody again."""
    caplog.set_level(logging.DEBUG, logger="config_sender")
    newcomer = "33B1225950029"
    meters = fleet(**{OFFICE: "prompt", newcomer: "prompt"})
    path = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=1))
    sender = ConfigSender(load_config(path, {}), path, environ={}, silence_scale=0.01,  # limit 1.5 s
                          client_id_prefix="test-sender-outage")
    sender.start()
    try:
        assert sender.wait_ready(10)
        central = ProxyStandIn(central_broker.port)
        central.reading(OFFICE, datetime.now())
        central.close()
        wait_for(lambda: sender.counters()["acked"] == 2, timeout=5)

        central_broker.stop()
        wait_for(lambda: not sender.central_ready, timeout=5)
        wait_for(lambda: OFFICE in sender.away_meters(), timeout=5)  # silent while we could not listen
        central_broker.start()
        wait_for(lambda: sender.central_ready, timeout=15)
        assert sender.away_meters() == set()

        central = ProxyStandIn(central_broker.port)
        central.reading(OFFICE, datetime.now())
        central.reading(newcomer, datetime.now())  # handled after the office's reading
        central.close()
        wait_for(lambda: len(commands(meters, newcomer)) == 2, timeout=5)
        assert len(commands(meters, OFFICE)) == 2
        assert not sender_records(caplog, logging.INFO, f"meter {OFFICE} is back online")
    finally:
        sender.stop()
