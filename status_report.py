"""The fleet at a glance for an operator: retained messages in, a table or a JSON document out.

``kpm33b_status.py`` reads the central broker's retained topics and hands
what it received here: ``collect`` turns the messages into a ``FleetStatus``
(the bridge's state and counters, one ``MeterStatus`` per meter), and
``format_table`` and ``report_document`` turn that into the text or the JSON
document it prints. Every payload is hostile: the central broker is shared,
anyone with write access may have left anything on these topics. A payload
that is not what its topic carries makes that value unknown (``-`` in the
table, ``null`` in the document) and names its topic among the unreadable
ones; it never raises. Pure: the messages, the time and the place come in as
arguments; no I/O here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from config_status import CONFIG_STATES  # the config sender's verdict on the last push to a meter
from topics import (
    AVAILABILITY,
    CONFIG_STATUS,
    MINUTES,
    OFFLINE,
    ONLINE,
    SECONDS,
    STATUS_LEAVES,
    bridge_devices_topic,
    bridge_state_topic,
    bridge_stats_topic,
    is_valid_meter_id,
    parse_meter_topic,
    parse_state,
    sender_stats_topic,
)

UNKNOWN = "-"
# The counters shown on the bridge's lines, always and in this order; any other counter only when not 0.
PROXY_COUNTERS = ("received", "forwarded", "dropped", "queue_depth", "meters")
SENDER_COUNTERS = ("sent", "acked", "alerted", "late", "failed", "pending", "meters")
COUNTER_LABELS = {"queue_depth": "queue"}
NAME_WIDTH = 24  # a longer name is cut in the table (never in the JSON document)
LONGEST_TEXT = 64  # a time or a state longer than this is no time or state


@dataclass
class MeterStatus:
    """What the central broker retains about one meter; None is unknown."""

    meter_id: str
    name: str | None = None
    availability: str | None = None
    last_seen: str | None = None  # from the device list: ISO 8601 UTC with Z
    power: float | None = None  # kW, as the seconds payload has it
    power_time: str | None = None  # the meter's own clock, ISO 8601 without a zone
    energy: float | None = None  # kWh, as the minutes payload has it
    energy_time: str | None = None
    seconds_interval: int | None = None
    minutes_interval: int | None = None
    config_state: str | None = None  # one of CONFIG_STATES
    config_updated: str | None = None  # ISO 8601 UTC with Z
    clock_offset: float | None = None  # seconds, the meter's clock minus local time


@dataclass
class FleetStatus:
    """The bridge and every meter, as read from the retained topics of one main topic."""

    main_topic: str
    bridge_state: str | None = None
    proxy_stats: dict[str, Any] | None = None
    sender_stats: dict[str, Any] | None = None
    device_list: bool = False  # whether a readable device list was retained
    meters: list[MeterStatus] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # topics whose payload was not understood


# --- hostile payloads in ------------------------------------------------------------------


def _json(payload: bytes) -> Any:
    """The decoded JSON of a payload, or None for anything that is not JSON."""
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _number(value: object) -> float | None:
    """A finite JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _count(value: object) -> int | None:
    """A counter: an integer ≥ 0 (not a boolean), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _interval(value: object) -> int | None:
    """An upload interval: an integer > 0 (not a boolean), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _meter_clock(value: object) -> str | None:
    """A reading's ``time``: ISO 8601 without a zone (the meter's own clock), else None."""
    if not isinstance(value, str) or len(value) > LONGEST_TEXT:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return value if parsed.tzinfo is None else None


def _utc_time(value: object) -> str | None:
    """ISO 8601 in UTC with ``Z`` (``updated``, ``last_seen``), else None."""
    if not isinstance(value, str) or len(value) > LONGEST_TEXT or not value.endswith("Z"):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    # Years 1 and 9999 would overflow when shown in a zone west or east of UTC.
    return value if 1 < parsed.year < 9999 else None


def _stats(payload: bytes) -> dict[str, Any] | None:
    """A stats document: its counters (``dropped`` a mapping of counters); None when not a JSON object.

    Values of another type are left out: they are shown as unknown.
    """
    document = _json(payload)
    if not isinstance(document, dict):
        return None
    stats: dict[str, Any] = {}
    for key, value in document.items():
        if isinstance(value, dict):
            counts = {reason: _count(n) for reason, n in value.items()}
            stats[key] = {reason: n for reason, n in counts.items() if n is not None}
        elif _count(value) is not None:
            stats[key] = value
    return stats


def _device_list(payload: bytes) -> list[dict[str, Any]] | None:
    """The entries of a device list with a valid meter id (see ``fleet.py``); None when not a JSON array."""
    document = _json(payload)
    if not isinstance(document, list):
        return None
    return [entry for entry in document if isinstance(entry, dict) and is_valid_meter_id(entry.get("id"))]


def _apply_reading(meter: MeterStatus, leaf: str, document: dict[str, Any]) -> None:
    if leaf == SECONDS:
        meter.power, meter.power_time = _number(document.get("active_power")), _meter_clock(document.get("time"))
    else:
        meter.energy, meter.energy_time = _number(document.get("active_energy")), _meter_clock(document.get("time"))


def _apply_config_status(meter: MeterStatus, document: dict[str, Any]) -> None:
    state = document.get("state")
    meter.config_state = state if isinstance(state, str) and state in CONFIG_STATES else None
    meter.config_updated = _utc_time(document.get("updated"))
    meter.clock_offset = _number(document.get("clock_offset_seconds"))
    # The intervals it pushed: the device list's (configured) win, see collect.
    meter.seconds_interval = _interval(document.get("upload_frequency_seconds"))
    meter.minutes_interval = _interval(document.get("upload_frequency_minutes"))


def collect(main_topic: str, messages: Iterable[tuple[str, bytes]], only: str | None = None) -> FleetStatus:
    """The fleet from the messages received, in order of arrival (the latest per topic wins).

    An empty payload is a cleared topic: as if absent. The device list gives
    each meter its name, configured intervals, last seen and availability;
    a meter's own availability topic, which is more current, wins over the
    list, and its configuration status gives the intervals when the list
    does not. ``only``: one meter id, all others left out.
    """
    latest: dict[str, bytes] = {}
    for topic, payload in messages:
        latest[topic] = payload
    fleet = FleetStatus(main_topic=main_topic)
    meters: dict[str, MeterStatus] = {}

    def meter(meter_id: str) -> MeterStatus:
        return meters.setdefault(meter_id, MeterStatus(meter_id))

    bridge = {bridge_state_topic(main_topic), bridge_stats_topic(main_topic), sender_stats_topic(main_topic),
              bridge_devices_topic(main_topic)}
    listed: dict[str, dict[str, Any]] = {}
    for topic in sorted(latest):
        payload = latest[topic]
        if not payload:
            continue
        if topic in bridge:
            readable = _apply_bridge(fleet, listed, topic, payload)
        else:
            parsed = parse_meter_topic(main_topic, topic, STATUS_LEAVES)
            if parsed is None or (only is not None and parsed.meter_id != only):
                continue
            readable = _apply_meter_topic(meter(parsed.meter_id), parsed.leaf, payload)
        if not readable:
            fleet.unreadable.append(topic)
    for meter_id, entry in listed.items():
        if only is not None and meter_id != only:
            continue
        status = meter(meter_id)
        name = entry.get("name")
        status.name = name if isinstance(name, str) else None
        status.last_seen = _utc_time(entry.get("last_seen"))
        if status.availability is None and entry.get("availability") in (ONLINE, OFFLINE):
            status.availability = entry["availability"]
        status.seconds_interval = _interval(entry.get("upload_frequency_seconds")) or status.seconds_interval
        status.minutes_interval = _interval(entry.get("upload_frequency_minutes")) or status.minutes_interval
    fleet.meters = [meters[meter_id] for meter_id in sorted(meters)]
    return fleet


def _apply_bridge(fleet: FleetStatus, listed: dict[str, dict[str, Any]], topic: str, payload: bytes) -> bool:
    """One of the bridge's topics; False when its payload was not understood."""
    main = fleet.main_topic
    if topic == bridge_state_topic(main):
        fleet.bridge_state = parse_state(payload)
        return fleet.bridge_state is not None
    if topic == bridge_devices_topic(main):
        entries = _device_list(payload)
        if entries is None:
            return False
        fleet.device_list = True
        listed.update((entry["id"], entry) for entry in entries)
        return True
    stats = _stats(payload)
    if topic == bridge_stats_topic(main):
        fleet.proxy_stats = stats
    else:
        fleet.sender_stats = stats
    return stats is not None


def _apply_meter_topic(meter: MeterStatus, leaf: str, payload: bytes) -> bool:
    """One of a meter's topics; False when its payload was not understood."""
    if leaf == AVAILABILITY:
        meter.availability = parse_state(payload)
        return meter.availability is not None
    document = _json(payload)
    if not isinstance(document, dict):
        return False
    if leaf in (SECONDS, MINUTES):
        _apply_reading(meter, leaf, document)
    elif leaf == CONFIG_STATUS:
        _apply_config_status(meter, document)
    return True


# --- the JSON document -------------------------------------------------------------------


def iso_utc(moment: datetime) -> str:
    """An aware datetime as ISO 8601 UTC with ``Z``, whole seconds."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def meter_document(meter: MeterStatus) -> dict[str, Any]:
    """One meter in the JSON document: the payloads' own names and values; null when unknown."""
    return {
        "id": meter.meter_id,
        "name": meter.name,
        "availability": meter.availability,
        "last_seen": meter.last_seen,
        "active_power": meter.power,
        "active_power_time": meter.power_time,
        "active_energy": meter.energy,
        "active_energy_time": meter.energy_time,
        "upload_frequency_seconds": meter.seconds_interval,
        "upload_frequency_minutes": meter.minutes_interval,
        "config_state": meter.config_state,
        "config_updated": meter.config_updated,
        "clock_offset_seconds": meter.clock_offset,
    }


def report_document(fleet: FleetStatus, broker: str, read_at: datetime) -> dict[str, Any]:
    """What ``--json`` prints: the same as the table, values as the payloads have them."""
    return {
        "broker": broker,
        "main_topic": fleet.main_topic,
        "read_at": iso_utc(read_at),
        "bridge": {"state": fleet.bridge_state, "proxy_stats": fleet.proxy_stats,
                   "config_sender_stats": fleet.sender_stats},
        "device_list": fleet.device_list,
        "meters": [meter_document(meter) for meter in fleet.meters],
        "unreadable": list(fleet.unreadable),
    }


# --- the table ----------------------------------------------------------------------------


def printable(text: str, width: int | None = None) -> str:
    """``text`` safe for a terminal: control characters (escape sequences …) as ``?``, cut to ``width``."""
    safe = "".join(character if character.isprintable() else "?" for character in text)
    if width is not None and len(safe) > width:
        safe = safe[:width - 1] + "…"
    return safe


def _when(moment: datetime, today: date) -> str:
    """``HH:MM:SS`` today, ``YYYY-MM-DD HH:MM`` any other day."""
    return moment.strftime("%H:%M:%S") if moment.date() == today else moment.strftime("%Y-%m-%d %H:%M")


def meter_clock_text(value: str | None, now: datetime) -> str:
    """A reading's time, as the meter's clock says it (the meters keep local time; no zone is converted)."""
    if value is None:
        return UNKNOWN
    return _when(datetime.fromisoformat(value), now.date())


def utc_text(value: str | None, now: datetime) -> str:
    """A UTC time (``updated``) in the zone of ``now``, the local time of the machine that reads."""
    if value is None:
        return UNKNOWN
    local = datetime.fromisoformat(value).astimezone(now.tzinfo)
    return _when(local, now.date())


def number_text(value: float | None, unit: str) -> str:
    """A value with its unit, at the meter's precision (no rounding)."""
    return UNKNOWN if value is None else f"{value!r} {unit}"


def duration_text(seconds: float) -> str:
    """A duration, compact: ``42 s``, ``17 min``, ``2 h 03 min``, ``3 d 04 h``."""
    whole = round(abs(seconds))
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


def offset_text(seconds: float | None) -> str:
    """A clock offset with its sign: ``+0 s``, ``-2 min``, ``-7640 d 05 h`` (a clock in 2005)."""
    if seconds is None:
        return UNKNOWN
    return ("-" if seconds < 0 and round(seconds) != 0 else "+") + duration_text(seconds)


def intervals_text(meter: MeterStatus) -> str:
    """``60 s / 1 min``; each part ``-`` when unknown."""
    seconds = UNKNOWN if meter.seconds_interval is None else f"{meter.seconds_interval} s"
    minutes = UNKNOWN if meter.minutes_interval is None else f"{meter.minutes_interval} min"
    return f"{seconds} / {minutes}"


def counters_text(stats: Mapping[str, Any] | None, shown: tuple[str, ...]) -> str:
    """A stats document on one line: the ``shown`` counters, then any other that is not 0, then the uptime."""
    if stats is None:
        return UNKNOWN
    parts = []
    for key, value in stats.items():
        if key not in shown and key != "uptime_seconds" and value:
            shown += (key,)
    for key in shown:
        value = stats.get(key)
        label = printable(COUNTER_LABELS.get(key, key), NAME_WIDTH)
        if isinstance(value, dict):
            reasons = ", ".join(f"{printable(reason, NAME_WIDTH)} {n}" for reason, n in sorted(value.items()) if n)
            parts.append(f"{label} {sum(value.values())}" + (f" ({reasons})" if reasons else ""))
        else:
            parts.append(f"{label} {UNKNOWN if value is None else value}")
    uptime = stats.get("uptime_seconds")
    if isinstance(uptime, int):
        parts.append(f"up {duration_text(uptime)}")
    return ", ".join(parts)


COLUMNS = ("ID", "NAME", "AVAIL", "POWER", "AT", "ENERGY", "AT", "INTERVALS", "CONFIG", "SINCE", "CLOCK")
RIGHT_ALIGNED = frozenset((3, 5, 10))  # power, energy, clock offset


def meter_row(meter: MeterStatus, now: datetime) -> tuple[str, ...]:
    """One meter's cells, in the order of COLUMNS."""
    return (
        meter.meter_id,
        UNKNOWN if meter.name is None else printable(meter.name, NAME_WIDTH),
        meter.availability or UNKNOWN,
        number_text(meter.power, "kW"),
        meter_clock_text(meter.power_time, now),
        number_text(meter.energy, "kWh"),
        meter_clock_text(meter.energy_time, now),
        intervals_text(meter),
        meter.config_state or UNKNOWN,
        utc_text(meter.config_updated, now),
        offset_text(meter.clock_offset),
    )


def align(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as lines of aligned columns, two spaces apart; numbers right-aligned."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.rjust(width) if column in RIGHT_ALIGNED else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return lines


def format_table(fleet: FleetStatus, broker: str, now: datetime) -> str:
    """The report as text: the bridge's lines, one row per meter sorted by id, a summary.

    ``now`` is an aware datetime in the zone to show times in (the local
    one): times of today show as ``HH:MM:SS``, others with their date.
    """
    lines = [f"{printable(fleet.main_topic)} on {printable(broker)}, read {now.strftime('%Y-%m-%d %H:%M:%S %Z')}",
             f"bridge         {fleet.bridge_state or UNKNOWN}",
             f"proxy          {counters_text(fleet.proxy_stats, PROXY_COUNTERS)}",
             f"config sender  {counters_text(fleet.sender_stats, SENDER_COUNTERS)}",
             ""]
    if fleet.meters:
        lines += align([COLUMNS, *(meter_row(meter, now) for meter in fleet.meters)])
    online = sum(1 for meter in fleet.meters if meter.availability == ONLINE)
    offline = sum(1 for meter in fleet.meters if meter.availability == OFFLINE)
    summary = f"{len(fleet.meters)} meter{'' if len(fleet.meters) == 1 else 's'}: {online} online, {offline} offline"
    if not fleet.device_list:
        summary += "; no device list retained (meters found from their own topics only)"
    lines.append(summary)
    if fleet.unreadable:
        shown = ", ".join(printable(topic) for topic in fleet.unreadable[:5])
        more = f" and {len(fleet.unreadable) - 5} more" if len(fleet.unreadable) > 5 else ""
        lines.append(f"unreadable payloads (shown as {UNKNOWN}): {shown}{more}")
    return "\n".join(lines) + "\n"
