"""The fleet's retained documents without a broker: builders and parsers, key by key."""

from __future__ import annotations

import json
from types import MappingProxyType

import pytest

from config_loader import DeviceSettings, MeterSettings
from fleet import device_entry, device_list, encode_device_list, iso_utc, parse_device_list

METER = "33B1225950027"
OTHER = "33B1225950028"
EXCLUDED = "33B1225950099"
# 2026-01-12T16:39:00Z
WALL = 1768235940.0


def test_iso_utc_is_whole_seconds_with_z() -> None:
    assert iso_utc(WALL) == "2026-01-12T16:39:00Z"
    assert iso_utc(WALL + 0.6) == "2026-01-12T16:39:01Z"
    assert iso_utc(0) == "1970-01-01T00:00:00Z"


def test_a_device_entry_key_by_key() -> None:
    settings = MeterSettings(upload_frequency_seconds=300, upload_frequency_minutes=5, devices=MappingProxyType(
        {METER: DeviceSettings(name="Heat pump", upload_frequency_seconds=30)}))

    assert device_entry(METER, True, WALL, settings) == {
        "id": METER, "name": "Heat pump", "model": "KPM33B", "availability": "online",
        "last_seen": "2026-01-12T16:39:00Z", "upload_frequency_seconds": 30, "upload_frequency_minutes": 5,
    }
    assert device_entry(OTHER, False, WALL, settings) == {
        "id": OTHER, "name": f"KPM33B {OTHER}", "model": "KPM33B", "availability": "offline",
        "last_seen": "2026-01-12T16:39:00Z", "upload_frequency_seconds": 300, "upload_frequency_minutes": 5,
    }


def test_the_device_list_is_sorted_by_id_without_excluded_meters() -> None:
    settings = MeterSettings(exclude=frozenset({EXCLUDED}))

    entries = device_list([(OTHER, WALL, True), (EXCLUDED, WALL, True), (METER, WALL - 60, False)], settings)

    assert [(e["id"], e["availability"], e["last_seen"]) for e in entries] == [
        (METER, "offline", "2026-01-12T16:38:00Z"), (OTHER, "online", "2026-01-12T16:39:00Z")]
    assert device_list([], settings) == []


def test_the_encoded_list_is_compact_json_of_about_200_bytes_per_meter() -> None:
    meters = [(f"33B12260{n:05d}", WALL, True) for n in range(100)]
    encoded = encode_device_list(device_list(meters, MeterSettings()))

    assert json.loads(encoded) == device_list(meters, MeterSettings())
    assert 150 * 100 < len(encoded) < 200 * 100


def test_the_encoded_list_is_the_compact_json_of_its_entries_with_names_kept_readable() -> None:
    name = "Küche – Wärmepumpe \"WP 2\"\t⚡"
    settings = MeterSettings(devices=MappingProxyType({METER: DeviceSettings(name=name)}))
    entries = device_list([(METER, WALL, True), (OTHER, WALL + 0.5, False)], settings)

    encoded = encode_device_list(entries)

    assert encoded == json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()
    assert "Küche – Wärmepumpe".encode() in encoded and b"\\u" not in encoded


def test_parse_device_list_reads_what_the_builder_writes() -> None:
    encoded = encode_device_list(device_list([(METER, WALL, True), (OTHER, WALL, False)], MeterSettings()))

    assert parse_device_list(encoded) == ([(METER, "online"), (OTHER, "offline")], 0)


@pytest.mark.parametrize(("payload", "expected"), [
    (b"not json", ([], 1)),
    (b"\xff\xfe", ([], 1)),
    (b'{"id": "33B1225950027"}', ([], 1)),
    (b"[" * 100_000, ([], 1)),
    (b'[1, null, {"id": "33B12/5950027", "availability": "online"}, {"id": "33B1225950027"},'
     b' {"id": "33B1225950027", "availability": "maybe"}, {"id": "33B1225950028", "availability": "online"}]',
     ([(OTHER, "online")], 5)),
])
def test_parse_device_list_skips_and_counts_what_is_not_a_valid_entry(
        payload: bytes, expected: tuple[list[tuple[str, str]], int]) -> None:
    assert parse_device_list(payload) == expected
