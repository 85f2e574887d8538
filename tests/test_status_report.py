"""The status command's pure part without a broker: retained messages in, the fleet, its table and document out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config_loader import DeviceSettings, MeterSettings
from fleet import device_list, encode_device_list
from kpm33b_status import subscription_steps
from status_report import (
    FleetStatus,
    MeterStatus,
    collect,
    counters_text,
    duration_text,
    format_table,
    meter_clock_text,
    offset_text,
    printable,
    report_document,
    utc_text,
)

METER = "33B1225950027"
OTHER = "33B1225950028"
THIRD = "33B1225950029"
# 2026-01-12T16:39:00Z, when the meters' readings below were taken (their clocks keep UTC here).
WALL = 1768235940.0
NOW = datetime(2026, 1, 12, 16, 40, 5, tzinfo=UTC)
SETTINGS = MeterSettings(devices=MappingProxyType({METER: DeviceSettings(name="Heat pump",
                                                                         upload_frequency_seconds=30)}))
PROXY_STATS = {"received": 120, "forwarded": 100, "dropped": {"all_zero": 12, "duplicate": 8}, "queue_depth": 0,
               "meters": 2, "uptime_seconds": 7420}
SENDER_STATS = {"sent": 4, "refused_by_broker": 0, "acked": 3, "alerted": 1, "late": 0, "failed": 0, "retried": 2,
                "rejected_replies": 0, "ignored_replies": 0, "superseded": 0, "clock_commands": 1,
                "discovered": 2, "pending": 0, "meters": 2, "device_list_rejected": 0, "log_lines_dropped": 0,
                "uptime_seconds": 61}


def seconds(meter_id: str, power: object, time: object = "2026-01-12T16:39:00") -> bytes:
    return json.dumps({"id": meter_id, "time": time, "active_power": power}).encode()


def minutes(meter_id: str, energy: object, time: object = "2026-01-12T16:39:00") -> bytes:
    return json.dumps({"id": meter_id, "time": time, "active_energy": energy}).encode()


def config_status(meter_id: str, state: object = "applied", offset: object = -2.4) -> bytes:
    return json.dumps({"id": meter_id, "upload_frequency_seconds": 300, "upload_frequency_minutes": 5,
                       "state": state, "updated": "2026-01-12T16:38:58Z", "clock_offset_seconds": offset}).encode()


def system() -> list[tuple[str, bytes]]:
    """What the central broker retains for two meters of a running system."""
    devices = device_list([(METER, WALL, True), (OTHER, WALL - 600, False)], SETTINGS)
    return [
        ("kpm33b/bridge/state", b"online"),
        ("kpm33b/bridge/stats", json.dumps(PROXY_STATS).encode()),
        ("kpm33b/bridge/config_sender/stats", json.dumps(SENDER_STATS).encode()),
        ("kpm33b/bridge/devices", encode_device_list(devices)),
        (f"kpm33b/{METER}/availability", b"online"),
        (f"kpm33b/{OTHER}/availability", b"offline"),
        (f"kpm33b/{METER}/seconds", seconds(METER, 6.6905)),
        (f"kpm33b/{OTHER}/seconds", seconds(OTHER, 0.25, "2026-01-11T09:05:00")),
        (f"kpm33b/{METER}/minutes", minutes(METER, 163.486)),
        (f"kpm33b/{METER}/config_status", config_status(METER)),
        (f"kpm33b/{OTHER}/config_status", config_status(OTHER, "no_reply", None)),
    ]


def test_a_running_system_collected_meter_by_meter() -> None:
    fleet = collect("kpm33b", system())

    assert fleet.bridge_state == "online"
    assert fleet.proxy_stats == PROXY_STATS
    assert fleet.sender_stats == SENDER_STATS
    assert fleet.device_list is True
    assert fleet.unreadable == []
    assert fleet.meters == [
        MeterStatus(METER, name="Heat pump", availability="online", last_seen="2026-01-12T16:39:00Z",
                    power=6.6905, power_time="2026-01-12T16:39:00", energy=163.486,
                    energy_time="2026-01-12T16:39:00", seconds_interval=30, minutes_interval=1,
                    config_state="applied", config_updated="2026-01-12T16:38:58Z", clock_offset=-2.4),
        MeterStatus(OTHER, name=f"KPM33B {OTHER}", availability="offline", last_seen="2026-01-12T16:29:00Z",
                    power=0.25, power_time="2026-01-11T09:05:00", seconds_interval=60, minutes_interval=1,
                    config_state="no_reply", config_updated="2026-01-12T16:38:58Z"),
    ]


def test_without_a_device_list_meters_come_from_their_own_topics_and_intervals_from_the_config_status() -> None:
    messages = [(topic, payload) for topic, payload in system() if topic != "kpm33b/bridge/devices"]
    fleet = collect("kpm33b", messages)

    assert fleet.device_list is False
    assert [(m.meter_id, m.name, m.last_seen, m.seconds_interval, m.minutes_interval) for m in fleet.meters] == [
        (METER, None, None, 300, 5), (OTHER, None, None, 300, 5)]
    assert "no device list retained" in format_table(fleet, "broker:1883", NOW)


def test_a_meters_own_availability_wins_over_the_device_list_which_stands_in_when_it_is_missing() -> None:
    devices = encode_device_list(device_list([(METER, WALL, True), (OTHER, WALL, True)], SETTINGS))
    fleet = collect("kpm33b", [("kpm33b/bridge/devices", devices), (f"kpm33b/{METER}/availability", b"offline")])

    assert [(m.meter_id, m.availability) for m in fleet.meters] == [(METER, "offline"), (OTHER, "online")]


def test_the_latest_message_of_a_topic_wins_and_an_empty_one_clears_it() -> None:
    fleet = collect("kpm33b", [
        (f"kpm33b/{METER}/seconds", seconds(METER, 1.0)),
        (f"kpm33b/{METER}/seconds", seconds(METER, 2.0, "2026-01-12T16:39:30")),  # live, newer
        (f"kpm33b/{OTHER}/seconds", seconds(OTHER, 1.0)),
        (f"kpm33b/{OTHER}/seconds", b""),
    ])

    assert [(m.meter_id, m.power, m.power_time) for m in fleet.meters] == [(METER, 2.0, "2026-01-12T16:39:30")]


def test_only_one_meter_and_only_this_main_topic() -> None:
    messages = [*system(), ("other/33B1225950029/seconds", seconds(THIRD, 1.0)),
                ("kpm33b/33B1225950029/unknown", b"x"), ("kpm33b/not-a-meter/seconds", seconds(THIRD, 1.0))]

    assert [m.meter_id for m in collect("kpm33b", messages).meters] == [METER, OTHER]
    fleet = collect("kpm33b", messages, only=OTHER)
    assert [m.meter_id for m in fleet.meters] == [OTHER]
    assert fleet.bridge_state == "online"
    assert collect("kpm33b", messages, only=THIRD).meters == []


HOSTILE = [
    b"garbage", b"\xff\xfe\x00", b"[]", b"null", b"42", b'"online"', b"[" * 100_000,
    b'{"active_power": "6.6", "active_energy": true, "time": "20260112163900"}',
    b'{"active_power": NaN, "active_energy": Infinity, "time": "2026-01-12T16:39:00Z"}',
    b'{"active_power": [1], "active_energy": {"a": 1}, "time": 20260112}',
    b'{"state": "done", "updated": "2026-01-12T16:38:58", "clock_offset_seconds": "3",'
    b' "upload_frequency_seconds": true, "upload_frequency_minutes": -5}',
    b'{"state": ["applied"], "updated": "0001-01-01T00:00:00Z", "clock_offset_seconds": false,'
    b' "upload_frequency_seconds": 30.5}',
    b'{"time": "' + b"9" * 10_000 + b'"}',
]


@pytest.mark.parametrize("payload", HOSTILE)
@pytest.mark.parametrize("leaf", ["seconds", "minutes", "config_status", "availability"])
def test_a_hostile_payload_on_a_meter_topic_shows_as_unknown(leaf: str, payload: bytes) -> None:
    fleet = collect("kpm33b", [(f"kpm33b/{METER}/{leaf}", payload)])

    assert len(fleet.meters) == 1
    meter = fleet.meters[0]
    assert meter == MeterStatus(METER)  # every value unknown
    table = format_table(fleet, "broker:1883", NOW)
    row = table.splitlines()[6].split()
    assert row[0] == METER and set(row[1:]) <= {"-", "/"}
    json.dumps(report_document(fleet, "broker:1883", NOW))
    # A payload that is not even a JSON object (or online/offline) names its topic.
    readable = leaf != "availability" and payload.startswith(b"{")
    assert fleet.unreadable == ([] if readable else [f"kpm33b/{METER}/{leaf}"])


@pytest.mark.parametrize("payload", [*HOSTILE, b'[{"id": "33B1225950027/#"}, {"id": 7}, "x", null]',
                                     b'[{"id": "33B1225950027", "name": 7, "availability": "maybe", '
                                     b'"last_seen": 1, "upload_frequency_seconds": "30"}]'])
def test_a_hostile_payload_on_a_bridge_topic_shows_as_unknown(payload: bytes) -> None:
    for topic in ("kpm33b/bridge/state", "kpm33b/bridge/stats", "kpm33b/bridge/config_sender/stats",
                  "kpm33b/bridge/devices"):
        fleet = collect("kpm33b", [(topic, payload)])
        assert fleet.bridge_state is None
        assert all(meter == MeterStatus(METER) for meter in fleet.meters)
        text = format_table(fleet, "broker:1883", NOW)
        assert text.splitlines()[1:4] == ["bridge         -", "proxy          -", "config sender  -"] or (
            topic.endswith("stats") and payload.startswith(b"{"))
        json.dumps(report_document(fleet, "broker:1883", NOW))


def test_counters_of_the_wrong_type_are_left_out_and_show_as_unknown() -> None:
    stats = {"received": "12", "forwarded": -1, "dropped": {"duplicate": 3, "all_zero": "x"}, "queue_depth": True,
             "meters": 2.5, "uptime_seconds": None}
    fleet = collect("kpm33b", [("kpm33b/bridge/stats", json.dumps(stats).encode())])

    assert fleet.proxy_stats == {"dropped": {"duplicate": 3}}
    assert counters_text(fleet.proxy_stats, ("received", "forwarded", "dropped", "queue_depth", "meters")) == (
        "received -, forwarded -, dropped 3 (duplicate 3), queue -, meters -")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["kpm33b/bridge/state", "kpm33b/bridge/stats", "kpm33b/bridge/devices",
                                           "kpm33b/bridge/config_sender/stats", f"kpm33b/{METER}/seconds",
                                           f"kpm33b/{METER}/minutes", f"kpm33b/{METER}/availability",
                                           f"kpm33b/{METER}/config_status"]),
                          st.one_of(st.binary(max_size=64),
                                    st.recursive(st.none() | st.booleans() | st.integers() | st.floats()
                                                 | st.text(max_size=12),
                                                 lambda inner: st.lists(inner, max_size=3)
                                                 | st.dictionaries(st.sampled_from(
                                                     ["id", "time", "active_power", "active_energy", "state",
                                                      "updated", "clock_offset_seconds", "name", "availability",
                                                      "upload_frequency_seconds", "last_seen", "dropped"]),
                                                     inner, max_size=6),
                                                 max_leaves=10).map(lambda v: json.dumps(v).encode()))),
                max_size=8))
def test_whatever_is_retained_the_table_and_the_document_come_out(messages: list[tuple[str, bytes]]) -> None:
    fleet = collect("kpm33b", messages)
    format_table(fleet, "broker:1883", NOW)
    format_table(fleet, "broker:1883", datetime(2026, 1, 12, 8, 0, tzinfo=timezone(timedelta(hours=-11))))
    json.dumps(report_document(fleet, "broker:1883", NOW), allow_nan=False)


def test_the_table_of_a_running_system() -> None:
    table = format_table(collect("kpm33b", system()), "broker.lan:1883", NOW)

    assert table == (
        "kpm33b on broker.lan:1883, read 2026-01-12 16:40:05 UTC\n"
        "bridge         online\n"
        "proxy          received 120, forwarded 100, dropped 20 (all_zero 12, duplicate 8), queue 0, meters 2, "
        "up 2 h 03 min\n"
        "config sender  sent 4, acked 3, alerted 1, late 0, failed 0, pending 0, meters 2, retried 2, "
        "clock_commands 1, discovered 2, up 1 min\n"
        "\n"
        "ID             NAME                  AVAIL        POWER  AT                     ENERGY  AT        "
        "INTERVALS     CONFIG    SINCE     CLOCK\n"
        "33B1225950027  Heat pump             online   6.6905 kW  16:39:00          163.486 kWh  16:39:00  "
        "30 s / 1 min  applied   16:38:58   -2 s\n"
        "33B1225950028  KPM33B 33B1225950028  offline    0.25 kW  2026-01-11 09:05            -  -         "
        "60 s / 1 min  no_reply  16:38:58      -\n"
        "2 meters: 1 online, 1 offline\n"
    )


def test_the_json_document_of_a_running_system() -> None:
    document = report_document(collect("kpm33b", system()), "broker.lan:1883", NOW)

    assert json.loads(json.dumps(document)) == {
        "broker": "broker.lan:1883", "main_topic": "kpm33b", "read_at": "2026-01-12T16:40:05Z",
        "bridge": {"state": "online", "proxy_stats": PROXY_STATS, "config_sender_stats": SENDER_STATS},
        "device_list": True,
        "meters": [
            {"id": METER, "name": "Heat pump", "availability": "online", "last_seen": "2026-01-12T16:39:00Z",
             "active_power": 6.6905, "active_power_time": "2026-01-12T16:39:00", "active_energy": 163.486,
             "active_energy_time": "2026-01-12T16:39:00", "upload_frequency_seconds": 30,
             "upload_frequency_minutes": 1, "config_state": "applied", "config_updated": "2026-01-12T16:38:58Z",
             "clock_offset_seconds": -2.4},
            {"id": OTHER, "name": f"KPM33B {OTHER}", "availability": "offline", "last_seen": "2026-01-12T16:29:00Z",
             "active_power": 0.25, "active_power_time": "2026-01-11T09:05:00", "active_energy": None,
             "active_energy_time": None, "upload_frequency_seconds": 60, "upload_frequency_minutes": 1,
             "config_state": "no_reply", "config_updated": "2026-01-12T16:38:58Z", "clock_offset_seconds": None},
        ],
        "unreadable": [],
    }


def test_times_today_are_short_other_days_carry_the_date_and_utc_times_show_in_the_local_zone() -> None:
    paris = datetime(2026, 1, 12, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    # The meter's clock is shown as it is: it keeps local time, and says no zone.
    assert meter_clock_text("2026-01-12T00:10:00", paris) == "00:10:00"
    assert meter_clock_text("2026-01-11T23:59:59", paris) == "2026-01-11 23:59"
    assert meter_clock_text("2005-01-01T00:00:07", paris) == "2005-01-01 00:00"
    assert meter_clock_text(None, paris) == "-"
    # 23:10 UTC on the 11th is 00:10 on the 12th in Paris: today.
    assert utc_text("2026-01-11T23:10:00Z", paris) == "00:10:00"
    assert utc_text("2026-01-11T22:10:00Z", paris) == "2026-01-11 23:10"
    assert utc_text(None, paris) == "-"


def test_durations_and_clock_offsets_are_compact() -> None:
    assert [duration_text(s) for s in (0, 59.4, 60, 3599, 3600, 7420, 86399, 86400, 90061)] == [
        "0 s", "59 s", "1 min", "59 min", "1 h 00 min", "2 h 03 min", "23 h 59 min", "1 d 00 h", "1 d 01 h"]
    assert [offset_text(s) for s in (None, 0, -0.4, 2.4, -2.6, -180, 660_000_000)] == [
        "-", "+0 s", "+0 s", "+2 s", "-3 s", "-3 min", "+7638 d 21 h"]


def test_names_and_topics_cannot_send_escape_sequences_to_the_terminal() -> None:
    assert printable("Heat\x1b[2Jpump\n") == "Heat?[2Jpump?"
    assert printable("A" * 30, 24) == "A" * 23 + "…"
    devices = json.dumps([{"id": METER, "name": "\x1b]0;owned\x07Heat pump", "availability": "online"}]).encode()
    fleet = collect("kpm33b", [("kpm33b/bridge/devices", devices)])
    table = format_table(fleet, "broker:1883", NOW)
    assert "\x1b" not in table and "\x07" not in table and "?]0;owned?Heat pump" in table
    assert report_document(fleet, "b", NOW)["meters"][0]["name"] == "\x1b]0;owned\x07Heat pump"  # JSON escapes it


def test_an_empty_broker_gives_an_empty_report() -> None:
    fleet = collect("kpm33b", [])
    assert fleet == FleetStatus("kpm33b")
    assert format_table(fleet, "broker:1883", NOW).splitlines()[1:] == [
        "bridge         -", "proxy          -", "config sender  -", "",
        "0 meters: 0 online, 0 offline; no device list retained (meters found from their own topics only)"]


def test_the_subscriptions_device_list_first_then_one_leaf_of_every_meter_a_step() -> None:
    bridge = ["kpm33b/bridge/devices", "kpm33b/bridge/state", "kpm33b/bridge/stats",
              "kpm33b/bridge/config_sender/stats"]
    assert subscription_steps("kpm33b", None) == [
        [*bridge, "kpm33b/+/availability"], ["kpm33b/+/seconds"], ["kpm33b/+/minutes"], ["kpm33b/+/config_status"]]
    assert subscription_steps("kpm33b", METER) == [[
        *bridge, f"kpm33b/{METER}/availability", f"kpm33b/{METER}/seconds", f"kpm33b/{METER}/minutes",
        f"kpm33b/{METER}/config_status"]]
