"""Replay of the real ENY_NOW captures through MeterDataProcessor (pure: no broker).

The expected readings are computed from the capture itself, independently of
data_mapping: every distinct (meter id, meter time) that carries at least one
non-zero value is one real reading and must come out exactly once, with the
energy of the first message that carried it.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime

import pytest
from payloads import ENY_NOW_CAPTURES, capture

from data_mapping import DROP_ALL_ZERO, DROP_DUPLICATE, CleanMessage, MeterDataProcessor
from topics import MINUTES

ENVELOPE = {"id", "time", "isend"}
ZERO_ONLY_METER = "33B1225950030"


def real_readings(messages: list[tuple[str, bytes]]) -> dict[tuple[str, str], dict[str, object]]:
    """The first message of each distinct (id, time) with any non-zero value, as the clean payload expected."""
    expected: dict[tuple[str, str], dict[str, object]] = {}
    for _topic, payload in messages:
        document = json.loads(payload)
        key = (document["id"], document["time"])
        if key in expected or not any(v != 0 for k, v in document.items() if k not in ENVELOPE):
            continue
        iso = datetime.strptime(document["time"], "%Y%m%d%H%M%S").isoformat()
        expected[key] = {"id": document["id"], "time": iso, "active_energy": document.get("zygsz")}
    return expected


def replay(messages: list[tuple[str, bytes]]) -> tuple[list[CleanMessage], MeterDataProcessor]:
    """Every message through one processor, one second apart; the clean messages that came out."""
    processor = MeterDataProcessor()
    forwarded = []
    for now, (topic, payload) in enumerate(messages):
        assert topic == "MQTT_ENY_NOW"
        outcome = processor.process(MINUTES, payload, float(now))
        if outcome.message is not None:
            forwarded.append(outcome.message)
    return forwarded, processor


@pytest.mark.parametrize("name", ENY_NOW_CAPTURES)
def test_replay_forwards_each_real_reading_exactly_once_with_its_first_values(name: str) -> None:
    messages = capture(name)
    expected = real_readings(messages)

    forwarded, _processor = replay(messages)

    keys = [(message.meter_id, message.time) for message in forwarded]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(expected)
    assert {key: message.payload for key, message in zip(keys, forwarded, strict=True)} == expected
    assert all(message.kind == MINUTES for message in forwarded)


@pytest.mark.parametrize("name", ENY_NOW_CAPTURES)
def test_replay_forwards_no_zero_reading(name: str) -> None:
    forwarded, _processor = replay(capture(name))

    assert [message for message in forwarded if not message.payload["active_energy"]] == []


@pytest.mark.parametrize("name", ENY_NOW_CAPTURES)
def test_replay_energy_of_each_meter_never_decreases(name: str) -> None:
    forwarded, _processor = replay(capture(name))

    per_meter: dict[str, list[float]] = {}
    for message in forwarded:
        energy = message.payload["active_energy"]
        assert isinstance(energy, float)
        per_meter.setdefault(message.meter_id, []).append(energy)
    assert per_meter
    for energies in per_meter.values():
        assert energies == sorted(energies)


@pytest.mark.parametrize("name", ENY_NOW_CAPTURES)
def test_replay_forwards_nothing_for_the_meter_that_only_sends_zeros(name: str) -> None:
    forwarded, _processor = replay(capture(name))

    assert [message for message in forwarded if message.meter_id == ZERO_ONLY_METER] == []


def test_replay_of_the_two_day_capture_gives_624_readings_of_three_meters() -> None:
    messages = capture("MQTT_ENY_NOW_2026-01-12.log")

    forwarded, processor = replay(messages)

    assert len(messages) == 2072
    assert len(forwarded) == 624
    assert Counter(message.meter_id for message in forwarded) == {
        "33B1225950027": 208, "33B1225950028": 208, "33B1225950029": 208,
    }
    assert processor.drops == Counter({DROP_ALL_ZERO: 1036, DROP_DUPLICATE: 412})


def test_replay_of_the_two_day_capture_keeps_the_unset_2005_clock_of_meter_029() -> None:
    forwarded, _processor = replay(capture("MQTT_ENY_NOW_2026-01-12.log"))

    years = {message.payload["time"][:4] for message in forwarded if message.meter_id == "33B1225950029"}
    assert years == {"2005"}


def test_replay_of_the_short_capture_gives_one_reading_per_meter() -> None:
    forwarded, processor = replay(capture("MQTT_ENY_NOW_2026-01-17.log"))

    assert [message.payload for message in forwarded] == [
        {"id": "33B1225950028", "time": "2026-01-17T21:15:00", "active_energy": 31.057},
        {"id": "33B1225950027", "time": "2026-01-17T21:15:00", "active_energy": 163.486},
        {"id": "33B1225950029", "time": "2005-01-18T21:15:00", "active_energy": 168.878},
    ]
    assert processor.drops == Counter({DROP_ALL_ZERO: 5, DROP_DUPLICATE: 2})
