"""Unit tests of data_mapping: every mapping rule, rejection reason and filter, with exact outputs."""

from __future__ import annotations

import json
import tracemalloc
from collections import Counter
from dataclasses import replace
from datetime import datetime, timedelta

import orjson
import pytest
from payloads import capture_payloads, minute

from data_mapping import (
    DROP_ALL_ZERO,
    DROP_DUPLICATE,
    DROP_ENERGY_DECREASE,
    DROP_EXCLUDED,
    DROP_IMPLAUSIBLE_RISE,
    DROP_PART_EXPIRED,
    DROP_PART_OVERFLOW,
    EVENT_IMPLAUSIBLE,
    EVENT_RESET,
    MAX_PAYLOAD_BYTES,
    PER_PHASE_GROUPS,
    REJECT_BAD_ISEND,
    REJECT_BAD_METER_ID,
    REJECT_BAD_TIME,
    REJECT_BAD_VALUE,
    REJECT_NOT_JSON,
    REJECT_NOT_OBJECT,
    REJECT_NOT_UTF8,
    REJECT_OVERSIZED,
    REJECTIONS,
    CleanMessage,
    ExportFloor,
    GuardEvent,
    MeterDataProcessor,
    MeterMemory,
    Outcome,
    Packet,
    PacketAssembler,
    Rejected,
    Settled,
    clean_payload,
    encode_payload,
    guard_export,
    is_all_zero,
    iso_time,
    parse_packet,
    plausible_rise,
)
from topics import MINUTES, SECONDS, is_valid_meter_id, reading_topic

METER = "33B1225950027"
OTHER_METER = "33B1225950028"
THIRD_METER = "33B1225950029"
T1 = "20260112170000"
T2 = "20260112171500"
T3 = "20260112173000"
T4 = "20260112174500"


def raw(meter_id: object = METER, time: object = T1, isend: object = "1", **values: object) -> bytes:
    """A raw meter payload as the meter sends it (compact JSON)."""
    document: dict[str, object] = {"id": meter_id, **values, "time": time, "isend": isend}
    return json.dumps(document, separators=(",", ":")).encode()


def energy_reading(value: float, time: str = T1, meter_id: str = METER, isend: str = "1") -> bytes:
    """An ENY_NOW payload carrying one import energy value beside a non-zero reactive register."""
    return raw(meter_id, time, isend, zygsz=value, zwgsz=0.011)


def energy_message(value: float | None, time: str = T1, meter_id: str = METER) -> Outcome:
    """The outcome of a forwarded ENY_NOW reading."""
    payload = {"id": meter_id, "time": iso_time(time), "active_energy": value}
    return Outcome(message=CleanMessage(meter_id, MINUTES, time, payload), meter_id=meter_id)


def power_message(value: float | None, time: str = T1, meter_id: str = METER) -> Outcome:
    """The outcome of a forwarded RT_DATA reading."""
    payload = {"id": meter_id, "time": iso_time(time), "active_power": value}
    return Outcome(message=CleanMessage(meter_id, SECONDS, time, payload), meter_id=meter_id)


def dropped(reason: str, meter_id: str = METER) -> Outcome:
    """The outcome of a valid packet dropped by a filter."""
    return Outcome(meter_id=meter_id, reason=reason)


HELD = Outcome(meter_id=METER)  # a part of a split reading, held until its last part
HELD_ENERGY = Outcome(meter_id=METER, held=True)  # an energy reading the guard holds back


# --- mapping -------------------------------------------------------------------


def test_rt_data_capture_maps_to_id_iso_time_and_active_power_only() -> None:
    (payload,) = capture_payloads("MQTT_RT_DATA_2026-01-12.log")
    processor = MeterDataProcessor()

    outcome = processor.process(SECONDS, payload, 0.0)

    assert outcome == Outcome(
        message=CleanMessage(
            METER, SECONDS, "20260112163900",
            {"id": "33B1225950027", "time": "2026-01-12T16:39:00", "active_power": 6.6905},
        ),
        meter_id=METER,
    )
    assert outcome.message is not None
    assert reading_topic("kpm33b", outcome.message.meter_id, outcome.message.kind) == "kpm33b/33B1225950027/seconds"
    assert encode_payload(outcome.message.payload) == (
        b'{"id": "33B1225950027", "time": "2026-01-12T16:39:00", "active_power": 6.6905}'
    )
    assert processor.drops == Counter()


def test_eny_now_capture_maps_to_active_energy() -> None:
    payload = capture_payloads("MQTT_ENY_NOW_2026-01-17.log")[2]
    processor = MeterDataProcessor()

    outcome = processor.process(MINUTES, payload, 0.0)

    assert outcome == Outcome(
        message=CleanMessage(
            METER, MINUTES, "20260117211500",
            {"id": "33B1225950027", "time": "2026-01-17T21:15:00", "active_energy": 163.486},
        ),
        meter_id=METER,
    )
    assert outcome.message is not None
    assert encode_payload(outcome.message.payload) == (
        b'{"id": "33B1225950027", "time": "2026-01-17T21:15:00", "active_energy": 163.486}'
    )


def test_missing_power_tag_becomes_none_not_zero() -> None:
    processor = MeterDataProcessor()

    outcome = processor.process(SECONDS, raw(ua=229.097, ia=9.735), 0.0)

    assert outcome == power_message(None)


def test_missing_energy_tag_becomes_none_not_zero() -> None:
    processor = MeterDataProcessor()

    outcome = processor.process(MINUTES, raw(fygsz=1.5), 0.0)

    assert outcome == energy_message(None)


def test_energy_tag_in_seconds_data_is_not_taken_for_power() -> None:
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, raw(zygsz=56.331), 0.0) == power_message(None)


def test_integer_value_is_kept_as_integer() -> None:
    processor = MeterDataProcessor()

    assert processor.process(MINUTES, raw(zygsz=163), 0.0) == energy_message(163)


def test_negative_power_is_forwarded_as_sent() -> None:
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, raw(zyggl=-0.493), 0.0) == power_message(-0.493)


def test_missing_isend_means_a_complete_reading() -> None:
    document = {"id": METER, "time": T1, "zyggl": 1.25}
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, json.dumps(document).encode(), 0.0) == power_message(1.25)


def test_pretty_printed_payload_is_accepted() -> None:
    document = {"id": METER, "time": T1, "isend": "1", "zyggl": 1.25}
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, json.dumps(document, indent=4).encode(), 0.0) == power_message(1.25)


@pytest.mark.parametrize(
    ("meter_time", "iso"),
    [
        ("20260112163900", "2026-01-12T16:39:00"),
        ("20050113170000", "2005-01-13T17:00:00"),
        ("20241231235959", "2024-12-31T23:59:59"),
        ("20240229000000", "2024-02-29T00:00:00"),
    ],
)
def test_meter_time_becomes_iso_8601_without_zone(meter_time: str, iso: str) -> None:
    assert iso_time(meter_time) == iso


def test_clean_payload_has_id_iso_time_and_the_one_value() -> None:
    values = {"zyggl": 6.6905, "zygsz": 56.331, "ua": 229.097}

    assert clean_payload(SECONDS, METER, T1, values) == {
        "id": METER, "time": "2026-01-12T17:00:00", "active_power": 6.6905,
    }
    assert clean_payload(MINUTES, METER, T1, values) == {
        "id": METER, "time": "2026-01-12T17:00:00", "active_energy": 56.331,
    }
    assert clean_payload(MINUTES, METER, T1, {"ua": 1.0}) == {
        "id": METER, "time": "2026-01-12T17:00:00", "active_energy": None,
    }


def test_per_phase_groups_add_their_fields_to_the_seconds_payload() -> None:
    (payload,) = capture_payloads("MQTT_RT_DATA_2026-01-12.log")
    processor = MeterDataProcessor(per_phase={METER: ("voltage", "power_factor")})

    outcome = processor.process(SECONDS, payload, 0.0)

    assert outcome.message is not None
    assert outcome.message.payload == {
        "id": "33B1225950027", "time": "2026-01-12T16:39:00", "active_power": 6.6905,
        "voltage_l1": 229.097, "voltage_l2": 231.567, "voltage_l3": 232.529,
        "power_factor_l1": 0.996, "power_factor_l2": 0.996, "power_factor_l3": 0.996, "power_factor": 0.996,
    }


def test_all_per_phase_groups_map_their_tags() -> None:
    (payload,) = capture_payloads("MQTT_RT_DATA_2026-01-12.log")
    processor = MeterDataProcessor(per_phase={METER: PER_PHASE_GROUPS})

    outcome = processor.process(SECONDS, payload, 0.0)

    assert PER_PHASE_GROUPS == ("voltage", "current", "power", "power_factor")
    assert outcome.message is not None
    assert outcome.message.payload == {
        "id": "33B1225950027", "time": "2026-01-12T16:39:00", "active_power": 6.6905,
        "voltage_l1": 229.097, "voltage_l2": 231.567, "voltage_l3": 232.529,
        "current_l1": 9.735, "current_l2": 9.658, "current_l3": 9.655,
        "active_power_l1": 2.2229, "active_power_l2": 2.2293, "active_power_l3": 2.2382,
        "power_factor_l1": 0.996, "power_factor_l2": 0.996, "power_factor_l3": 0.996, "power_factor": 0.996,
    }


def test_per_phase_fields_are_only_for_the_meters_that_ask() -> None:
    processor = MeterDataProcessor(per_phase={OTHER_METER: ("current",)})

    outcomes = [
        processor.process(SECONDS, raw(meter_id=METER, zyggl=6.6905, ia=9.735), 0.0),
        processor.process(SECONDS, raw(meter_id=OTHER_METER, zyggl=1.5, ia=2.5, ib=2.0), 1.0),
    ]

    assert outcomes[0] == power_message(6.6905)
    assert outcomes[1].message is not None
    assert outcomes[1].message.payload == {
        "id": OTHER_METER, "time": "2026-01-12T17:00:00", "active_power": 1.5,
        "current_l1": 2.5, "current_l2": 2.0, "current_l3": None,
    }


def test_per_phase_groups_do_not_change_the_minutes_payload() -> None:
    processor = MeterDataProcessor(per_phase={METER: PER_PHASE_GROUPS})

    assert processor.process(MINUTES, raw(zygsz=56.331, ua=229.0), 0.0) == energy_message(56.331)


def export_payloads(processor: MeterDataProcessor, readings: list[tuple[float, float]],
                    meter_id: str = METER) -> list[dict[str, object] | None]:
    """The MINUTES payloads forwarded for (import, export) readings, one minute apart (None: not forwarded)."""
    start = datetime(2026, 1, 12, 17, 0)
    payloads = []
    for n, (energy, export) in enumerate(readings):
        meter_time = (start + timedelta(minutes=n)).strftime("%Y%m%d%H%M%S")
        outcome = processor.process(MINUTES, raw(meter_id=meter_id, time=meter_time, zygsz=energy, fygsz=export),
                                    float(n))
        payloads.append(outcome.message.payload if outcome.message is not None else None)
    return payloads


def test_export_energy_adds_active_energy_export_to_the_minutes_payload_key_by_key() -> None:
    processor = MeterDataProcessor(export_energy=True)

    outcome = processor.process(MINUTES, raw(zygsz=56.331, fygsz=12.5, zwgsz=0.011), 0.0)

    assert outcome.message is not None
    assert outcome.message.payload == {
        "id": METER, "time": "2026-01-12T17:00:00", "active_energy": 56.331, "active_energy_export": 12.5,
    }
    assert clean_payload(MINUTES, METER, T1, {"zygsz": 1.0}, export=True) == {
        "id": METER, "time": "2026-01-12T17:00:00", "active_energy": 1.0, "active_energy_export": None,
    }
    assert clean_payload(SECONDS, METER, T1, {"zyggl": 1.0, "fygsz": 2.0}, export=True) == {
        "id": METER, "time": "2026-01-12T17:00:00", "active_power": 1.0,
    }


def test_export_energy_is_only_for_the_meters_that_ask_and_the_others_keep_their_payload() -> None:
    processor = MeterDataProcessor(export_energy=False, export_by_meter={OTHER_METER: True})

    assert processor.process(MINUTES, raw(zygsz=56.331, fygsz=12.5), 0.0) == energy_message(56.331)
    assert export_payloads(processor, [(1.0, 2.0)], OTHER_METER) == [
        {"id": OTHER_METER, "time": "2026-01-12T17:00:00", "active_energy": 1.0, "active_energy_export": 2.0}]
    processor = MeterDataProcessor(export_energy=True, export_by_meter={METER: False})
    assert processor.process(MINUTES, raw(zygsz=56.331, fygsz=12.5), 0.0) == energy_message(56.331)


def test_exported_energy_never_steps_back_and_a_lower_value_is_published_as_null() -> None:
    processor = MeterDataProcessor(export_energy=True)

    payloads = export_payloads(processor, [(10.0, 5.0), (10.1, 5.2), (10.2, 0.0), (10.3, 5.1), (10.4, 5.3)])

    assert [p["active_energy_export"] for p in payloads if p is not None] == [5.0, 5.2, None, None, 5.3]
    assert [p["active_energy"] for p in payloads if p is not None] == [10.0, 10.1, 10.2, 10.3, 10.4]


def test_an_all_zero_reading_with_export_is_dropped_whole() -> None:
    processor = MeterDataProcessor(export_energy=True)

    assert processor.process(MINUTES, raw(zygsz=0.0, fygsz=0.0), 0.0) == dropped(DROP_ALL_ZERO)


def test_a_non_numeric_exported_energy_rejects_the_packet_only_for_meters_that_export() -> None:
    exporting = MeterDataProcessor(export_energy=True)
    other = MeterDataProcessor()
    packet = b'{"id":"33B1225950027","zygsz":1.0,"fygsz":"n/a","time":"20260112170000","isend":"1"}'

    assert exporting.process(MINUTES, packet, 0.0).reason == REJECT_BAD_VALUE
    assert other.process(MINUTES, packet, 0.0) == energy_message(1.0)


@pytest.mark.parametrize(("floor", "value", "expected"), [
    (None, 3.0, (3.0, ExportFloor(3.0))),
    (None, None, (None, None)),
    (ExportFloor(3.0), None, (None, ExportFloor(3.0))),
    (ExportFloor(3.0), -1.0, (None, ExportFloor(3.0))),
    (ExportFloor(3.0), 3.0, (3.0, ExportFloor(3.0))),
    (ExportFloor(3.0), 4.0, (4.0, ExportFloor(4.0))),
    (ExportFloor(3.0), 0.5, (None, ExportFloor(3.0, 0.5, 1))),
    (ExportFloor(3.0, 0.5, 1), 0.6, (None, ExportFloor(3.0, 0.6, 2))),
    (ExportFloor(3.0, 0.6, 2), 0.5, (None, ExportFloor(3.0, 0.5, 1))),  # fell again: not a steady new count
    (ExportFloor(3.0, 0.6, 2), 0.7, (0.7, ExportFloor(0.7))),  # the third in a row: a counter reset
    (ExportFloor(3.0, 0.6, 2), 3.5, (3.5, ExportFloor(3.5))),  # the old count goes on: the low ones were glitches
])
def test_guard_export_rules(floor: ExportFloor | None, value: float | None,
                            expected: tuple[float | None, ExportFloor | None]) -> None:
    assert guard_export(floor, value) == expected


def test_an_exported_energy_counter_reset_is_published_after_three_steady_readings() -> None:
    processor = MeterDataProcessor(export_energy=True)

    payloads = export_payloads(processor, [(10.0, 5.0), (10.1, 0.1), (10.2, 0.2), (10.3, 0.3), (10.4, 0.4)])

    assert [p["active_energy_export"] for p in payloads if p is not None] == [5.0, None, None, 0.3, 0.4]


def test_parse_packet_returns_every_value_tag_without_the_envelope() -> None:
    packet = parse_packet(raw(isend="0", zygsz=31.057, fygsz=0.0))

    assert packet == Packet(meter_id=METER, time=T1, is_last=False, values={"zygsz": 31.057, "fygsz": 0.0})


@pytest.mark.parametrize(
    ("main_topic", "kind", "topic"),
    [
        ("kpm33b", SECONDS, "kpm33b/33B1225950027/seconds"),
        ("kpm33b", MINUTES, "kpm33b/33B1225950027/minutes"),
        ("home/energy", MINUTES, "home/energy/33B1225950027/minutes"),
    ],
)
def test_clean_topic_is_main_topic_meter_id_and_kind(main_topic: str, kind: str, topic: str) -> None:
    assert reading_topic(main_topic, METER, kind) == topic


@pytest.mark.parametrize(
    ("payload", "encoded"),
    [
        ({"id": METER, "time": "2026-01-12T16:39:00", "active_power": 6.6905},
         b'{"id": "33B1225950027", "time": "2026-01-12T16:39:00", "active_power": 6.6905}'),
        ({"id": METER, "time": "2026-01-17T21:15:00", "active_energy": 163.486},
         b'{"id": "33B1225950027", "time": "2026-01-17T21:15:00", "active_energy": 163.486}'),
        ({"id": METER, "time": "2026-01-12T17:00:00", "active_energy": 31.057},
         b'{"id": "33B1225950027", "time": "2026-01-12T17:00:00", "active_energy": 31.057}'),
        ({"id": METER, "time": "2026-01-12T17:00:00", "active_energy": None},
         b'{"id": "33B1225950027", "time": "2026-01-12T17:00:00", "active_energy": null}'),
    ],
)
def test_encode_payload_keeps_the_meters_precision(payload: dict[str, object], encoded: bytes) -> None:
    assert encode_payload(payload) == encoded
    assert json.loads(encoded) == payload


def test_meter_text_round_trips_through_the_processor_unchanged() -> None:
    processor = MeterDataProcessor()

    payload = b'{"id":"33B1225950027","zyggl":6.6905,"time":"20260112163900","isend":"1"}'
    outcome = processor.process(SECONDS, payload, 0.0)

    assert outcome.message is not None
    assert b'"active_power": 6.6905}' in encode_payload(outcome.message.payload)


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("33B1225950027", True),
        ("abcdefghijklm", True),
        ("33B122595002", False),
        ("33B12259500270", False),
        ("33B12259500/7", False),
        ("33B122595002+", False),
        ("33B122595002#", False),
        ("33B1225950027\n", False),
        ("33B12259500é7", False),
        ("", False),
        (3312259500270, False),
        (None, False),
    ],
)
def test_is_valid_meter_id(value: object, valid: bool) -> None:
    assert is_valid_meter_id(value) is valid


@pytest.mark.parametrize(
    ("values", "all_zero"),
    [
        ({}, True),
        ({"zygsz": 0.0, "fygsz": 0.0}, True),
        ({"zygsz": 0, "fygsz": -0.0}, True),
        ({"zygsz": 0.0, "zwgsz": 0.011}, False),
        ({"zygsz": 31.057}, False),
        ({"zyggl": -0.5}, False),
    ],
)
def test_is_all_zero(values: dict[str, float], all_zero: bool) -> None:
    assert is_all_zero(values) is all_zero


# --- rejections ------------------------------------------------------------------


def assert_rejected(payload: bytes, reason: str, detail: str | None = None) -> None:
    """The payload is rejected with ``reason`` (and ``detail`` when given), counted once, nothing held."""
    processor = MeterDataProcessor()

    outcome = processor.process(SECONDS, payload, 0.0)

    if detail is None:
        assert (outcome.message, outcome.meter_id, outcome.reason) == (None, None, reason)
    else:
        assert outcome == Outcome(reason=reason, detail=detail)
    assert processor.drops == Counter({reason: 1})
    assert len(processor.assembler) == 0
    assert len(processor.memory) == 0
    with pytest.raises(Rejected) as rejected:
        parse_packet(payload)
    assert rejected.value.reason == reason


def test_rejection_reasons_are_all_listed() -> None:
    assert set(REJECTIONS) == {
        REJECT_OVERSIZED, REJECT_NOT_UTF8, REJECT_NOT_JSON, REJECT_NOT_OBJECT, REJECT_BAD_METER_ID,
        REJECT_BAD_TIME, REJECT_BAD_ISEND, REJECT_BAD_VALUE,
    }


def test_payload_over_16_kb_is_rejected_as_oversized() -> None:
    payload = raw(zyggl=1.0)
    oversized = payload[:-1] + b" " * (MAX_PAYLOAD_BYTES + 1 - len(payload)) + b"}"
    assert len(oversized) == 16 * 1024 + 1

    assert_rejected(oversized, REJECT_OVERSIZED, "16385 bytes, more than 16384")


def test_payload_of_exactly_16_kb_is_accepted() -> None:
    payload = raw(zyggl=1.0)
    padded = payload[:-1] + b" " * (MAX_PAYLOAD_BYTES - len(payload)) + b"}"
    assert len(padded) == 16 * 1024
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, padded, 0.0) == power_message(1.0)


def test_non_utf8_payload_is_rejected() -> None:
    assert_rejected(b'{"id":"33B1225950027","zyggl":\xff}', REJECT_NOT_UTF8, "payload is not UTF-8")


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"", "not JSON: ''"),
        (b"hello", "not JSON: 'hello'"),
        (b'{"id":"33B1225950027","time":"20260112170000"',
         """not JSON: '{"id":"33B1225950027","time":"20260112170000"'"""),
        (b"{'id': '33B1225950027'}", """not JSON: "{'id': '33B1225950027'}\""""),
    ],
)
def test_payload_that_is_not_json_is_rejected(payload: bytes, detail: str) -> None:
    assert_rejected(payload, REJECT_NOT_JSON, detail)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_json_literals_are_rejected_as_not_json(literal: str) -> None:
    payload = f'{{"id":"33B1225950027","zyggl":{literal},"time":"20260112170000","isend":"1"}}'.encode()

    assert_rejected(payload, REJECT_NOT_JSON, f"not JSON: {payload.decode()[:60]!r}")


def test_deeply_nested_json_is_rejected_as_not_json_without_recursion_error() -> None:
    assert_rejected(b"[" * 5000 + b"]" * 5000, REJECT_NOT_JSON, "not JSON: " + repr("[" * 60))


def test_deeply_nested_value_inside_a_reading_is_rejected_as_not_json() -> None:
    payload = b'{"id":"33B1225950027","time":"20260112170000","x":' + b"[" * 3000 + b"]" * 3000 + b"}"

    assert_rejected(payload, REJECT_NOT_JSON)


@pytest.mark.parametrize(
    ("payload", "detail"),
    [
        (b"[1, 2]", "JSON list, not an object"),
        (b'"33B1225950027"', "JSON str, not an object"),
        (b"6.6905", "JSON float, not an object"),
        (b"null", "JSON NoneType, not an object"),
    ],
)
def test_json_that_is_not_an_object_is_rejected(payload: bytes, detail: str) -> None:
    assert_rejected(payload, REJECT_NOT_OBJECT, detail)


@pytest.mark.parametrize(
    ("meter_id", "shown"),
    [
        ("33B12259500/7", "'33B12259500/7'"),
        ("33B122595002+", "'33B122595002+'"),
        ("33B122595002#", "'33B122595002#'"),
        ("33B122595002", "'33B122595002'"),
        ("33B12259500270", "'33B12259500270'"),
        ("33B1225950027 ", "'33B1225950027 '"),
        ("", "''"),
        (3312259500270, "'3312259500270'"),
        (None, "'None'"),
        (["33B1225950027"], "\"['33B1225950027']\""),
    ],
)
def test_invalid_meter_id_is_rejected(meter_id: object, shown: str) -> None:
    assert_rejected(raw(meter_id=meter_id, zyggl=1.0), REJECT_BAD_METER_ID,
                    f"id {shown} is not 13 letters and digits")


def test_missing_meter_id_is_rejected() -> None:
    payload = b'{"zyggl":1.0,"time":"20260112170000","isend":"1"}'

    assert_rejected(payload, REJECT_BAD_METER_ID, "id 'None' is not 13 letters and digits")


@pytest.mark.parametrize(
    ("meter_time", "detail"),
    [
        ("20261399000000", "meter 33B1225950027: time '20261399000000' is not a date"),
        ("20260230120000", "meter 33B1225950027: time '20260230120000' is not a date"),
        ("20250229000000", "meter 33B1225950027: time '20250229000000' is not a date"),
        ("20260112246000", "meter 33B1225950027: time '20260112246000' is not a date"),
        ("20260112163960", "meter 33B1225950027: time '20260112163960' is not a date"),
        ("00000101000000", "meter 33B1225950027: time '00000101000000' is not a date"),
        ("2026011216390", "meter 33B1225950027: time '2026011216390' is not YYYYMMDDhhmmss"),
        ("202601121639000", "meter 33B1225950027: time '202601121639000' is not YYYYMMDDhhmmss"),
        ("2026-01-12T16:39", "meter 33B1225950027: time '2026-01-12T16:39' is not YYYYMMDDhhmmss"),
        ("２０２６０１１２１６３９００",
         "meter 33B1225950027: time '２０２６０１１２１６３９００' is not YYYYMMDDhhmmss"),
        (20260112163900, "meter 33B1225950027: time '20260112163900' is not YYYYMMDDhhmmss"),
        (None, "meter 33B1225950027: time 'None' is not YYYYMMDDhhmmss"),
    ],
)
def test_invalid_meter_time_is_rejected(meter_time: object, detail: str) -> None:
    assert_rejected(raw(time=meter_time, zyggl=1.0), REJECT_BAD_TIME, detail)


@pytest.mark.parametrize(
    ("isend", "shown"),
    [("2", "'2'"), (1, "'1'"), (True, "'True'"), (None, "'None'"), ("", "''"), ("true", "'true'")],
)
def test_isend_other_than_0_or_1_is_rejected(isend: object, shown: str) -> None:
    assert_rejected(raw(isend=isend, zyggl=1.0), REJECT_BAD_ISEND,
                    f'meter 33B1225950027: isend {shown} is not "0" or "1"')


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (True, "'True'"),
        (False, "'False'"),
        ("6.6905", "'6.6905'"),
        (None, "'None'"),
        ([6.6905], "'[6.6905]'"),
        ({"value": 6.6905}, "\"{'value': 6.6905}\""),
    ],
)
def test_value_that_is_not_a_number_is_rejected(value: object, shown: str) -> None:
    assert_rejected(raw(zyggl=value), REJECT_BAD_VALUE,
                    f"meter 33B1225950027: 'zyggl' is {shown}, not a finite number")


def test_value_beyond_float_range_is_rejected_as_bad_value() -> None:
    payload = b'{"id":"33B1225950027","zyggl":1e400,"time":"20260112170000","isend":"1"}'

    assert_rejected(payload, REJECT_BAD_VALUE, "meter 33B1225950027: 'zyggl' is 'inf', not a finite number")


def test_integer_too_large_for_a_float_is_rejected_as_bad_value() -> None:
    # 400 digits: valid JSON, well under 16 KB, but no float can hold it.
    payload = b'{"id":"33B1225950027","zyggl":1' + b"0" * 400 + b',"time":"20260112170000","isend":"1"}'

    assert_rejected(payload, REJECT_BAD_VALUE)


def test_bad_value_in_a_mapped_tag_rejects_the_whole_packet() -> None:
    assert_rejected(raw(zyggl=6.6905, zygsz="56.331"), REJECT_BAD_VALUE,
                    "meter 33B1225950027: 'zygsz' is '56.331', not a finite number")


def test_bad_value_in_a_per_phase_tag_the_meter_maps_rejects_the_packet() -> None:
    processor = MeterDataProcessor(per_phase={METER: ("voltage",)})

    outcome = processor.process(SECONDS, raw(zyggl=6.6905, ua="229.1"), 0.0)

    assert outcome == Outcome(reason=REJECT_BAD_VALUE,
                              detail="meter 33B1225950027: 'ua' is '229.1', not a finite number")


def test_bad_value_in_a_per_phase_tag_the_meter_does_not_map_is_ignored() -> None:
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, raw(zyggl=6.6905, ua="229.1"), 0.0) == power_message(6.6905)


@pytest.mark.parametrize("extra", ["V1.9", None, True, [1, 2], {"a": 1}])
def test_extra_tag_the_mapping_does_not_use_is_ignored(extra: object) -> None:
    # Other models of the family send e.g. a firmware version beside the measurements.
    processor = MeterDataProcessor(per_phase={METER: ("voltage",)})

    outcomes = [
        processor.process(SECONDS, raw(time=T1, zyggl=6.6905, ua=229.1, ver=extra), 0.0),
        processor.process(MINUTES, raw(time=T1, zygsz=56.331, ver=extra), 1.0),
    ]

    assert outcomes[0].message is not None
    assert outcomes[0].message.payload["voltage_l1"] == 229.1
    assert "ver" not in outcomes[0].message.payload
    assert outcomes[1] == energy_message(56.331)


@pytest.mark.parametrize("extra", [b"1e400", b"1" + b"0" * 400, b'"\\ud800"'],
                         ids=["beyond-float-range", "400-digit-integer", "lone-surrogate"])
def test_a_tag_the_fast_json_parser_refuses_does_not_cost_the_reading(extra: bytes) -> None:
    # orjson refuses these payloads outright; the standard library reads them, and the
    # tag is then left out like any other the mapping does not use.
    payload = raw(zyggl=6.6905).replace(b'"time"', b'"ver":' + extra + b',"time"')
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(payload)

    assert MeterDataProcessor().process(SECONDS, payload, 0.0) == power_message(6.6905)


def test_extra_non_numeric_tag_does_not_hide_an_all_zero_reading() -> None:
    processor = MeterDataProcessor()

    assert processor.process(MINUTES, raw(zygsz=0.0, zwgsz=0.0, ver="V1.9"), 0.0) == dropped(DROP_ALL_ZERO)


# --- split packets -----------------------------------------------------------------


def test_three_part_reading_is_merged_when_its_last_part_arrives() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, raw(isend="0", zygsz=31.057, fygsz=0.0), 0.0),
        processor.process(MINUTES, raw(isend="0", zwgsz=0.011, fwgsz=0.0), 1.0),
        processor.process(MINUTES, raw(isend="1", zszsz=31.057), 2.0),
    ]

    assert outcomes == [HELD, HELD, energy_message(31.057)]
    assert len(processor.assembler) == 0
    assert processor.drops == Counter()


def test_assembler_returns_the_union_of_all_parts() -> None:
    assembler = PacketAssembler()

    results = [
        assembler.add(MINUTES, parse_packet(raw(isend="0", zygsz=31.057)), 0.0),
        assembler.add(MINUTES, parse_packet(raw(isend="0", fygsz=1.5)), 0.5),
        assembler.add(MINUTES, parse_packet(raw(isend="1", zwgsz=0.011)), 1.0),
    ]

    assert results == [(None, []), (None, []), ({"zygsz": 31.057, "fygsz": 1.5, "zwgsz": 0.011}, [])]


def test_non_last_parts_out_of_order_are_merged() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, raw(isend="0", zwgsz=0.011), 0.0),
        processor.process(MINUTES, raw(isend="0", zygsz=31.057), 1.0),
        processor.process(MINUTES, raw(isend="1", zszsz=31.057), 2.0),
    ]

    assert outcomes == [HELD, HELD, energy_message(31.057)]


def test_single_packet_reading_passes_straight_through_the_assembler() -> None:
    assembler = PacketAssembler()

    assert assembler.add(SECONDS, parse_packet(raw(zyggl=6.6905)), 0.0) == ({"zyggl": 6.6905}, [])
    assert len(assembler) == 0


def test_parts_with_different_times_are_kept_apart() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, raw(time=T1, isend="0", zygsz=31.057), 0.0),
        processor.process(MINUTES, raw(time=T2, isend="0", zygsz=31.2), 1.0),
        processor.process(MINUTES, raw(time=T2, isend="1", zwgsz=0.011), 2.0),
    ]

    assert outcomes == [HELD, HELD, energy_message(31.2, T2)]
    assert len(processor.assembler) == 1


def test_parts_of_seconds_and_minutes_data_are_kept_apart() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(SECONDS, raw(isend="0", zyggl=6.6905), 0.0),
        processor.process(MINUTES, raw(isend="0", zygsz=31.057), 1.0),
        processor.process(SECONDS, raw(isend="1", ua=229.097), 2.0),
        processor.process(MINUTES, raw(isend="1", zwgsz=0.011), 3.0),
    ]

    assert outcomes == [HELD, HELD, power_message(6.6905), energy_message(31.057)]


def test_parts_of_different_meters_are_kept_apart() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, raw(meter_id=METER, isend="0", zygsz=31.057), 0.0),
        processor.process(MINUTES, raw(meter_id=OTHER_METER, isend="0", zygsz=56.331), 1.0),
        processor.process(MINUTES, raw(meter_id=OTHER_METER, isend="1", zwgsz=0.011), 2.0),
    ]

    assert outcomes == [HELD, Outcome(meter_id=OTHER_METER), energy_message(56.331, meter_id=OTHER_METER)]


def test_pending_parts_overflow_drops_the_oldest_reading() -> None:
    processor = MeterDataProcessor(assembler=PacketAssembler(max_pending=2))

    held = [
        processor.process(MINUTES, raw(time=T1, isend="0", zygsz=1.0), 0.0),
        processor.process(MINUTES, raw(time=T2, isend="0", zygsz=2.0), 1.0),
        processor.process(MINUTES, raw(time=T3, isend="0", zygsz=3.0), 2.0),
    ]

    assert held == [HELD, HELD, HELD]
    assert len(processor.assembler) == 2
    assert processor.drops == Counter({DROP_PART_OVERFLOW: 1})
    # The oldest reading's part is gone: its last part stands alone (no energy tag).
    assert processor.process(MINUTES, raw(time=T1, isend="1", zwgsz=0.011), 3.0) == energy_message(None, T1)
    assert processor.process(MINUTES, raw(time=T2, isend="1", zwgsz=0.011), 4.0) == energy_message(2.0, T2)
    assert processor.process(MINUTES, raw(time=T3, isend="1", zwgsz=0.011), 5.0) == energy_message(3.0, T3)


def test_assembler_overflow_reports_the_drop() -> None:
    assembler = PacketAssembler(max_pending=1)

    first = assembler.add(MINUTES, parse_packet(raw(time=T1, isend="0", zygsz=1.0)), 0.0)
    second = assembler.add(MINUTES, parse_packet(raw(time=T2, isend="0", zygsz=2.0)), 0.0)

    assert (first, second) == ((None, []), (None, [DROP_PART_OVERFLOW]))
    assert len(assembler) == 1


def test_more_parts_of_a_held_reading_do_not_count_against_the_bound() -> None:
    assembler = PacketAssembler(max_pending=1)

    results = [assembler.add(MINUTES, parse_packet(raw(isend="0", **{tag: 1.0})), 0.0)
               for tag in ("zygsz", "fygsz", "zwgsz")]

    assert results == [(None, []), (None, []), (None, [])]
    assert len(assembler) == 1


def test_unfinished_reading_expires_after_max_age() -> None:
    processor = MeterDataProcessor(assembler=PacketAssembler(max_age=120.0))

    outcomes = [
        processor.process(MINUTES, raw(time=T1, isend="0", zygsz=31.057), 0.0),
        processor.process(MINUTES, raw(time=T2, isend="0", zygsz=31.1), 120.0),
    ]
    assert outcomes == [HELD, HELD]
    assert processor.drops == Counter()

    late = processor.process(MINUTES, raw(time=T1, isend="1", zwgsz=0.011), 120.5)

    assert late == energy_message(None, T1)
    assert processor.drops == Counter({DROP_PART_EXPIRED: 1})
    assert len(processor.assembler) == 1


def test_expire_forgets_only_readings_older_than_max_age() -> None:
    assembler = PacketAssembler(max_age=120.0)
    assembler.add(MINUTES, parse_packet(raw(time=T1, isend="0", zygsz=1.0)), 0.0)
    assembler.add(MINUTES, parse_packet(raw(time=T2, isend="0", zygsz=2.0)), 10.0)
    assembler.add(MINUTES, parse_packet(raw(time=T3, isend="0", zygsz=3.0)), 20.0)

    assert assembler.expire(120.0) == []
    assert assembler.expire(130.5) == [DROP_PART_EXPIRED, DROP_PART_EXPIRED]
    assert len(assembler) == 1
    assert assembler.expire(1000.0) == [DROP_PART_EXPIRED]
    assert len(assembler) == 0


def test_default_assembler_bounds() -> None:
    assembler = PacketAssembler()

    assert (assembler.max_pending, assembler.max_age) == (10_000, 120.0)


# --- filters ------------------------------------------------------------------------


def test_all_zero_reading_is_dropped() -> None:
    processor = MeterDataProcessor()

    outcome = processor.process(MINUTES, raw(zygsz=0.0, fygsz=0.0, zwgsz=0.0), 0.0)

    assert outcome == dropped(DROP_ALL_ZERO)
    assert processor.drops == Counter({DROP_ALL_ZERO: 1})
    assert len(processor.memory) == 0


def test_reading_without_any_value_is_dropped_as_all_zero() -> None:
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, raw(), 0.0) == dropped(DROP_ALL_ZERO)


def test_zero_reading_before_the_first_real_one_is_dropped_and_the_real_one_forwarded() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, raw(zygsz=0.0, zwgsz=0.0), 0.0),
        processor.process(MINUTES, energy_reading(31.057), 1.0),
    ]

    assert outcomes == [dropped(DROP_ALL_ZERO), energy_message(31.057)]


def test_zero_reading_after_real_one_is_dropped() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(31.057, T1), 0.0),
        processor.process(MINUTES, raw(time=T1, zygsz=0.0, zwgsz=0.0), 1.0),
        processor.process(MINUTES, raw(time=T2, zygsz=0.0, zwgsz=0.0), 2.0),
        processor.process(MINUTES, energy_reading(31.1, T2), 3.0),
    ]

    assert outcomes == [energy_message(31.057, T1), dropped(DROP_ALL_ZERO), dropped(DROP_ALL_ZERO),
                        energy_message(31.1, T2)]
    assert processor.drops == Counter({DROP_ALL_ZERO: 2})


def test_zero_power_with_other_values_is_forwarded() -> None:
    processor = MeterDataProcessor()

    assert processor.process(SECONDS, raw(zyggl=0.0, ua=229.097), 0.0) == power_message(0.0)


def test_all_zero_split_reading_is_dropped_once_complete() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, raw(isend="0", zygsz=0.0), 0.0),
        processor.process(MINUTES, raw(isend="1", fygsz=0.0), 1.0),
    ]

    assert outcomes == [HELD, dropped(DROP_ALL_ZERO)]


def test_exact_repeat_is_dropped_as_duplicate() -> None:
    processor = MeterDataProcessor()

    outcomes = [processor.process(MINUTES, energy_reading(31.057), float(now)) for now in range(3)]

    assert outcomes == [energy_message(31.057), dropped(DROP_DUPLICATE), dropped(DROP_DUPLICATE)]
    assert processor.drops == Counter({DROP_DUPLICATE: 2})


def test_same_time_with_different_values_is_dropped_as_duplicate() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(117.779), 0.0),
        processor.process(MINUTES, energy_reading(117.783), 1.0),
    ]

    assert outcomes == [energy_message(117.779), dropped(DROP_DUPLICATE)]


def test_older_energy_reading_sent_again_is_stopped_by_the_counter_guard() -> None:
    processor = MeterDataProcessor()
    processor.process(MINUTES, energy_reading(1.0, T1), 0.0)
    processor.process(MINUTES, energy_reading(2.0, T2), 1.0)

    assert processor.process(MINUTES, energy_reading(1.0, T1), 2.0) == dropped(DROP_ENERGY_DECREASE)


def test_same_time_of_seconds_and_minutes_data_is_not_a_duplicate() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(SECONDS, raw(zyggl=6.6905), 0.0),
        processor.process(MINUTES, raw(zygsz=56.331), 1.0),
    ]

    assert outcomes == [power_message(6.6905), energy_message(56.331)]


def test_same_time_of_another_meter_is_not_a_duplicate() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(31.057, meter_id=METER), 0.0),
        processor.process(MINUTES, energy_reading(31.057, meter_id=OTHER_METER), 1.0),
    ]

    assert outcomes == [energy_message(31.057), energy_message(31.057, meter_id=OTHER_METER)]


def test_energy_lower_than_last_forwarded_is_held_then_dropped_when_the_count_goes_on() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(56.331, T1), 0.0, token=1),
        processor.process(MINUTES, energy_reading(56.330, T2), 1.0, token=2),
        processor.process(MINUTES, energy_reading(56.4, T3), 2.0, token=3),
    ]

    assert outcomes == [
        energy_message(56.331, T1),
        HELD_ENERGY,
        replace(energy_message(56.4, T3), settled=(Settled(2, reason=DROP_ENERGY_DECREASE),)),
    ]
    assert processor.drops == Counter({DROP_ENERGY_DECREASE: 1})


def test_equal_energy_at_a_new_time_is_forwarded() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(56.331, T1), 0.0),
        processor.process(MINUTES, energy_reading(56.331, T2), 1.0),
    ]

    assert outcomes == [energy_message(56.331, T1), energy_message(56.331, T2)]


def test_held_lower_energy_does_not_lower_the_guard() -> None:
    processor = MeterDataProcessor()
    processor.process(MINUTES, energy_reading(56.331, T1), 0.0)
    processor.process(MINUTES, energy_reading(10.0, T2), 1.0)

    assert processor.memory.last_energy(METER) == 56.331
    assert processor.process(MINUTES, energy_reading(56.4, T3), 2.0).message == energy_message(56.4, T3).message
    assert processor.process(MINUTES, energy_reading(50.0, T4), 3.0) == HELD_ENERGY
    assert processor.memory.last_energy(METER) == 56.4


def test_energy_guard_is_per_meter() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(163.486, meter_id=METER), 0.0),
        processor.process(MINUTES, energy_reading(31.057, meter_id=OTHER_METER), 1.0),
    ]

    assert outcomes == [energy_message(163.486), energy_message(31.057, meter_id=OTHER_METER)]


def test_reading_without_energy_neither_trips_nor_moves_the_guard() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(MINUTES, energy_reading(56.331, T1), 0.0),
        processor.process(MINUTES, raw(time=T2, fygsz=1.0), 1.0),
    ]

    assert outcomes == [energy_message(56.331, T1), energy_message(None, T2)]
    assert processor.memory.last_energy(METER) == 56.331


def test_falling_power_is_forwarded() -> None:
    processor = MeterDataProcessor()

    outcomes = [
        processor.process(SECONDS, raw(time=T1, zyggl=6.6905), 0.0),
        processor.process(SECONDS, raw(time=T2, zyggl=0.5), 1.0),
    ]

    assert outcomes == [power_message(6.6905, T1), power_message(0.5, T2)]


def test_counter_guard_restored_after_restart_still_drops_a_lower_energy() -> None:
    before_restart = MeterDataProcessor()
    before_restart.process(MINUTES, energy_reading(163.486, T1), 0.0)
    snapshot = before_restart.memory.energy_snapshot()
    assert snapshot == {METER: 163.486}

    memory = MeterMemory()
    for meter_id, energy in snapshot.items():
        memory.restore_energy(meter_id, energy)
    after_restart = MeterDataProcessor(memory=memory)

    outcomes = [
        after_restart.process(MINUTES, energy_reading(0.5, T2), 0.0),
        after_restart.process(MINUTES, energy_reading(163.5, T3), 1.0),
    ]

    assert outcomes == [
        HELD_ENERGY, replace(energy_message(163.5, T3), settled=(Settled(None, reason=DROP_ENERGY_DECREASE),)),
    ]
    assert after_restart.memory.energy_snapshot() == {METER: 163.5}


def test_processor_uses_the_memory_it_is_given_even_when_empty() -> None:
    # The proxy's order: an empty memory handed to the processor, then the
    # state file restored into it, and later its snapshot written back.
    memory = MeterMemory()
    processor = MeterDataProcessor(memory=memory)
    memory.restore_energy(METER, 163.486)

    outcome = processor.process(MINUTES, energy_reading(0.5, T2), 0.0)

    assert processor.memory is memory
    assert outcome == HELD_ENERGY


def test_processor_uses_the_assembler_it_is_given_even_when_empty() -> None:
    assembler = PacketAssembler(max_pending=5, max_age=30.0)

    processor = MeterDataProcessor(assembler=assembler)

    assert processor.assembler is assembler


def test_excluded_meter_is_dropped_before_anything_is_remembered() -> None:
    processor = MeterDataProcessor(excluded=[METER])

    outcomes = [
        processor.process(MINUTES, energy_reading(31.057), 0.0),
        processor.process(MINUTES, raw(isend="0", zygsz=31.057), 1.0),
        processor.process(MINUTES, energy_reading(31.057, meter_id=OTHER_METER), 2.0),
    ]

    assert outcomes == [dropped(DROP_EXCLUDED), dropped(DROP_EXCLUDED), energy_message(31.057, meter_id=OTHER_METER)]
    assert processor.drops == Counter({DROP_EXCLUDED: 2})
    assert len(processor.assembler) == 0
    assert processor.memory.energy_snapshot() == {OTHER_METER: 31.057}


def test_drops_are_counted_by_reason() -> None:
    processor = MeterDataProcessor(excluded=[THIRD_METER])

    for now, (kind, payload) in enumerate([
        (MINUTES, energy_reading(31.057, T1)),
        (MINUTES, raw(time=T1, zygsz=0.0)),
        (MINUTES, energy_reading(31.057, T1)),
        (MINUTES, energy_reading(31.0, "20260112160000")),  # older than the floor: sent again
        (MINUTES, energy_reading(31.0, T2, meter_id=THIRD_METER)),
        (SECONDS, b"not json"),
        (SECONDS, raw(meter_id="33B12259500/7")),
        (SECONDS, raw(zyggl=True)),
        (MINUTES, raw(time=T3, zygsz=0.0)),
    ]):
        processor.process(kind, payload, float(now))

    assert processor.drops == Counter({
        DROP_ALL_ZERO: 2, DROP_DUPLICATE: 1, DROP_ENERGY_DECREASE: 1, DROP_EXCLUDED: 1,
        REJECT_NOT_JSON: 1, REJECT_BAD_METER_ID: 1, REJECT_BAD_VALUE: 1,
    })


# --- MeterMemory --------------------------------------------------------------------


def test_memory_remembers_forwarded_times_and_energy() -> None:
    memory = MeterMemory()

    memory.remember(METER, MINUTES, T1, 31.057)

    assert memory.is_duplicate(METER, MINUTES, T1) is True
    assert memory.is_duplicate(METER, MINUTES, T2) is False
    assert memory.is_duplicate(METER, SECONDS, T1) is False
    assert memory.last_energy(METER) == 31.057
    assert memory.last_energy(OTHER_METER) is None
    assert memory.energy_snapshot() == {METER: 31.057}
    assert len(memory) == 1


@pytest.mark.parametrize("clock", ["1999123123595", "2150010100000"])
def test_a_meter_whose_clock_is_set_far_wrong_still_has_its_duplicates_and_its_floor(clock: str) -> None:
    """Times before 2000 or after 2132 have no four-byte code: they are kept aside, and work the same."""
    memory = MeterMemory()
    first, second = clock + "0", clock + "9"
    memory.remember(METER, MINUTES, first, 31.057)
    memory.remember(METER, SECONDS, second, None)

    assert memory.is_duplicate(METER, MINUTES, first) is True
    assert memory.is_duplicate(METER, SECONDS, second) is True
    assert memory.is_duplicate(METER, SECONDS, first) is False
    assert memory.is_duplicate(METER, SECONDS, first, redelivered=True) is True  # older than the last
    assert memory.record(METER).energy_time == first and memory.last_energy(METER) == 31.057


def test_redelivered_reading_not_newer_than_the_last_forwarded_is_a_duplicate() -> None:
    processor = MeterDataProcessor()
    processor.process(SECONDS, raw(time=T1, zyggl=1.0), 0.0)
    processor.process(SECONDS, raw(time=T2, zyggl=2.0), 1.0)

    assert processor.process(SECONDS, raw(time=T1, zyggl=1.0), 2.0, redelivered=True) == dropped(DROP_DUPLICATE)
    assert processor.process(SECONDS, raw(time=T1, zyggl=1.0), 3.0) == power_message(1.0, T1)
    assert processor.process(SECONDS, raw(time=T3, zyggl=3.0), 4.0, redelivered=True) == power_message(3.0, T3)


def test_memory_keeps_the_last_time_per_meter_and_kind() -> None:
    memory = MeterMemory()
    times = [f"2026011217{minute:02d}00" for minute in range(3)]

    for meter_time in times:
        memory.remember(METER, SECONDS, meter_time, None)

    assert [memory.is_duplicate(METER, SECONDS, t) for t in times] == [False, False, True]
    assert not memory.is_duplicate(METER, MINUTES, times[-1])
    assert memory.energy_snapshot() == {}


def test_memory_evicts_the_oldest_meters_energy_beyond_max_meters() -> None:
    processor = MeterDataProcessor(memory=MeterMemory(max_meters=2))

    for now, meter_id in enumerate((METER, OTHER_METER, THIRD_METER)):
        processor.process(MINUTES, energy_reading(100.0, T1, meter_id), float(now))

    assert processor.memory.energy_snapshot() == {OTHER_METER: 100.0, THIRD_METER: 100.0}
    # The oldest meter's counter guard is forgotten: a lower energy passes.
    assert processor.process(MINUTES, energy_reading(50.0, T2, METER), 3.0) == energy_message(50.0, T2)


def test_memory_evicts_the_least_recently_forwarded_meter() -> None:
    memory = MeterMemory(max_meters=2)

    memory.remember(METER, MINUTES, T1, 1.0)
    memory.remember(OTHER_METER, MINUTES, T1, 2.0)
    memory.remember(METER, MINUTES, T2, 1.5)
    memory.remember(THIRD_METER, MINUTES, T1, 3.0)

    assert memory.energy_snapshot() == {METER: 1.5, THIRD_METER: 3.0}


def test_restore_energy_is_bounded_by_max_meters() -> None:
    memory = MeterMemory(max_meters=2)

    for energy, meter_id in enumerate((METER, OTHER_METER, THIRD_METER)):
        memory.restore_energy(meter_id, float(energy))

    assert memory.energy_snapshot() == {OTHER_METER: 1.0, THIRD_METER: 2.0}


def test_memory_never_remembers_more_than_max_meters() -> None:
    # Meters that send only RT_DATA: the docstring promises at most max_meters
    # meters remembered, least recently seen going first.
    memory = MeterMemory(max_meters=2)
    meters = [f"33B12259500{n:02d}" for n in range(5)]

    for meter_id in meters:
        memory.remember(meter_id, SECONDS, T1, None)

    assert len(memory) == 2
    assert [memory.is_duplicate(m, SECONDS, T1) for m in meters] == [False, False, False, True, True]


def test_a_fleet_heard_again_is_held_in_bytes_per_meter_not_a_record_a_float_and_a_grown_dict() -> None:
    """20,000 meters, each with a power and an energy reading forwarded twice: under 90 bytes per meter held.

    Measured: 76 with the table; 152 with a dict of slotted records (a
    record, the energy's float, and the dict's table grown by moving each
    meter to the end at each reading).
    """
    meters = [f"33B{number:010d}" for number in range(20_000)]
    memory = MeterMemory()
    tracemalloc.start()
    try:
        for meter_time in ("20260117211500", "20260117213000"):
            for number, meter_id in enumerate(meters):
                memory.remember(meter_id, SECONDS, meter_time, None)
                memory.remember(meter_id, MINUTES, meter_time, 1000.0 + number + int(meter_time[-4:]) / 10_000)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert memory.last_energy(meters[7]) == 1007.3
    assert memory.is_duplicate(meters[7], MINUTES, "20260117213000")
    assert held / len(meters) < 90


def test_default_memory_bound_is_200000_meters() -> None:
    assert MeterMemory().max_meters == 200_000


# --- the energy guard ------------------------------------------------------------------


def run_energy(processor: MeterDataProcessor, values: list[float], start: int = 0) -> list[Outcome]:
    """One energy reading a minute (meter clock), token = its index."""
    return [processor.process(MINUTES, energy_reading(value, minute(start + index)), float(index), token=index)
            for index, value in enumerate(values)]


def forwarded_energy(outcomes: list[Outcome]) -> list[float]:
    """The energy values published, in the order the proxy publishes them (settled ones first)."""
    values: list[float] = []
    for outcome in outcomes:
        for settled in outcome.settled:
            if settled.message is not None:
                values.append(settled.message.payload["active_energy"])  # type: ignore[arg-type]
        if outcome.message is not None:
            values.append(outcome.message.payload["active_energy"])  # type: ignore[arg-type]
    return values


@pytest.mark.parametrize("glitch", [1e9, 1e308])
def test_implausible_rise_is_held_and_dropped_when_the_next_reading_does_not_confirm_it(glitch: float) -> None:
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [100.0, glitch, 101.0, 102.0])

    assert forwarded_energy(outcomes) == [100.0, 101.0, 102.0]
    assert outcomes[1] == HELD_ENERGY
    assert outcomes[2].settled == (Settled(1, reason=DROP_IMPLAUSIBLE_RISE),)
    assert outcomes[2].events == (GuardEvent(EVENT_IMPLAUSIBLE, METER, 100.0, glitch),)
    assert processor.drops == Counter({DROP_IMPLAUSIBLE_RISE: 1})
    assert processor.memory.last_energy(METER) == 102.0


def test_implausible_rise_confirmed_by_the_next_reading_is_forwarded_in_order() -> None:
    # A rise of 100 kWh in a minute (6 MW) is held; the meter goes on counting from it: it was real.
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [100.0, 200.0, 200.5])

    assert outcomes[1] == HELD_ENERGY
    assert outcomes[2].settled == (Settled(1, message=energy_message(200.0, minute(1)).message),)
    assert forwarded_energy(outcomes) == [100.0, 200.0, 200.5]
    assert processor.drops == Counter()


def test_a_repeat_of_the_held_reading_does_not_confirm_it() -> None:
    processor = MeterDataProcessor()
    run_energy(processor, [100.0, 1e9])

    repeat = processor.process(MINUTES, energy_reading(1e9, minute(1)), 5.0, token=9)
    after = processor.process(MINUTES, energy_reading(100.5, minute(2)), 6.0, token=10)

    assert repeat == dropped(DROP_DUPLICATE)
    assert after.settled == (Settled(1, reason=DROP_IMPLAUSIBLE_RISE),)
    assert after.message == energy_message(100.5, minute(2)).message


def test_rise_within_max_power_is_forwarded_at_once() -> None:
    # 500 kW for one minute is 8.333 kWh: just within the default limit.
    processor = MeterDataProcessor()

    assert forwarded_energy(run_energy(processor, [100.0, 108.333])) == [100.0, 108.333]


def test_max_power_per_meter_overrides_the_default() -> None:
    processor = MeterDataProcessor(max_power_kw=500.0, max_power_by_meter={METER: 6.0})

    outcomes = run_energy(processor, [100.0, 100.2, 100.25])  # 12 kW, then 3 kW

    assert outcomes[1] == HELD_ENERGY
    assert forwarded_energy(outcomes) == [100.0, 100.2, 100.25]


def test_counter_reset_is_accepted_after_three_readings_of_the_new_count() -> None:
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [5000.0, 12.0, 12.1, 12.2, 12.3])

    assert outcomes[1:3] == [HELD_ENERGY, HELD_ENERGY]
    assert outcomes[3].settled == (Settled(1, message=energy_message(12.0, minute(1)).message),
                                   Settled(2, message=energy_message(12.1, minute(2)).message))
    assert outcomes[3].events == (GuardEvent(EVENT_RESET, METER, 5000.0, 12.0),)
    assert forwarded_energy(outcomes) == [5000.0, 12.0, 12.1, 12.2, 12.3]
    assert processor.memory.last_energy(METER) == 12.3
    assert processor.drops == Counter()


def test_counter_reset_to_zero_with_a_constant_count_is_accepted() -> None:
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [5000.0, 0.0, 0.0, 0.0])

    assert forwarded_energy(outcomes) == [5000.0, 0.0, 0.0, 0.0]


def test_a_single_low_value_between_normal_ones_is_dropped() -> None:
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [5000.0, 12.0, 5000.1])

    assert forwarded_energy(outcomes) == [5000.0, 5000.1]
    assert outcomes[2].settled == (Settled(1, reason=DROP_ENERGY_DECREASE),)
    assert outcomes[2].events == ()
    assert processor.drops == Counter({DROP_ENERGY_DECREASE: 1})


def test_two_low_values_then_the_old_count_drops_both() -> None:
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [5000.0, 12.0, 12.1, 5000.2])

    assert forwarded_energy(outcomes) == [5000.0, 5000.2]
    assert outcomes[3].settled == (Settled(1, reason=DROP_ENERGY_DECREASE), Settled(2, reason=DROP_ENERGY_DECREASE))


def test_low_values_that_do_not_rise_plausibly_are_not_a_reset() -> None:
    processor = MeterDataProcessor()

    outcomes = run_energy(processor, [5000.0, 12.0, 11.0, 10.0, 5000.1])

    assert forwarded_energy(outcomes) == [5000.0, 5000.1]
    assert processor.drops == Counter({DROP_ENERGY_DECREASE: 3})


def test_reading_older_than_the_floor_with_a_lower_energy_is_dropped_at_once() -> None:
    processor = MeterDataProcessor()
    run_energy(processor, [100.0, 100.1], start=10)

    assert processor.process(MINUTES, energy_reading(99.0, minute(5)), 5.0) == dropped(DROP_ENERGY_DECREASE)


def test_meter_clock_set_back_holds_one_reading_then_goes_on() -> None:
    # The config sender set the meter's clock back 10 minutes: the next reading is "older" but higher.
    processor = MeterDataProcessor()
    run_energy(processor, [100.0, 100.1], start=20)

    outcomes = run_energy(processor, [100.2, 100.3], start=11)

    assert outcomes[0] == HELD_ENERGY
    assert forwarded_energy(outcomes) == [100.2, 100.3]


def test_negative_energy_is_rejected_as_bad_value() -> None:
    processor = MeterDataProcessor()

    outcome = processor.process(MINUTES, energy_reading(-5.0), 0.0)

    assert outcome == Outcome(meter_id=METER, reason=REJECT_BAD_VALUE,
                              detail="meter 33B1225950027: energy -5.0 is negative")
    assert processor.drops == Counter({REJECT_BAD_VALUE: 1})
    assert processor.memory.last_energy(METER) is None


def test_guard_restored_with_its_time_judges_the_first_reading_after_a_restart() -> None:
    memory = MeterMemory()
    memory.restore_energy(METER, 100.0, minute(0))
    processor = MeterDataProcessor(memory=memory)

    outcomes = run_energy(processor, [1e9, 101.0, 102.0], start=1)

    assert forwarded_energy(outcomes) == [101.0, 102.0]


@pytest.mark.parametrize(
    ("old", "old_time", "new", "new_time", "plausible"),
    [
        (100.0, minute(0), 100.0, minute(0), True),
        (100.0, minute(0), 100.001, minute(0), False),
        (100.0, minute(0), 99.9, minute(1), False),
        (100.0, minute(0), 108.333, minute(1), True),
        (100.0, minute(0), 108.34, minute(1), False),
        (100.0, minute(0), 600.0, minute(60), True),
        (100.0, None, 1e9, minute(1), True),
        (100.0, minute(5), 100.1, minute(1), False),
    ],
)
def test_plausible_rise(old: float, old_time: str | None, new: float, new_time: str, plausible: bool) -> None:
    assert plausible_rise(old, old_time, new, new_time, 500.0) is plausible


def test_after_a_restart_a_reading_sent_again_up_to_the_floor_is_a_duplicate() -> None:
    # The floor on disk was acknowledged by the central broker: the internal broker's
    # redeliveries up to it were delivered before the restart.
    memory = MeterMemory()
    memory.restore_energy(METER, 100.5, minute(5))
    processor = MeterDataProcessor(memory=memory)

    outcomes = [
        processor.process(MINUTES, energy_reading(100.4, minute(4)), 0.0, redelivered=True),
        processor.process(MINUTES, energy_reading(100.5, minute(5)), 1.0),
        processor.process(MINUTES, energy_reading(100.6, minute(6)), 2.0),
    ]

    assert outcomes[:2] == [dropped(DROP_DUPLICATE), dropped(DROP_DUPLICATE)]
    assert outcomes[2] == energy_message(100.6, minute(6))
