"""Benchmark load: many distinct, valid KPM33B readings that no filter of the proxy drops.

Each reading of a meter carries a meter time one minute after the previous one
(no duplicates), an import energy that only grows (no counter going
backwards) and real, non-zero values (no all-zero reading), built with the
meter simulator's payload builders so that they look like what real meters
send (RT_DATA ~590 bytes, ENY_NOW ~270 bytes).

Readings are ordered round by round (every meter's reading k, then every
meter's reading k + 1), like a fleet on a common cadence; a load split over
several publishing connections is split by meter, so that each meter's
readings keep their order (the energy guard would otherwise drop an older
reading overtaken by a newer one).
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from meter_simulator import encode_payload, eny_now_payload, meter_ids, rt_data_payload  # noqa: E402

RT_DATA = "MQTT_RT_DATA"
ENY_NOW = "MQTT_ENY_NOW"
TOPICS = (RT_DATA, ENY_NOW)
FIRST_TIME = datetime(2026, 1, 12, 0, 0, 0)
TIME_PLACEHOLDER = "20000101000000"


@dataclass(frozen=True)
class Reading:
    """One raw packet to publish: its topic, meter, meter time (YYYYMMDDhhmmss) and payload."""

    topic: str
    meter_id: str
    meter_time: str
    payload: bytes


def bench_meter_ids(count: int, first: int = 0) -> list[str]:
    """``count`` distinct valid meter ids (13 characters), ``first`` the serial offset."""
    return meter_ids(count, prefix="33B", start=first)


def meter_time(index: int) -> str:
    """The meter time of a meter's reading number ``index`` (one minute apart)."""
    return (FIRST_TIME + timedelta(minutes=index)).strftime("%Y%m%d%H%M%S")


class LoadBuilder:
    """Builds readings for a fixed set of meters; a meter's RT_DATA values stay, its time moves.

    One RT_DATA template per meter keeps building 100,000 readings to a
    fraction of a second; the proxy does not compare power values, so the
    same values with a new time are as much work for it as new values.
    """

    def __init__(self, meters: list[str], seed: int = 33) -> None:
        self.meters = meters
        self._seed = seed
        self._rt_templates: dict[str, str] = {}  # built on first use: 100,000 meters may send energy only

    def _rng(self, meter_id: str) -> random.Random:
        return random.Random(f"{self._seed}:{meter_id}")

    def rt_data(self, meter_id: str, index: int) -> Reading:
        """The RT_DATA reading number ``index`` of a meter."""
        template = self._rt_templates.get(meter_id)
        if template is None:
            first = encode_payload(rt_data_payload(meter_id, FIRST_TIME, self._rng(meter_id))).decode()
            template = self._rt_templates[meter_id] = first.replace(meter_time(0), TIME_PLACEHOLDER)
        when = meter_time(index)
        return Reading(RT_DATA, meter_id, when, template.replace(TIME_PLACEHOLDER, when).encode())

    def eny_now(self, meter_id: str, index: int) -> Reading:
        """The ENY_NOW reading number ``index`` of a meter: 0.125 kWh more than the previous one."""
        when = FIRST_TIME + timedelta(minutes=index)
        base_kwh = 10 + int(meter_id[3:]) % 490_000 / 1000  # distinct per meter, no RNG needed
        payload = eny_now_payload(meter_id, when, base_kwh + index * 0.125)
        return Reading(ENY_NOW, meter_id, payload["time"], encode_payload(payload))

    def rounds(self, first_index: int, count: int, kinds: tuple[str, ...] = TOPICS) -> list[Reading]:
        """Readings ``first_index`` … ``first_index + count - 1`` of every meter, round by round."""
        readings: list[Reading] = []
        for index in range(first_index, first_index + count):
            for meter_id in self.meters:
                if RT_DATA in kinds:
                    readings.append(self.rt_data(meter_id, index))
                if ENY_NOW in kinds:
                    readings.append(self.eny_now(meter_id, index))
        return readings


# mosquitto_pub -l (libmosquitto 2.0.11) loses messages beyond 65,535 per connection: it reads its
# input faster than the broker acknowledges, its 16-bit message ids wrap, and it stops (or the broker
# disconnects it "due to out of memory") with part of the input never sent. Stay well below.
MAX_LINES_PER_CONNECTION = 50_000


def write_publisher_files(readings: list[Reading], directory: Path, connections_per_topic: int,
                          name: str) -> list[tuple[str, Path]]:
    """Split readings into ``mosquitto_pub -l`` input files: (topic, file) per connection.

    A meter always goes to the same connection of a topic, so its readings keep
    their order; more connections than asked for when one would carry more than
    MAX_LINES_PER_CONNECTION lines.
    """
    directory.mkdir(parents=True, exist_ok=True)
    per_topic: dict[str, int] = {}
    for reading in readings:
        per_topic[reading.topic] = per_topic.get(reading.topic, 0) + 1
    busiest = max(per_topic.values(), default=0)
    connections = max(connections_per_topic, -(-busiest // MAX_LINES_PER_CONNECTION))
    lines: dict[tuple[str, int], list[bytes]] = {}
    partition: dict[str, int] = {}
    for reading in readings:
        slot = partition.setdefault(reading.meter_id, len(partition) % connections)
        lines.setdefault((reading.topic, slot), []).append(reading.payload)
    files = []
    for (topic, slot), payloads in sorted(lines.items()):
        path = directory / f"{name}-{topic}-{slot}.lines"
        path.write_bytes(b"\n".join(payloads) + b"\n")
        files.append((topic, path))
    return files
