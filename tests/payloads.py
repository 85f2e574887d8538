"""What meters send, for the tests: minimal readings, meter times, and the real captures.

One definition of each, because the same ENY_NOW packet, the same "n minutes
after 17:00" and the same capture loader had been written out in several test
files with small differences; a test now says which reading it sends and every
file builds it the same way. The readings here are the smallest a meter could
send (the fields the proxy maps and nothing else), so that a test shows what it
is about; complete, physically consistent readings come from
``tools/meter_simulator.py`` (``eny_now_payload``, ``rt_data_payload``).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from tools.meter_simulator import format_meter_time

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RT_DATA_CAPTURE = "MQTT_RT_DATA_2026-01-12.log"  # one RT_DATA message of meter 33B1225950027
ENY_NOW_CAPTURES = ("MQTT_ENY_NOW_2026-01-12.log", "MQTT_ENY_NOW_2026-01-17.log")
# The meter time most tests count their readings from: minute(0) is "20260112170000".
MINUTE_ZERO = datetime(2026, 1, 12, 17, 0)


def capture(name: str) -> list[tuple[str, bytes]]:
    """(topic, payload) of each line of a capture in ``tests/fixtures``, the payload byte for byte."""
    lines = (FIXTURES / name).read_bytes().splitlines()
    return [(topic.decode(), payload) for topic, payload in (line.split(b" ", 1) for line in lines if line.strip())]


def capture_payloads(name: str) -> list[bytes]:
    """The payloads of a capture, in order."""
    return [payload for _topic, payload in capture(name)]


# The captured RT_DATA message as the meter sent it (compact JSON text).
RT_DATA: str = capture_payloads(RT_DATA_CAPTURE)[0].decode()


def minute(n: int, start: datetime = MINUTE_ZERO) -> str:
    """The meter time (``YYYYMMDDhhmmss``) ``n`` minutes after ``start``."""
    return format_meter_time(start + timedelta(minutes=n))


def minute_times(count: int, start: datetime = MINUTE_ZERO) -> list[str]:
    """``count`` distinct meter times, one minute apart from ``start`` on."""
    return [minute(n, start) for n in range(count)]


def eny_now(meter_id: str, meter_time: str, energy: float, **extra: object) -> str:
    """A minimal but valid ENY_NOW packet: import ``energy`` in kWh, no export; ``extra`` tags after ``isend``."""
    return json.dumps({"id": meter_id, "zygsz": energy, "fygsz": 0.0, "time": meter_time, "isend": "1", **extra})


def rt_data(meter_id: str, meter_time: str) -> str:
    """A minimal but valid RT_DATA packet: 1.5 kW in all and the three phase voltages (230.1, 230.2, 230.3 V)."""
    return json.dumps({"id": meter_id, "zyggl": 1.5, "ua": 230.1, "ub": 230.2, "uc": 230.3, "time": meter_time,
                       "isend": "1"})


def captured_rt_data(meter_id: str) -> str:
    """The real RT_DATA capture as if ``meter_id`` had sent it (re-encoded with JSON's default spacing)."""
    return json.dumps(dict(json.loads(RT_DATA), id=meter_id))
