"""Tests of the meter simulator: its pure payload/command functions and, against
real Mosquitto processes, the behaviour other tests rely on it for."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, wait_for
from daemons import simulated_meters
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from payloads import FIXTURES, capture_payloads

from tools.meter_simulator import (
    ENY_NOW_TAGS,
    RT_DATA_TAGS,
    build_parser,
    clock_2005,
    command_reply,
    encode_payload,
    eny_now_payload,
    merge_packets,
    meter_ids,
    parse_capture_line,
    reply_modes_for,
    requested_interval,
    requested_time,
    rt_data_payload,
    split_packets,
    spurious_sequence,
    zero_reading,
)

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR = ROOT / "tools" / "meter_simulator.py"
WHEN = datetime(2026, 1, 12, 16, 39, 0)

# The tag lists exactly as protocol.md gives them, spelled out independently
# of the module's own constants.
PROTOCOL_RT_TAGS = {
    "ua", "ub", "uc", "uab", "ubc", "uca", "ia", "ib", "ic", "pa", "pb", "pc", "zyggl",
    "qa", "qb", "qc", "zwggl", "sa", "sb", "sc", "zszgl", "pfa", "pfb", "pfc", "zglys", "f",
    "uxja", "uxjb", "uxjc", "ixja", "ixjb", "ixjc", "unb", "inb",
    "pdm", "qdm", "sdm", "iadm", "ibdm", "icdm",
}  # fmt: skip
PROTOCOL_ENY_TAGS = {
    "zygsz", "fygsz", "zwgsz", "fwgsz", "zszsz", "zyjsz", "zyfsz", "zypsz", "zyvsz", "zydvsz",
    "fyjsz", "fyfsz", "fypsz", "fyvsz", "fydvsz",
}  # fmt: skip
THREE_DECIMAL_RT_TAGS = "ua ub uc uab ubc uca ia ib ic pfa pfb pfc zglys f uxja uxjb uxjc ixja ixjb ixjc unb inb"
FOUR_DECIMAL_RT_TAGS = "pa pb pc zyggl qa qb qc zwggl sa sb sc zszgl pdm qdm sdm iadm ibdm icdm"


def oprid() -> str:
    """A valid 32-character operation id."""
    return uuid.uuid4().hex


# ---------------------------------------------------------------- meter_ids


def test_meter_ids_are_prefix_plus_zero_padded_serial_of_13_characters() -> None:
    assert meter_ids(3) == ["33B1225950027", "33B1225950028", "33B1225950029"]
    assert meter_ids(2, prefix="KPM312", start=7) == ["KPM3120000007", "KPM3120000008"]
    assert meter_ids(0) == []


def test_meter_ids_that_cannot_fit_13_characters_are_refused() -> None:
    with pytest.raises(ValueError):
        meter_ids(2, prefix="33B122599", start=9999)  # 10000 needs 5 digits, 4 left
    with pytest.raises(ValueError):
        meter_ids(1, prefix="33B1225950027")  # no room for a serial
    with pytest.raises(ValueError):
        meter_ids(1, prefix="33B-2259")  # not alphanumeric
    with pytest.raises(ValueError):
        meter_ids(-1)
    assert meter_ids(1, prefix="33B122599", start=9999) == ["33B1225999999"]


# ---------------------------------------------------------------- RT_DATA


def test_module_tag_lists_match_the_protocol() -> None:
    assert set(RT_DATA_TAGS) == PROTOCOL_RT_TAGS
    assert len(RT_DATA_TAGS) == 40
    assert set(ENY_NOW_TAGS) == PROTOCOL_ENY_TAGS


def test_rt_data_payload_carries_every_protocol_tag_and_nothing_else() -> None:
    payload = rt_data_payload("33B1225950027", WHEN, random.Random(1))
    assert set(payload) == PROTOCOL_RT_TAGS | {"id", "time", "isend"}
    assert payload["id"] == "33B1225950027"
    assert payload["time"] == "20260112163900"
    assert payload["isend"] == "1"
    assert all(isinstance(payload[tag], float) for tag in PROTOCOL_RT_TAGS)


def test_rt_data_payload_has_the_same_tags_as_the_captured_message() -> None:
    line = (FIXTURES / "MQTT_RT_DATA_2026-01-12.log").read_text()
    parsed = parse_capture_line(line)
    assert parsed is not None
    real = json.loads(parsed[1])
    simulated = rt_data_payload(real["id"], WHEN, random.Random(2))
    assert list(simulated) == list(real)  # same keys in the same order


@pytest.mark.parametrize("seed", range(50))
def test_rt_data_totals_are_the_sum_of_the_phases(seed: int) -> None:
    p = rt_data_payload("33B1225950027", WHEN, random.Random(seed))
    rounding = 1.5e-4 + 1e-9  # three values rounded to 4 decimals, then the total
    assert abs(p["zyggl"] - (p["pa"] + p["pb"] + p["pc"])) <= rounding
    assert abs(p["zwggl"] - (p["qa"] + p["qb"] + p["qc"])) <= rounding
    assert abs(p["zszgl"] - (p["sa"] + p["sb"] + p["sc"])) <= rounding
    assert abs(p["zglys"] - p["zyggl"] / p["zszgl"]) <= 0.0011
    for phase in "abc":
        assert abs(p[f"s{phase}"] - p[f"u{phase}"] * p[f"i{phase}"] / 1000) <= 1e-3
        assert abs(p[f"pf{phase}"] - p[f"p{phase}"] / p[f"s{phase}"]) <= 0.002


@pytest.mark.parametrize("seed", range(50))
def test_rt_data_values_are_those_of_a_230_400_volt_supply(seed: int) -> None:
    p = rt_data_payload("33B1225950027", WHEN, random.Random(seed))
    for tag in ("ua", "ub", "uc"):
        assert 225.0 <= p[tag] <= 235.0
    for tag in ("uab", "ubc", "uca"):
        assert 385.0 <= p[tag] <= 415.0
    assert 49.9 <= p["f"] <= 50.1
    assert p["uxja"] == 0.0
    assert 0.9 <= p["zglys"] <= 1.0
    assert p["zyggl"] > 0
    for tag in THREE_DECIMAL_RT_TAGS.split():
        assert round(p[tag], 3) == p[tag], tag
    for tag in FOUR_DECIMAL_RT_TAGS.split():
        assert round(p[tag], 4) == p[tag], tag


def test_rt_data_payload_is_reproducible_from_the_random_generator() -> None:
    first = rt_data_payload("33B1225950027", WHEN, random.Random(7))
    again = rt_data_payload("33B1225950027", WHEN, random.Random(7))
    other = rt_data_payload("33B1225950027", WHEN, random.Random(8))
    assert first == again
    assert first != other


# ---------------------------------------------------------------- ENY_NOW


def test_eny_now_payload_is_exact_and_ordered_like_the_capture() -> None:
    payload = eny_now_payload("33B1225950027", datetime(2026, 1, 12, 17, 0), 56.331)
    assert encode_payload(payload) == (
        b'{"id":"33B1225950027","zygsz":56.331,"fygsz":0.0,"zwgsz":0.563,"fwgsz":3.943,"zszsz":56.753,'
        b'"zyjsz":8.449,"fyjsz":0.0,"zyfsz":12.392,"fyfsz":0.0,"zypsz":32.674,"fypsz":0.0,'
        b'"zyvsz":2.816,"fyvsz":0.0,"zydvsz":0.0,"fydvsz":0.0,"time":"20260112170000","isend":"1"}'
    )
    assert set(payload) == PROTOCOL_ENY_TAGS | {"id", "time", "isend"}


def test_eny_now_payload_books_export_on_the_export_tariffs() -> None:
    payload = eny_now_payload("33B1225950027", WHEN, 10.0, export_kwh=2.5)
    assert payload["fygsz"] == 2.5
    assert (payload["fyjsz"], payload["fyfsz"], payload["fypsz"], payload["fyvsz"], payload["fydvsz"]) == (
        0.375,
        0.55,
        1.45,
        0.125,
        0.0,
    )


@given(
    import_wh=st.integers(min_value=0, max_value=10**9),
    export_wh=st.integers(min_value=0, max_value=10**9),
)
def test_eny_now_tariffs_sum_to_the_totals(import_wh: int, export_wh: int) -> None:
    payload = eny_now_payload("33B1225950027", WHEN, import_wh / 1000, export_wh / 1000)
    imported = [payload[t] for t in ("zyjsz", "zyfsz", "zypsz", "zyvsz", "zydvsz")]
    exported = [payload[t] for t in ("fyjsz", "fyfsz", "fypsz", "fyvsz", "fydvsz")]
    assert round(sum(imported), 3) == payload["zygsz"] == import_wh / 1000
    assert round(sum(exported), 3) == payload["fygsz"] == export_wh / 1000
    assert all(value >= 0 for value in imported + exported)
    assert all(round(payload[tag], 3) == payload[tag] for tag in PROTOCOL_ENY_TAGS)


def test_eny_now_payload_rounds_to_watt_hours_and_refuses_negative_energy() -> None:
    assert eny_now_payload("33B1225950027", WHEN, 1.23449)["zygsz"] == 1.234
    with pytest.raises(ValueError):
        eny_now_payload("33B1225950027", WHEN, -0.001)
    with pytest.raises(ValueError):
        eny_now_payload("33B1225950027", WHEN, float("nan"))


def test_spurious_sequence_is_real_then_all_zero_then_duplicate() -> None:
    real = eny_now_payload("33B1225950029", datetime(2005, 1, 12, 17, 0), 117.607)
    sequence = spurious_sequence(real, "20260112170000")
    assert sequence[0] == real
    assert sequence[2] == real
    zero = sequence[1]
    assert zero["id"] == "33B1225950029"
    assert zero["time"] == "20260112170000"  # unset clock: the zero carries the real date
    assert zero["isend"] == "1"
    assert {tag: zero[tag] for tag in PROTOCOL_ENY_TAGS} == dict.fromkeys(PROTOCOL_ENY_TAGS, 0.0)
    assert zero_reading(real) == {**zero, "time": "20050112170000"}


# ---------------------------------------------------------------- packets


def test_split_packets_spreads_tags_and_marks_only_the_last_packet_final() -> None:
    payload = rt_data_payload("33B1225950027", WHEN, random.Random(3))
    packets = split_packets(payload, 9)
    assert len(packets) == 9
    assert [p["isend"] for p in packets] == ["0"] * 8 + ["1"]
    assert all(p["id"] == "33B1225950027" and p["time"] == "20260112163900" for p in packets)
    assert [len(p) - 3 for p in packets] == [5, 5, 5, 5, 4, 4, 4, 4, 4]  # 40 tags
    assert merge_packets(packets) == payload
    assert split_packets(payload, 1) == [payload]


@given(parts=st.integers(min_value=1, max_value=15), import_wh=st.integers(min_value=0, max_value=10**8))
def test_split_then_merge_gives_back_the_reading(parts: int, import_wh: int) -> None:
    payload = eny_now_payload("33B1225950027", WHEN, import_wh / 1000)
    packets = split_packets(payload, parts)
    assert len(packets) == parts
    assert merge_packets(packets) == payload
    assert list(merge_packets(packets)) == list(payload)


def test_split_packets_refuses_impossible_splits() -> None:
    payload = eny_now_payload("33B1225950027", WHEN, 1.0)
    with pytest.raises(ValueError):
        split_packets(payload, 0)
    with pytest.raises(ValueError):
        split_packets(payload, 16)  # 15 tags


def test_merge_packets_refuses_packets_of_different_readings() -> None:
    first = split_packets(eny_now_payload("33B1225950027", WHEN, 1.0), 2)
    other = split_packets(eny_now_payload("33B1225950028", WHEN, 1.0), 2)
    with pytest.raises(ValueError):
        merge_packets([first[0], other[1]])
    with pytest.raises(ValueError):
        merge_packets([first[1], first[0]])
    with pytest.raises(ValueError):
        merge_packets([])


# ---------------------------------------------------------------- captures


def test_parse_capture_line_reads_every_message_of_the_two_day_capture() -> None:
    lines = (FIXTURES / "MQTT_ENY_NOW_2026-01-12.log").read_text().splitlines()
    messages = [parsed for line in lines if (parsed := parse_capture_line(line)) is not None]
    assert len(messages) == 2072
    assert {topic for topic, _ in messages} == {"MQTT_ENY_NOW"}
    ids = {json.loads(payload)["id"] for _, payload in messages}
    assert ids == {"33B1225950027", "33B1225950028", "33B1225950029", "33B1225950030"}
    assert all(set(json.loads(payload)) == PROTOCOL_ENY_TAGS | {"id", "time", "isend"} for _, payload in messages)


def test_parse_capture_line_splits_at_the_first_space_only() -> None:
    assert parse_capture_line('MQTT_TELEIND {"value": "1@0"}\r\n') == ("MQTT_TELEIND", b'{"value": "1@0"}')
    assert parse_capture_line("") is None
    assert parse_capture_line("   \n") is None
    assert parse_capture_line("# recorded 2026-01-12") is None
    with pytest.raises(ValueError):
        parse_capture_line("MQTT_ENY_NOW")


# ---------------------------------------------------------------- commands


def test_command_reply_echoes_id_and_oprid_with_code_01() -> None:
    op = oprid()
    command = json.dumps({"oprid": op, "Cmd": "0000", "value": "60", "types": "1"}).encode()
    assert command_reply("config", command, "33B1225950027") == {"id": "33B1225950027", "oprid": op, "code": "01"}
    clock = json.dumps({"oprid": op, "time": "20260112163900"}).encode()
    assert command_reply("time", clock, "33B1225950027") == {"id": "33B1225950027", "oprid": op, "code": "01"}


@pytest.mark.parametrize("length", [0, 31, 33])
def test_command_with_an_oprid_not_of_32_characters_gets_no_reply(length: int) -> None:
    command = json.dumps({"oprid": "a" * length, "Cmd": "0000", "value": "60", "types": "1"}).encode()
    assert command_reply("config", command, "33B1225950027") is None


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'["oprid"]', b'{"Cmd":"0000","value":"60"}', b'{"oprid":12345678901234567890123456789012}', b"\xff"],
)
def test_malformed_commands_get_no_reply(payload: bytes) -> None:
    assert command_reply("config", payload, "33B1225950027") is None


def test_commands_the_meter_cannot_apply_are_answered_02_with_a_reason() -> None:
    op = oprid()
    bad_value = json.dumps({"oprid": op, "Cmd": "0000", "value": "45", "types": "1"}).encode()
    assert command_reply("config", bad_value, "33B1225950027") == {
        "id": "33B1225950027",
        "oprid": op,
        "code": "02",
        "msg": "unsupported Cmd or value",
    }
    bad_time = json.dumps({"oprid": op, "time": "20261312163900"}).encode()
    assert command_reply("time", bad_time, "33B1225950027") == {
        "id": "33B1225950027",
        "oprid": op,
        "code": "02",
        "msg": "invalid time",
    }
    good = json.dumps({"oprid": op, "Cmd": "0001", "value": "5", "types": "1"}).encode()
    assert command_reply("config", good, "33B1225950027", fail=True) == {
        "id": "33B1225950027",
        "oprid": op,
        "code": "02",
        "msg": "simulated failure",
    }


def test_requested_interval_and_time_decode_only_what_a_meter_accepts() -> None:
    def config(cmd: str, value: str) -> bytes:
        return json.dumps({"oprid": oprid(), "Cmd": cmd, "value": value, "types": "1"}).encode()

    assert requested_interval(config("0000", "60")) == ("seconds", 60)
    assert requested_interval(config("0001", "1440")) == ("minutes", 1440)
    assert requested_interval(config("0000", "5")) is None  # minutes value on the seconds command
    assert requested_interval(config("0001", "30.5")) is None
    assert requested_interval(config("0002", "60")) is None
    assert requested_time(json.dumps({"time": "20260112163900"}).encode()) == WHEN
    assert requested_time(json.dumps({"time": "2026011216390"}).encode()) is None


def test_an_unset_clock_reads_the_same_moment_in_2005() -> None:
    assert clock_2005(WHEN) == datetime(2005, 1, 12, 16, 39)
    assert clock_2005(datetime(2024, 2, 29, 12, 0)) == datetime(2005, 2, 28, 12, 0)


# ---------------------------------------------------------------- command line helpers


def test_reply_modes_are_assigned_from_the_end_silent_last() -> None:
    ids = meter_ids(5)
    assert reply_modes_for(ids, silent=1, error=1, delay=2) == {
        "33B1225950027": "prompt",
        "33B1225950028": "delay",
        "33B1225950029": "delay",
        "33B1225950030": "error",
        "33B1225950031": "none",
    }
    with pytest.raises(ValueError):
        reply_modes_for(ids, silent=3, error=2, delay=1)


def test_the_documented_command_line_parses() -> None:
    command_line = (
        "--host 127.0.0.1 --port 11883 --meters 3 --seconds-interval 5 --minutes-interval 10 --silent 1 "
        "--error 0 --delay 0 --clock-2005 1 --packets 1 --spurious --replay FILE --rate 100 --count 4 "
        "--duration 9 --username U --password P --log-level INFO"
    )
    args = build_parser().parse_args(command_line.split(" "))
    assert (args.meters, args.seconds_interval, args.minutes_interval, args.silent, args.clock_2005) == (
        3,
        5.0,
        10.0,
        1,
        1,
    )
    assert (args.spurious, args.replay, args.rate, args.count, args.duration) == (True, Path("FILE"), 100.0, 4, 9.0)
    assert (args.username, args.password, args.log_level) == ("U", "P", "INFO")


# ---------------------------------------------------------------- integration


class Listener:
    """A test client that records every message on the topics it subscribes to.

    It connects with MQTT 5 and a large Receive Maximum so that the broker
    streams bursts to it instead of queueing (and, past 1,000, dropping) them.
    """

    def __init__(self, port: int, topics: list[str], username: str | None = None, password: str | None = None):
        self.messages: list[tuple[str, bytes, float]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda client, *_: client.subscribe([(topic, 1) for topic in topics])
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._record
        properties = Properties(PacketTypes.CONNECT)
        properties.ReceiveMaximum = 65535
        self.client.connect("127.0.0.1", port, properties=properties)
        self.client.loop_start()
        assert self._subscribed.wait(10), "listener did not subscribe"

    def _record(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload, time.monotonic()))

    def on(self, topic: str) -> list[dict[str, Any]]:
        """Decoded payloads received on one topic, in arrival order."""
        with self._lock:
            return [json.loads(payload) for t, payload, _ in self.messages if t == topic]

    def reply_to(self, topic: str, operation: str) -> tuple[dict[str, Any], float] | None:
        """The reply with this oprid on ``topic`` and when it arrived, if any."""
        with self._lock:
            for t, payload, arrived in self.messages:
                if t == topic and json.loads(payload).get("oprid") == operation:
                    return json.loads(payload), arrived
        return None

    def command(self, topic: str, payload: dict[str, Any]) -> float:
        """Publish a command at QoS 1; returns the monotonic time it was sent."""
        sent = time.monotonic()
        self.client.publish(topic, json.dumps(payload), qos=1).wait_for_publish(5)
        return sent

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def listener(internal_broker: Mosquitto) -> Iterator[Listener]:
    """A listener on every topic the meters publish to."""
    client = Listener(
        internal_broker.port,
        ["MQTT_RT_DATA", "MQTT_ENY_NOW", "MQTT_COMMOD_SET_REP", "MQTT_METER_TIME_REP"],
    )
    yield client
    client.close()


def test_first_readings_go_out_at_once_and_then_on_the_cadence(internal_broker: Mosquitto, listener: Listener) -> None:
    ids = meter_ids(3)
    simulated_meters(
        internal_broker.port,
        ids,
        seconds_interval=0.2,
        minutes_interval=0.2,
        seed=1,
        clock={ids[0]: "2005"},
    )
    wait_for(lambda: all(len([r for r in listener.on("MQTT_ENY_NOW") if r["id"] == i]) >= 3 for i in ids))
    rt = listener.on("MQTT_RT_DATA")
    eny = listener.on("MQTT_ENY_NOW")
    assert {r["id"] for r in rt} == set(ids)
    assert all(set(r) == PROTOCOL_RT_TAGS | {"id", "time", "isend"} for r in rt)
    assert all(set(r) == PROTOCOL_ENY_TAGS | {"id", "time", "isend"} for r in eny)
    for meter_id in ids:
        energies = [r["zygsz"] for r in eny if r["id"] == meter_id]
        assert energies == sorted(energies) and len(set(energies)) == len(energies)  # strictly increasing
    years = {r["id"]: r["time"][:4] for r in eny}
    assert years[ids[0]] == "2005"
    assert years[ids[1]] == str(datetime.now().year)


def test_a_command_is_answered_with_its_oprid_and_changes_the_cadence(
    internal_broker: Mosquitto, listener: Listener
) -> None:
    ids = meter_ids(2)
    simulator = simulated_meters(
        internal_broker.port, ids, seconds_interval=100, minutes_interval=100, interval_scale=0.01
    )
    wait_for(lambda: len(listener.on("MQTT_RT_DATA")) == 2)  # the first round
    op = oprid()
    listener.command("MQTT_COMMOD_SET_25950028", {"oprid": op, "Cmd": "0000", "value": "30", "types": "1"})
    reply = wait_for(lambda: listener.reply_to("MQTT_COMMOD_SET_REP", op))
    assert reply[0] == {"id": "33B1225950028", "oprid": op, "code": "01"}
    assert simulator.intervals("33B1225950028") == (0.3, 100)
    # The commanded meter now reports every 0.3 s; the other keeps its 100 s.
    wait_for(lambda: len([r for r in listener.on("MQTT_RT_DATA") if r["id"] == "33B1225950028"]) >= 4)
    assert len([r for r in listener.on("MQTT_RT_DATA") if r["id"] == "33B1225950027"]) == 1
    received = simulator.received_commands
    assert [(c.meter_id, c.topic, c.payload["oprid"]) for c in received] == [
        ("33B1225950028", "MQTT_COMMOD_SET_25950028", op)
    ]


def test_a_silent_meter_and_a_short_oprid_get_no_reply(internal_broker: Mosquitto, listener: Listener) -> None:
    ids = meter_ids(2)
    simulator = simulated_meters(internal_broker.port, ids, reply_mode={ids[1]: "none"}, cadence=False)
    ignored = oprid()
    short = oprid()[:31]
    answered = oprid()
    listener.command("MQTT_COMMOD_SET_25950028", {"oprid": ignored, "Cmd": "0000", "value": "60", "types": "1"})
    listener.command("MQTT_COMMOD_SET_25950027", {"oprid": short, "Cmd": "0000", "value": "60", "types": "1"})
    listener.command("MQTT_COMMOD_SET_25950027", {"oprid": answered, "Cmd": "0000", "value": "60", "types": "1"})
    # The meter handles commands in order and replies share one topic, so
    # once the last reply is in, any reply to the first two would be too.
    wait_for(lambda: listener.reply_to("MQTT_COMMOD_SET_REP", answered))
    assert listener.reply_to("MQTT_COMMOD_SET_REP", ignored) is None
    assert listener.reply_to("MQTT_COMMOD_SET_REP", short) is None
    assert len(listener.on("MQTT_COMMOD_SET_REP")) == 1
    assert [c.meter_id for c in simulator.received_commands] == [ids[1], ids[0], ids[0]]
    assert simulator.intervals(ids[1]) == (60.0, 60.0)  # a silent meter applies nothing either


def test_a_delayed_meter_replies_after_the_delay_and_an_error_meter_with_02(
    internal_broker: Mosquitto, listener: Listener
) -> None:
    ids = meter_ids(2)
    simulator = simulated_meters(
        internal_broker.port,
        ids,
        reply_mode={ids[0]: "delay", ids[1]: "error"},
        reply_delay=0.5,
        minutes_interval=100,
        cadence=False,
    )
    delayed, failed = oprid(), oprid()
    sent = listener.command("MQTT_COMMOD_SET_25950027", {"oprid": delayed, "Cmd": "0001", "value": "5", "types": "1"})
    listener.command("MQTT_COMMOD_SET_25950028", {"oprid": failed, "Cmd": "0001", "value": "5", "types": "1"})
    error_reply, error_arrived = wait_for(lambda: listener.reply_to("MQTT_COMMOD_SET_REP", failed))
    assert error_reply == {"id": ids[1], "oprid": failed, "code": "02", "msg": "simulated failure"}
    reply, arrived = wait_for(lambda: listener.reply_to("MQTT_COMMOD_SET_REP", delayed), timeout=5)
    assert reply == {"id": ids[0], "oprid": delayed, "code": "01"}
    assert arrived - sent >= 0.5
    assert arrived > error_arrived
    assert simulator.intervals(ids[0]) == (60.0, 300.0)  # applied on receipt
    assert simulator.intervals(ids[1]) == (60.0, 100.0)  # a failed command changes nothing


def test_a_settime_command_is_answered_and_sets_an_unset_clock(internal_broker: Mosquitto, listener: Listener) -> None:
    ids = meter_ids(1)
    simulator = simulated_meters(internal_broker.port, ids, clock="2005", cadence=False)
    assert simulator.publish_round() == 2
    wait_for(lambda: len(listener.on("MQTT_ENY_NOW")) == 1)
    assert listener.on("MQTT_ENY_NOW")[0]["time"].startswith("2005")
    op = oprid()
    listener.command("MQTT_SETTIME_25950027", {"oprid": op, "time": datetime.now().strftime("%Y%m%d%H%M%S")})
    reply, _ = wait_for(lambda: listener.reply_to("MQTT_METER_TIME_REP", op))
    assert reply == {"id": ids[0], "oprid": op, "code": "01"}
    simulator.publish_round()
    wait_for(lambda: len(listener.on("MQTT_ENY_NOW")) == 2)
    for reading in (listener.on("MQTT_ENY_NOW")[1], listener.on("MQTT_RT_DATA")[1]):
        meter_clock = datetime.strptime(reading["time"], "%Y%m%d%H%M%S")
        assert abs(meter_clock - datetime.now()) < timedelta(seconds=5)


def test_split_packets_and_spurious_readings_go_out_like_real_meters_send_them(
    internal_broker: Mosquitto, listener: Listener
) -> None:
    ids = meter_ids(2)
    simulator = simulated_meters(
        internal_broker.port, ids, packets=3, spurious=True, clock={ids[1]: "2005"}, cadence=False
    )
    assert simulator.publish_round() == 2 * (3 + 3 * 3)
    wait_for(lambda: len(listener.on("MQTT_ENY_NOW")) == 18 and len(listener.on("MQTT_RT_DATA")) == 6)
    for meter_id in ids:
        packets = [p for p in listener.on("MQTT_ENY_NOW") if p["id"] == meter_id]
        assert [p["isend"] for p in packets] == ["0", "0", "1"] * 3
        real, zero, duplicate = (merge_packets(packets[i : i + 3]) for i in (0, 3, 6))
        assert duplicate == real
        assert real["zygsz"] > 0
        assert {tag: zero[tag] for tag in PROTOCOL_ENY_TAGS} == dict.fromkeys(PROTOCOL_ENY_TAGS, 0.0)
        rt = merge_packets([p for p in listener.on("MQTT_RT_DATA") if p["id"] == meter_id])
        assert set(rt) == PROTOCOL_RT_TAGS | {"id", "time", "isend"}
        this_year = str(datetime.now().year)
        assert zero["time"][:4] == this_year  # zeros carry the real date, as in the capture
        assert real["time"][:4] == ("2005" if meter_id == ids[1] else this_year)


def test_1500_meters_on_one_connection_publish_3000_messages_that_all_arrive(
    internal_broker: Mosquitto, listener: Listener
) -> None:
    ids = meter_ids(1500)
    simulator = simulated_meters(
        internal_broker.port, ids, seconds_interval=600, minutes_interval=600, max_in_flight=500
    )
    wait_for(lambda: len(listener.messages) >= 3000, timeout=20)
    assert simulator.flush(10)
    rt, eny = listener.on("MQTT_RT_DATA"), listener.on("MQTT_ENY_NOW")
    assert sorted(r["id"] for r in rt) == ids
    assert sorted(r["id"] for r in eny) == ids
    assert simulator.published == 3000
    # Every meter's subscriptions made it through the batched SUBSCRIBEs.
    op = oprid()
    listener.command("MQTT_SETTIME_25951526", {"oprid": op, "time": "20260112163900"})
    assert wait_for(lambda: listener.reply_to("MQTT_METER_TIME_REP", op))[0]["id"] == ids[-1]
    assert "dropped" not in internal_broker.log()


def test_replay_publishes_each_capture_line_byte_for_byte(internal_broker: Mosquitto, listener: Listener) -> None:
    capture = FIXTURES / "MQTT_ENY_NOW_2026-01-17.log"
    simulator = simulated_meters(internal_broker.port, [], cadence=False)
    began = time.monotonic()
    assert simulator.replay(capture, rate=100) == 10
    assert time.monotonic() - began >= 0.09  # 10 messages at 100/s
    wait_for(lambda: len(listener.messages) == 10)
    expected = capture_payloads(capture.name)
    assert [payload for _, payload, _ in listener.messages] == expected


def test_connection_per_meter_logs_in_with_the_meter_account() -> None:
    ids = meter_ids(2)
    broker = Mosquitto(anonymous=False)
    # mosquitto started as root drops to its own user: the files it reads
    # must be readable by others, so they live in the broker's own work
    # directory, opened up for the purpose.
    broker.workdir.chmod(0o755)
    passwords = broker.workdir / "passwd"
    acl = broker.workdir / "acl"
    for index, user in enumerate(["25950027", "25950028", "tester"]):
        create = ["-c"] if index == 0 else []
        subprocess.run(["mosquitto_passwd", "-b", *create, str(passwords), user, "s3cret"], check=True)
    acl.write_text(
        "user tester\ntopic readwrite #\n\n"
        "pattern write MQTT_RT_DATA\npattern write MQTT_ENY_NOW\n"
        "pattern write MQTT_COMMOD_SET_REP\npattern write MQTT_METER_TIME_REP\n"
        "pattern read MQTT_COMMOD_SET_%u\npattern read MQTT_SETTIME_%u\n"
    )
    passwords.chmod(0o644)
    acl.chmod(0o644)
    with broker.config_file.open("a") as config:
        config.write(f"password_file {passwords}\nacl_file {acl}\n")
    broker.start()
    listener = None
    try:
        listener = Listener(broker.port, ["MQTT_ENY_NOW", "MQTT_COMMOD_SET_REP"], "tester", "s3cret")
        simulator = simulated_meters(broker.port, ids, password="s3cret", connection_per_meter=True)
        wait_for(lambda: {r["id"] for r in listener.on("MQTT_ENY_NOW")} == set(ids))
        op = oprid()
        listener.command("MQTT_COMMOD_SET_25950028", {"oprid": op, "Cmd": "0000", "value": "60", "types": "1"})
        assert wait_for(lambda: listener.reply_to("MQTT_COMMOD_SET_REP", op))[0]["id"] == ids[1]
        simulator.stop()
    finally:
        if listener is not None:
            listener.close()
        broker.cleanup()


def run_cli(*args: str) -> subprocess.Popen[str]:
    """Start the simulator the way a developer does: the file, from the repository root."""
    return subprocess.Popen(
        [sys.executable, str(SIMULATOR), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_the_command_line_publishes_rounds_and_exits_after_count(
    internal_broker: Mosquitto, listener: Listener
) -> None:
    process = run_cli("--port", str(internal_broker.port), "--meters", "2", "--seconds-interval", "0.2",
                      "--minutes-interval", "0.2", "--count", "3", "--clock-2005", "1", "--silent", "1")  # fmt: skip
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    assert output.count(" round ") >= 3
    wait_for(lambda: len(listener.on("MQTT_ENY_NOW")) >= 6)  # three rounds of two meters
    assert {r["time"][:4] for r in listener.on("MQTT_ENY_NOW") if r["id"] == "33B1225950027"} == {"2005"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_command_line_stops_cleanly_on_a_signal(
    internal_broker: Mosquitto, listener: Listener, signum: int
) -> None:
    process = run_cli("--port", str(internal_broker.port), "--meters", "1", "--seconds-interval", "60")
    try:
        wait_for(lambda: listener.on("MQTT_RT_DATA"))
        process.send_signal(signum)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output
    assert "Traceback" not in output


def test_the_command_line_replays_a_capture_and_exits(internal_broker: Mosquitto, listener: Listener) -> None:
    capture = FIXTURES / "MQTT_ENY_NOW_2026-01-17.log"
    process = run_cli("--port", str(internal_broker.port), "--replay", str(capture))
    output, _ = process.communicate(timeout=15)
    assert process.returncode == 0, output
    wait_for(lambda: len(listener.on("MQTT_ENY_NOW")) == 10)
    assert "replayed 10 message(s)" in output
