"""Unit tests of the configuration flow's pure logic: exact outputs for a fake clock.

No broker, no threads: ``now`` is a number the test chooses, oprids come from a
counter, so every command, event and counter can be asserted exactly.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from datetime import datetime
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from command_tracking import (
    Acked,
    BackOnline,
    Cancelled,
    ClockDrift,
    Command,
    CommandKind,
    CommandOutcome,
    CommandTracker,
    Deferred,
    Discovered,
    Failed,
    IgnoredReply,
    InvalidReply,
    LateReply,
    NoReply,
    RejectedReply,
    Retrying,
    SlotStatus,
    Superseded,
    WentOffline,
    clock_needs_setting,
    meters_to_configure,
    new_oprid,
    parse_reading_time,
    parse_reply,
)
from config_loader import DeviceSettings, InternalTopics, MeterSettings
from topics import MeterTopic, meter_subscriptions, parse_meter_topic, parse_state

HEAT_PUMP = "33B1225950027"      # has a per-meter override: 30 s
OFFICE = "33B1225950028"
EXCLUDED = "33B1225950099"
LOCAL_NOW = datetime(2026, 1, 12, 16, 39, 5)

SETTINGS = MeterSettings(
    upload_frequency_seconds=60,
    upload_frequency_minutes=1,
    ack_timeout_seconds=3.0,
    max_clock_drift_seconds=300,
    exclude=frozenset({EXCLUDED}),
    devices=MappingProxyType({HEAT_PUMP: DeviceSettings(name="Heat pump", upload_frequency_seconds=30)}),
)


def take_outgoing(tracker: CommandTracker, now: float, local_now: datetime, limit: int) -> list[Command]:
    """Up to ``limit`` queued commands, each marked sent at ``now``: what the daemon's worker does."""
    commands: list[Command] = []
    while len(commands) < limit and (command := tracker.pop_outgoing(local_now)) is not None:
        tracker.mark_sent(command, now)
        commands.append(command)
    return commands


def counting_oprids() -> Callable[[], str]:
    """oprids 000…001, 000…002, … so that tests can name them."""
    counter = itertools.count(1)
    return lambda: f"{next(counter):032d}"


def oprid(number: int) -> str:
    return f"{number:032d}"


def tracker(**overrides: object) -> CommandTracker:
    arguments: dict[str, object] = {"settings": SETTINGS, "make_oprid": counting_oprids()}
    arguments.update(overrides)
    return CommandTracker(**arguments)  # type: ignore[arg-type]


def reply(number: int, code: str = "01", meter_id: str | None = OFFICE, **extra: object) -> bytes:
    document: dict[str, object] = {"oprid": oprid(number), "code": code, **extra}
    if meter_id is not None:
        document["id"] = meter_id
    return json.dumps(document).encode()


def seconds_cmd(number: int, meter_id: str = OFFICE, value: str = "60", attempt: int = 0) -> Command:
    return Command(meter_id, CommandKind.SECONDS_INTERVAL, value, oprid(number), attempt)


def minutes_cmd(number: int, meter_id: str = OFFICE, value: str = "1", attempt: int = 0) -> Command:
    return Command(meter_id, CommandKind.MINUTES_INTERVAL, value, oprid(number), attempt)


# --- commands ------------------------------------------------------------------


def test_new_oprid_is_32_hex_characters_and_unique() -> None:
    oprids = {new_oprid() for _ in range(1000)}
    assert len(oprids) == 1000
    assert all(len(o) == 32 and int(o, 16) >= 0 for o in oprids)


def test_interval_command_payload_and_topic_follow_the_protocol() -> None:
    command = seconds_cmd(7, meter_id="33B1225950028", value="60")
    assert command.topic(InternalTopics()) == "MQTT_COMMOD_SET_25950028"
    assert json.loads(command.payload()) == {"oprid": oprid(7), "Cmd": "0000", "value": "60", "types": "1"}
    assert json.loads(minutes_cmd(8, value="15").payload()) == {
        "oprid": oprid(8), "Cmd": "0001", "value": "15", "types": "1"}


def test_clock_command_payload_and_topic_follow_the_protocol() -> None:
    command = Command(OFFICE, CommandKind.CLOCK, "20260112163905", oprid(3))
    assert command.topic(InternalTopics()) == "MQTT_SETTIME_25950028"
    assert json.loads(command.payload()) == {"oprid": oprid(3), "time": "20260112163905"}


# --- parsing hostile and foreign input --------------------------------------------


def test_valid_reply_is_parsed() -> None:
    parsed = parse_reply(b'{"id":"33B1225950028","oprid":"' + oprid(1).encode() + b'","code":"02","msg":"busy"}')
    assert (parsed.oprid, parsed.code, parsed.meter_id, parsed.msg) == (oprid(1), "02", OFFICE, "busy")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"oprid": "short", "code": "01"}', "bad oprid"),
        (b'{"oprid": 12345678901234567890123456789012, "code": "01"}', "bad oprid"),
        (b'{"code": "01"}', "bad oprid"),
        (b'{"oprid": "' + b"a" * 32 + b'", "code": 1}', "bad code"),
        (b'{"oprid": "' + b"a" * 32 + b'", "code": "03"}', "bad code"),
        (b'{"oprid": "' + b"a" * 32 + b'", "code": "01", "id": 5}', "bad meter id"),
        (b'{"oprid": "' + b"a" * 32 + b'", "code": "01", "id": "x/../y"}', "bad meter id"),
        (b" " * 5000, "too large"),
    ],
)
def test_unusable_replies_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(InvalidReply) as refused:
        parse_reply(payload)
    assert refused.value.reason == reason


def test_central_topics_name_a_meter_and_a_leaf_or_nothing() -> None:
    assert meter_subscriptions("kpm33b") == ["kpm33b/+/availability", "kpm33b/+/seconds", "kpm33b/+/minutes"]
    assert parse_meter_topic("kpm33b", "kpm33b/33B1225950027/seconds") == MeterTopic(HEAT_PUMP, "seconds")
    assert parse_meter_topic("home/energy", "home/energy/33B1225950027/availability") == MeterTopic(
        HEAT_PUMP, "availability")
    assert parse_meter_topic("kpm33b", "kpm33b/bridge/state") is None
    assert parse_meter_topic("kpm33b", "kpm33b/33B12259500/seconds") is None
    assert parse_meter_topic("kpm33b", "kpm33b/33B1225950027/seconds/x") is None
    assert parse_meter_topic("kpm33b", "kpm33b/33B1225950027/config") is None
    assert parse_meter_topic("kpm33b", "other/33B1225950027/seconds") is None


def test_availability_is_online_offline_or_nothing() -> None:
    assert parse_state(b"online") == "online"
    assert parse_state(b"offline\n") == "offline"
    assert parse_state(b"ONLINE") is None
    assert parse_state(b"\xff") is None


def test_reading_time_is_read_from_iso_or_meter_format() -> None:
    assert parse_reading_time(b'{"id": "x", "time": "2026-01-12T16:39:00", "active_power": 1.5}') == datetime(
        2026, 1, 12, 16, 39)
    assert parse_reading_time(b'{"time": "20050101000000"}') == datetime(2005, 1, 1)
    assert parse_reading_time(b'{"time": "yesterday"}') is None
    assert parse_reading_time(b'{"time": null}') is None
    assert parse_reading_time(b'{"active_power": 1}') is None
    assert parse_reading_time(b"garbage") is None
    assert parse_reading_time(b'["2026-01-12T16:39:00"]') is None


def test_clock_needs_setting_beyond_the_drift_and_at_most_hourly() -> None:
    assert clock_needs_setting(datetime(2005, 1, 1), LOCAL_NOW, 300, None, now=0.0)
    assert not clock_needs_setting(datetime(2026, 1, 12, 16, 34, 5), LOCAL_NOW, 300, None, now=0.0)  # exactly 300 s
    assert clock_needs_setting(datetime(2026, 1, 12, 16, 34, 4), LOCAL_NOW, 300, None, now=0.0)
    assert clock_needs_setting(datetime(2026, 1, 12, 16, 44, 6), LOCAL_NOW, 300, None, now=0.0)  # ahead
    assert not clock_needs_setting(datetime(2005, 1, 1), LOCAL_NOW, 300, last_clock_command_at=100.0, now=3699.0)
    assert clock_needs_setting(datetime(2005, 1, 1), LOCAL_NOW, 300, last_clock_command_at=100.0, now=3700.0)


def test_meters_to_configure_leave_out_excluded_and_offline_ones() -> None:
    assert meters_to_configure([OFFICE, EXCLUDED, HEAT_PUMP, "33B0000000001"], ["33B0000000001"], SETTINGS) == [
        HEAT_PUMP, OFFICE]


# --- discovery ---------------------------------------------------------------------


def test_discovered_meter_gets_both_interval_commands() -> None:
    state = tracker()
    assert state.observe_availability(OFFICE, "online", now=0.0) == [Discovered(OFFICE, "availability", False, False)]
    assert take_outgoing(state, 0.5, LOCAL_NOW, limit=10) == [seconds_cmd(1), minutes_cmd(2)]
    assert state.counters() == {
        "sent": 2, "refused_by_broker": 0, "acked": 0, "alerted": 0, "late": 0, "failed": 0, "retried": 0,
        "rejected_replies": 0, "ignored_replies": 0, "superseded": 0, "clock_commands": 0, "discovered": 1,
        "pending": 2}


def test_per_meter_override_wins_over_the_default() -> None:
    state = tracker()
    state.observe_reading(HEAT_PUMP, "seconds", None, retained=True, now=0.0, local_now=LOCAL_NOW)
    assert take_outgoing(state, 0.0, LOCAL_NOW, 10) == [seconds_cmd(1, HEAT_PUMP, "30"), minutes_cmd(2, HEAT_PUMP)]


def test_excluded_meter_is_known_but_never_gets_a_command() -> None:
    state = tracker()
    assert state.observe_availability(EXCLUDED, "online", 0.0) == [Discovered(EXCLUDED, "availability", True, False)]
    reading = state.observe_reading(EXCLUDED, "minutes", datetime(2005, 1, 1), retained=False, now=1.0,
                                    local_now=LOCAL_NOW)
    assert reading == []
    assert take_outgoing(state, 1.0, LOCAL_NOW, 10) == []
    assert state.known_meters() == {EXCLUDED}


def test_a_meter_seen_again_is_not_discovered_again() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    assert state.observe_availability(OFFICE, "online", 1.0) == []
    assert state.observe_reading(OFFICE, "seconds", None, retained=False, now=2.0, local_now=LOCAL_NOW) == []
    assert len(take_outgoing(state, 2.0, LOCAL_NOW, 10)) == 2


def test_meter_discovered_offline_is_configured_when_it_comes_online() -> None:
    state = tracker()
    assert state.observe_availability(OFFICE, "offline", 0.0) == [Discovered(OFFICE, "availability", False, True)]
    assert take_outgoing(state, 0.0, LOCAL_NOW, 10) == []
    # An old retained reading says nothing about the meter being back.
    assert state.observe_reading(OFFICE, "seconds", None, retained=True, now=1.0, local_now=LOCAL_NOW) == []
    assert state.observe_availability(OFFICE, "online", 2.0) == [BackOnline(OFFICE)]
    assert take_outgoing(state, 2.0, LOCAL_NOW, 10) == [seconds_cmd(1), minutes_cmd(2)]


def test_live_reading_brings_an_offline_meter_back() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "offline", 0.0)
    assert state.observe_reading(OFFICE, "minutes", None, retained=False, now=1.0, local_now=LOCAL_NOW) == [
        BackOnline(OFFICE)]
    assert take_outgoing(state, 1.0, LOCAL_NOW, 10) == [seconds_cmd(1), minutes_cmd(2)]


def test_going_offline_drops_queued_commands() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    assert state.observe_availability(OFFICE, "offline", 0.1) == [
        WentOffline(OFFICE), Cancelled(seconds_cmd(1), "meter went offline"),
        Cancelled(minutes_cmd(2), "meter went offline")]
    assert take_outgoing(state, 0.2, LOCAL_NOW, 10) == []
    assert state.counters()["pending"] == 0


# --- replies -------------------------------------------------------------------------


def test_reply_within_the_timeout_is_an_ack_with_its_latency() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 10.0, LOCAL_NOW, 10)
    assert state.observe_reply(reply(1), now=10.25) == [Acked(seconds_cmd(1), 0.25)]
    assert state.observe_reply(reply(2), now=13.0) == [Acked(minutes_cmd(2), 3.0)]  # at the deadline: in time
    assert state.slot_status(OFFICE, CommandKind.SECONDS_INTERVAL) is SlotStatus.ACKED
    assert state.tick(100.0) == []
    assert state.next_wakeup() is None
    assert (state.counters()["acked"], state.counters()["pending"]) == (2, 0)


def test_code_02_is_a_failure_with_the_meters_msg_and_is_not_retried() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    assert state.observe_reply(reply(1, "02", msg="value not allowed"), 1.0) == [
        Failed(seconds_cmd(1), "value not allowed", 1.0)]
    assert state.observe_reply(reply(2, "02"), 1.5) == [Failed(minutes_cmd(2), None, 1.5)]
    assert state.tick(1000.0) == []
    assert state.slot_status(OFFICE, CommandKind.SECONDS_INTERVAL) is SlotStatus.FAILED
    assert state.counters()["failed"] == 2


def test_no_reply_alerts_and_retries_with_growing_delays_then_gives_up() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    assert take_outgoing(state, 0.0, LOCAL_NOW, 1) == [seconds_cmd(1)]
    assert state.next_wakeup() == 3.0
    assert state.tick(2.999) == []
    assert state.tick(3.0) == [NoReply(seconds_cmd(1), 3.0, 10.0, 3)]
    assert state.next_wakeup() == 13.0
    assert state.tick(12.9) == []
    assert state.tick(13.0) == [Retrying(seconds_cmd(3, attempt=1), 3)]
    assert take_outgoing(state, 13.5, LOCAL_NOW, 10) == [minutes_cmd(2), seconds_cmd(3, attempt=1)]
    state.observe_reply(reply(2), 14.0)
    assert state.tick(16.5) == [NoReply(seconds_cmd(3, attempt=1), 3.0, 60.0, 3)]
    assert state.tick(76.5) == [Retrying(seconds_cmd(4, attempt=2), 3)]
    take_outgoing(state, 76.5, LOCAL_NOW, 10)
    assert state.tick(79.5) == [NoReply(seconds_cmd(4, attempt=2), 3.0, 300.0, 3)]
    # Still sending readings (so online), just not answering commands.
    for heard in (100.0, 200.0, 300.0):
        assert state.observe_reading(OFFICE, "seconds", None, retained=False, now=heard, local_now=LOCAL_NOW) == []
    assert state.tick(379.5) == [Retrying(seconds_cmd(5, attempt=3), 3)]
    take_outgoing(state, 380.0, LOCAL_NOW, 10)
    assert state.tick(383.0) == [NoReply(seconds_cmd(5, attempt=3), 3.0, None, 3)]
    assert state.slot_status(OFFICE, CommandKind.SECONDS_INTERVAL) is SlotStatus.GAVE_UP
    assert state.tick(100000.0) == []
    assert state.next_wakeup() is None
    counters = state.counters()
    assert (counters["sent"], counters["alerted"], counters["retried"], counters["acked"]) == (5, 4, 3, 1)


def test_given_up_meter_is_configured_again_when_back_online() -> None:
    state = tracker(retry_delays=())
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    assert state.tick(3.0) == [NoReply(seconds_cmd(1), 3.0, None, 0), NoReply(minutes_cmd(2), 3.0, None, 0)]
    state.observe_availability(OFFICE, "offline", 50.0)
    assert state.observe_availability(OFFICE, "online", 60.0) == [BackOnline(OFFICE)]
    assert take_outgoing(state, 60.0, LOCAL_NOW, 10) == [seconds_cmd(3), minutes_cmd(4)]


def test_given_up_meter_is_configured_again_when_the_configuration_changes() -> None:
    state = tracker(retry_delays=())
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.tick(3.0)
    new_settings = MeterSettings(upload_frequency_seconds=300, upload_frequency_minutes=5)
    assert state.apply_settings(new_settings, 10.0) == []
    assert take_outgoing(state, 10.0, LOCAL_NOW, 10) == [seconds_cmd(3, value="300"), minutes_cmd(4, value="5")]


def test_reply_after_the_timeout_is_late_and_stops_the_retry() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.tick(3.0)
    assert state.observe_reply(reply(1), 4.5) == [LateReply(seconds_cmd(1), "01", None, 4.5, True)]
    assert state.slot_status(OFFICE, CommandKind.SECONDS_INTERVAL) is SlotStatus.ACKED
    # Only the minutes command, still unanswered, is retried.
    assert state.tick(13.0) == [Retrying(minutes_cmd(3, attempt=1), 3)]
    assert state.counters()["late"] == 1


def test_reply_handled_after_its_deadline_but_before_the_tick_is_alerted_then_late() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 1)
    assert state.observe_reply(reply(1), 3.2) == [
        NoReply(seconds_cmd(1), 3.0, 10.0, 3), LateReply(seconds_cmd(1), "01", None, 3.2, True)]
    assert state.tick(13.0) == []


def test_new_command_supersedes_the_pending_one_for_the_same_meter_and_cmd() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    new_settings = MeterSettings(upload_frequency_seconds=600)
    assert state.apply_settings(new_settings, 1.0) == [Superseded(seconds_cmd(1)), Superseded(minutes_cmd(2))]
    assert take_outgoing(state, 1.0, LOCAL_NOW, 10) == [seconds_cmd(3, value="600"), minutes_cmd(4)]
    assert state.observe_reply(reply(1), 1.5) == [IgnoredReply(seconds_cmd(1), CommandOutcome.SUPERSEDED)]
    # The superseded command's deadline passes silently.
    assert state.tick(3.5) == []
    assert state.counters()["superseded"] == 2


def test_duplicate_reply_is_ignored() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.observe_reply(reply(1), 0.5)
    assert state.observe_reply(reply(1), 0.6) == [IgnoredReply(seconds_cmd(1), CommandOutcome.ACKED)]
    assert (state.counters()["acked"], state.counters()["ignored_replies"]) == (1, 1)


def test_hostile_replies_are_counted_and_rejected() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    assert state.observe_reply(b"\x00garbage", 0.1) == [RejectedReply("malformed JSON", "b'\\x00garbage'")]
    assert state.observe_reply(reply(99), 0.2) == [RejectedReply("unknown oprid", oprid(99))]
    assert state.observe_reply(reply(1, meter_id=HEAT_PUMP), 0.3) == [
        RejectedReply("meter id does not match", f"{HEAT_PUMP} answered {oprid(1)}")]
    assert state.counters()["rejected_replies"] == 3
    # The real reply still counts.
    assert state.observe_reply(reply(1), 0.4) == [Acked(seconds_cmd(1), 0.4)]


def test_reply_without_meter_id_is_accepted() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 1)
    assert state.observe_reply(reply(1, meter_id=None), 0.5) == [Acked(seconds_cmd(1), 0.5)]


def test_lost_connection_requeues_sent_commands_and_their_deadline_restarts_on_resend() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    assert state.connection_lost() == 2
    assert state.connection_lost() == 0
    assert state.tick(1000.0) == []  # no alert for our own outage
    assert take_outgoing(state, 1000.0, LOCAL_NOW, 10) == [seconds_cmd(1), minutes_cmd(2)]
    assert state.tick(1002.9) == []
    assert state.tick(1003.0) == [NoReply(seconds_cmd(1), 3.0, 10.0, 3), NoReply(minutes_cmd(2), 3.0, 10.0, 3)]


def test_excluding_a_meter_cancels_its_commands() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    new_settings = MeterSettings(exclude=frozenset({OFFICE}))
    assert state.apply_settings(new_settings, 1.0) == [
        Cancelled(seconds_cmd(1), "meter is now excluded"), Cancelled(minutes_cmd(2), "meter is now excluded")]
    assert state.tick(100.0) == []
    assert take_outgoing(state, 100.0, LOCAL_NOW, 10) == []


def test_thousand_silent_meters_all_time_out_in_one_tick() -> None:
    state = tracker(retry_delays=())
    meters = [f"33B{n:010d}" for n in range(1000)]
    for meter_id in meters:
        state.observe_availability(meter_id, "online", 0.0)
    assert len(take_outgoing(state, 0.0, LOCAL_NOW, 5000)) == 2000
    assert state.next_wakeup() == 3.0
    assert len(state.tick(3.0)) == 2000
    assert state.counters()["alerted"] == 2000


# --- meters that are away: offline, or silent beyond their limit ------------------------------


def acked_discovery(state: CommandTracker, meter_ids: list[str], now: float) -> None:
    """Discover the meters at ``now`` and acknowledge their interval commands at once."""
    for meter_id in meter_ids:
        state.observe_availability(meter_id, "online", now)
    for command in take_outgoing(state, now, LOCAL_NOW, 100):
        assert state.observe_reply(reply(int(command.oprid), meter_id=command.meter_id), now) != []


def test_silence_limit_is_2_5_times_the_shortest_interval_of_each_meter() -> None:
    state = tracker()
    acked_discovery(state, [OFFICE, HEAT_PUMP], 0.0)
    assert state.silence_limit(OFFICE) == 150.0       # 60 s / 1 min
    assert state.silence_limit(HEAT_PUMP) == 75.0     # its own 30 s
    assert tracker(silence_scale=0.1).silence_limit(OFFICE) == 15.0
    assert state.away_meters(75.0) == set()
    assert state.away_meters(75.5) == {HEAT_PUMP}
    assert state.away_meters(150.5) == {HEAT_PUMP, OFFICE}


def test_a_save_goes_to_the_meters_online_now_and_a_silent_one_gets_it_when_heard_again() -> None:
    state = tracker()
    acked_discovery(state, [OFFICE, HEAT_PUMP], 0.0)
    state.observe_reading(OFFICE, "seconds", None, retained=False, now=100.0, local_now=LOCAL_NOW)
    new_settings = MeterSettings(upload_frequency_seconds=300, upload_frequency_minutes=5)

    # The heat pump (limit 75 s) has been silent for 160 s; the office was heard 60 s ago.
    assert state.apply_settings(new_settings, 160.0) == [Deferred(HEAT_PUMP, "the new settings", 160.0, 75.0)]
    assert take_outgoing(state, 160.0, LOCAL_NOW, 10) == [seconds_cmd(5, value="300"), minutes_cmd(6, value="5")]
    assert state.tick(1000.0) == [NoReply(seconds_cmd(5, value="300"), 3.0, 10.0, 3),
                                  NoReply(minutes_cmd(6, value="5"), 3.0, 10.0, 3)]

    assert state.observe_reading(HEAT_PUMP, "minutes", None, retained=False, now=2000.0, local_now=LOCAL_NOW) == [
        BackOnline(HEAT_PUMP)]
    assert take_outgoing(state, 2000.0, LOCAL_NOW, 10) == [
        seconds_cmd(7, HEAT_PUMP, "300"), minutes_cmd(8, HEAT_PUMP, "5")]


def test_a_meter_offline_by_its_availability_is_not_deferred_but_configured_when_back() -> None:
    state = tracker()
    acked_discovery(state, [OFFICE], 0.0)
    state.observe_availability(OFFICE, "offline", 1.0)
    assert state.apply_settings(MeterSettings(upload_frequency_seconds=300), 2.0) == []
    assert take_outgoing(state, 2.0, LOCAL_NOW, 10) == []
    assert state.observe_availability(OFFICE, "online", 3.0) == [BackOnline(OFFICE)]
    assert take_outgoing(state, 3.0, LOCAL_NOW, 10) == [seconds_cmd(3, value="300"), minutes_cmd(4)]


def test_retries_to_a_meter_gone_silent_are_dropped_without_an_alert() -> None:
    state = tracker(silence_scale=0.1)  # limit 15 s
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    assert len(state.tick(3.0)) == 2  # the two commands sent while it was online: alerted, retry in 10 s
    assert state.tick(13.0) == [Retrying(seconds_cmd(3, attempt=1), 3), Retrying(minutes_cmd(4, attempt=1), 3)]
    take_outgoing(state, 13.0, LOCAL_NOW, 10)
    assert len(state.tick(16.0)) == 2  # alerted again, retry in 60 s
    assert state.tick(76.0) == [Deferred(OFFICE, "the retries", 76.0, 15.0)]
    assert take_outgoing(state, 76.0, LOCAL_NOW, 10) == []
    assert state.tick(100000.0) == []
    assert state.next_wakeup() is None
    assert (state.counters()["alerted"], state.counters()["retried"]) == (4, 2)
    assert state.slot_status(OFFICE, CommandKind.SECONDS_INTERVAL) is SlotStatus.CANCELLED

    assert state.observe_reading(OFFICE, "seconds", None, retained=False, now=200000.0, local_now=LOCAL_NOW) == [
        BackOnline(OFFICE)]
    assert take_outgoing(state, 200000.0, LOCAL_NOW, 10) == [seconds_cmd(5), minutes_cmd(6)]


def test_live_availability_online_counts_as_hearing_the_meter_a_retained_one_does_not() -> None:
    state = tracker()
    acked_discovery(state, [OFFICE], 0.0)
    assert state.observe_availability(OFFICE, "online", 140.0, retained=True) == []
    assert state.is_away(OFFICE, 151.0)
    assert state.observe_availability(OFFICE, "online", 151.0) == [BackOnline(OFFICE)]
    assert take_outgoing(state, 151.0, LOCAL_NOW, 10) == [seconds_cmd(3), minutes_cmd(4)]
    assert state.observe_availability(OFFICE, "online", 290.0) == []
    assert not state.is_away(OFFICE, 300.0)


def test_silence_while_the_sender_was_not_listening_does_not_count() -> None:
    state = tracker()
    acked_discovery(state, [OFFICE, HEAT_PUMP], 0.0)
    # Our own central connection is down from 10 s to 1000 s; a save meanwhile defers both.
    assert [e.meter_id for e in state.apply_settings(MeterSettings(upload_frequency_seconds=300), 500.0)] == [
        HEAT_PUMP, OFFICE]
    state.resume_listening(1000.0)
    assert state.away_meters(1000.0) == set()
    # Not "back online" (it was not away), but the held-back settings go out now.
    assert state.observe_reading(OFFICE, "seconds", None, retained=False, now=1010.0, local_now=LOCAL_NOW) == []
    assert take_outgoing(state, 1010.0, LOCAL_NOW, 10) == [seconds_cmd(5, value="300"), minutes_cmd(6)]
    # Nothing held back for the office any more: its next reading sends nothing.
    assert state.observe_reading(OFFICE, "seconds", None, retained=False, now=1020.0, local_now=LOCAL_NOW) == []
    assert take_outgoing(state, 1020.0, LOCAL_NOW, 10) == []


def test_silence_limit_follows_the_longer_of_the_configured_and_the_acknowledged_intervals() -> None:
    slow = MeterSettings(upload_frequency_seconds=3600, upload_frequency_minutes=60)
    state = tracker(settings=slow)
    acked_discovery(state, [OFFICE], 0.0)
    assert state.silence_limit(OFFICE) == 9000.0
    # Faster intervals: until the meter acknowledges them, it still reports hourly.
    assert state.apply_settings(MeterSettings(upload_frequency_seconds=30, upload_frequency_minutes=1), 5000.0) == []
    seconds, minutes = take_outgoing(state, 5000.0, LOCAL_NOW, 10)
    assert state.silence_limit(OFFICE) == 9000.0
    state.observe_reply(reply(int(minutes.oprid)), 5000.5)
    assert state.silence_limit(OFFICE) == 150.0  # energy every minute now; power still hourly
    state.observe_reply(reply(int(seconds.oprid)), 5000.5)
    assert state.silence_limit(OFFICE) == 75.0


# --- the meter clock -------------------------------------------------------------------


def test_meter_clock_in_2005_gets_a_clock_command_at_most_hourly() -> None:
    state = tracker(silence_scale=100.0)  # the readings between those below are left out
    events = state.observe_reading(OFFICE, "seconds", datetime(2005, 1, 1), retained=False, now=0.0,
                                   local_now=LOCAL_NOW)
    drift = (datetime(2005, 1, 1) - LOCAL_NOW).total_seconds()
    assert events == [Discovered(OFFICE, "seconds", False, False), ClockDrift(OFFICE, datetime(2005, 1, 1), drift)]
    later = datetime(2026, 1, 12, 16, 39, 7)
    assert take_outgoing(state, 0.1, later, 10) == [
        seconds_cmd(1), minutes_cmd(2), Command(OFFICE, CommandKind.CLOCK, "20260112163907", oprid(3))]
    assert state.observe_reply(reply(3), 0.5) == [
        Acked(Command(OFFICE, CommandKind.CLOCK, "20260112163907", oprid(3)), 0.4)]
    assert state.observe_reading(OFFICE, "seconds", datetime(2005, 1, 1), False, 3599.0, LOCAL_NOW) == []
    assert state.observe_reading(OFFICE, "seconds", datetime(2005, 1, 1), False, 3600.0, LOCAL_NOW) == [
        ClockDrift(OFFICE, datetime(2005, 1, 1), drift)]
    assert state.counters()["clock_commands"] == 2


def test_meter_clock_within_the_drift_gets_no_clock_command() -> None:
    state = tracker()
    assert state.observe_reading(OFFICE, "seconds", datetime(2026, 1, 12, 16, 39), False, 0.0, LOCAL_NOW) == [
        Discovered(OFFICE, "seconds", False, False)]
    assert [c.kind for c in take_outgoing(state, 0.0, LOCAL_NOW, 10)] == [
        CommandKind.SECONDS_INTERVAL, CommandKind.MINUTES_INTERVAL]


def test_retained_old_reading_does_not_trigger_a_clock_command() -> None:
    state = tracker()
    state.observe_reading(OFFICE, "minutes", datetime(2005, 1, 1), retained=True, now=0.0, local_now=LOCAL_NOW)
    assert CommandKind.CLOCK not in [c.kind for c in take_outgoing(state, 0.0, LOCAL_NOW, 10)]
    assert state.counters()["clock_commands"] == 0


def test_clock_sync_off_sends_no_clock_command() -> None:
    state = tracker(settings=MeterSettings(clock_sync=False))
    state.observe_reading(OFFICE, "seconds", datetime(2005, 1, 1), retained=False, now=0.0, local_now=LOCAL_NOW)
    assert CommandKind.CLOCK not in [c.kind for c in take_outgoing(state, 0.0, LOCAL_NOW, 10)]


def test_unanswered_clock_command_is_alerted_but_not_retried() -> None:
    state = tracker()
    state.observe_reading(OFFICE, "seconds", datetime(2005, 1, 1), retained=False, now=0.0, local_now=LOCAL_NOW)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.observe_reply(reply(1), 0.1)
    state.observe_reply(reply(2), 0.1)
    clock = Command(OFFICE, CommandKind.CLOCK, "20260112163905", oprid(3))
    assert state.tick(3.0) == [NoReply(clock, 3.0, None, 3)]
    assert state.tick(10000.0) == []


# --- a property: every command ends exactly once ------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["01", "02", "silent", "late"]), min_size=1, max_size=40))
def test_every_sent_command_ends_acked_failed_or_alerted_exactly_once(behaviours: list[str]) -> None:
    state = tracker(retry_delays=())
    meters = [f"33B{n:010d}" for n in range(len(behaviours))]
    for meter_id in meters:
        state.observe_availability(meter_id, "online", 0.0)
    sent = take_outgoing(state, 0.0, LOCAL_NOW, 1000)
    for command in sent:
        behaviour = behaviours[meters.index(command.meter_id)]
        if behaviour in ("01", "02"):
            state.observe_reply(reply(int(command.oprid), behaviour, command.meter_id), 1.0)
    state.tick(3.0)
    for command in sent:
        if behaviours[meters.index(command.meter_id)] == "late":
            state.observe_reply(reply(int(command.oprid), "01", command.meter_id), 4.0)
    counters = state.counters()
    assert counters["acked"] + counters["failed"] + counters["alerted"] == counters["sent"] == len(sent)
    assert counters["late"] == 2 * behaviours.count("late")
    assert counters["pending"] == 0
