"""Simulated Compere KPM33B energy meters speaking the real MQTT protocol.

Why it exists: the proxy and the config sender must be exercised against
meters that behave like the real ones (see ``protocol.md`` and the captures in
``tests/fixtures``) without a rack of hardware: every meter publishing to the
same global topics, slow or missing command replies, clocks stuck in 2005,
spurious all-zero readings and duplicates, KPM37-style split packets, and
fleets of thousands of meters. ``make demo`` runs it as a program; the
integration tests import it and drive it in-process.

The module has a functional core (payload builders, packet splitting, capture
parsing, command replies) that is tested without a broker, and one imperative
class, :class:`MeterSimulator`, that wires the core to paho-mqtt.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import math
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, NamedTuple

import paho.mqtt.client as mqtt

# Run as a script from any directory: the project's modules sit one level up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from config_loader import InternalTopics
from topics import command_topic

LOG = logging.getLogger("meter_simulator")

# Tag lists in the order the protocol table gives them; the payload builders
# emit exactly these keys (plus id, time, isend) so that tests can compare sets.
RT_DATA_TAGS: tuple[str, ...] = (
    "ua", "ub", "uc", "uab", "ubc", "uca", "ia", "ib", "ic",
    "pa", "pb", "pc", "zyggl", "qa", "qb", "qc", "zwggl",
    "sa", "sb", "sc", "zszgl", "pfa", "pfb", "pfc", "zglys", "f",
    "uxja", "uxjb", "uxjc", "ixja", "ixjb", "ixjc", "unb", "inb",
    "pdm", "qdm", "sdm", "iadm", "ibdm", "icdm",
)  # fmt: skip
ENY_NOW_TAGS: tuple[str, ...] = (
    "zygsz", "fygsz", "zwgsz", "fwgsz", "zszsz",
    "zyjsz", "zyfsz", "zypsz", "zyvsz", "zydvsz",
    "fyjsz", "fyfsz", "fypsz", "fyvsz", "fydvsz",
)  # fmt: skip
# The order real meters put the ENY_NOW tags in (import and export tariffs interleaved).
_ENY_NOW_WIRE_ORDER: tuple[str, ...] = (
    "zygsz", "fygsz", "zwgsz", "fwgsz", "zszsz",
    "zyjsz", "fyjsz", "zyfsz", "fyfsz", "zypsz", "fypsz", "zyvsz", "fyvsz", "zydvsz", "fydvsz",
)  # fmt: skip
IMPORT_TARIFF_TAGS: tuple[str, ...] = ("zyjsz", "zyfsz", "zypsz", "zyvsz", "zydvsz")
EXPORT_TARIFF_TAGS: tuple[str, ...] = ("fyjsz", "fyfsz", "fypsz", "fyvsz", "fydvsz")
# Envelope keys every packet carries; everything else is a measurement tag.
ENVELOPE_KEYS: tuple[str, ...] = ("id", "time", "isend")

# Share of the energy booked on tariffs 1-5, in percent, roughly like meter
# …027 in the capture; tariff 5 stays at 0 there, so it does here.
TARIFF_PERCENT: tuple[int, ...] = (15, 22, 58, 5, 0)
# Tariff that absorbs the rounding remainder so the tariffs sum exactly.
_REMAINDER_TARIFF = 2

ALLOWED_SECONDS_INTERVALS: frozenset[int] = frozenset({30, 60, 300, 600, 900, 1200, 1800, 3600})
ALLOWED_MINUTES_INTERVALS: frozenset[int] = frozenset({1, 5, 10, 15, 20, 30, 60, 1440})
CMD_SECONDS = "0000"
CMD_MINUTES = "0001"
OPRID_LENGTH = 32
METER_ID_LENGTH = 13
TIME_FORMAT = "%Y%m%d%H%M%S"

ReplyMode = Literal["prompt", "delay", "error", "none"]
ClockMode = Literal["now", "2005"]
CommandKind = Literal["config", "time"]
REPLY_MODES: frozenset[str] = frozenset({"prompt", "delay", "error", "none"})
CLOCK_MODES: frozenset[str] = frozenset({"now", "2005"})
COMMAND_CONFIG: CommandKind = "config"
COMMAND_TIME: CommandKind = "time"


# --------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------


def meter_ids(count: int, prefix: str = "33B12259", start: int = 50027) -> list[str]:
    """Return ``count`` consecutive meter ids like ``33B1225950027``.

    Real ids are a model prefix plus a serial, 13 characters in all; the
    proxy rejects anything else, so an id that cannot fit is an error here
    rather than a silently malformed meter.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if not prefix.isascii() or not (prefix.isalnum() or prefix == ""):
        raise ValueError(f"prefix must be ASCII letters and digits, got {prefix!r}")
    width = METER_ID_LENGTH - len(prefix)
    if width <= 0:
        raise ValueError(f"prefix {prefix!r} leaves no room for a serial in a 13-character id")
    last = start + count - 1
    if count and len(str(last)) > width:
        raise ValueError(f"serial {last} does not fit in {width} digits after prefix {prefix!r}")
    return [f"{prefix}{serial:0{width}d}" for serial in range(start, start + count)]


def format_meter_time(when: datetime) -> str:
    """Format a clock reading the way meters do: ``YYYYMMDDhhmmss``."""
    return when.strftime(TIME_FORMAT)


def clock_2005(when: datetime) -> datetime:
    """The reading of a meter whose clock was never set: ``when`` in 2005.

    2005 is not a leap year, so 29 February becomes the 28th.
    """
    try:
        return when.replace(year=2005)
    except ValueError:
        return when.replace(year=2005, day=28)


def _angle(degrees: float) -> float:
    """Normalise an angle to [0, 360) like the meter's phase-angle tags."""
    return degrees % 360.0


def rt_data_payload(meter_id: str, when: datetime, rng: random.Random) -> dict[str, Any]:
    """Build one complete, physically consistent ``MQTT_RT_DATA`` message.

    Values are drawn around a 230/400 V three-phase supply with an inductive
    load; totals are the sums of the (unrounded) phase values and line
    voltages follow from the phase phasors, so a consumer that cross-checks
    the figures finds them coherent. Rounding follows the capture: 3 decimals
    for volts, amps, power factors, angles and percentages, 4 for powers and
    demands.
    """
    phases = ("a", "b", "c")
    voltage = {p: rng.uniform(226.0, 234.0) for p in phases}
    voltage_angle = {"a": 0.0, "b": 240.0 + rng.uniform(-0.3, 0.3), "c": 120.0 + rng.uniform(-0.3, 0.3)}
    base_current = rng.uniform(0.5, 16.0)
    current = {p: base_current * rng.uniform(0.97, 1.03) for p in phases}
    # Current lags voltage by phi (inductive load); the capture books that as
    # negative reactive power, so the sign convention below copies it.
    phi = {p: rng.uniform(2.0, 15.0) for p in phases}
    apparent = {p: voltage[p] * current[p] / 1000.0 for p in phases}
    active = {p: apparent[p] * math.cos(math.radians(phi[p])) for p in phases}
    reactive = {p: -apparent[p] * math.sin(math.radians(phi[p])) for p in phases}
    phasor = {
        p: voltage[p] * complex(math.cos(math.radians(voltage_angle[p])), math.sin(math.radians(voltage_angle[p])))
        for p in phases
    }
    total_active = sum(active.values())
    total_reactive = sum(reactive.values())
    total_apparent = sum(apparent.values())
    mean_voltage = sum(voltage.values()) / 3
    mean_current = sum(current.values()) / 3

    # Keys in the order of the captured message, so a simulated message
    # reads like a real one.
    payload: dict[str, Any] = {"id": meter_id}
    for p in phases:
        payload[f"i{p}"] = round(current[p], 3)
    for p in phases:
        payload[f"u{p}"] = round(voltage[p], 3)
    payload["uab"] = round(abs(phasor["a"] - phasor["b"]), 3)
    payload["ubc"] = round(abs(phasor["b"] - phasor["c"]), 3)
    payload["uca"] = round(abs(phasor["c"] - phasor["a"]), 3)
    for p in phases:
        payload[f"p{p}"] = round(active[p], 4)
    payload["zyggl"] = round(total_active, 4)
    for p in phases:
        payload[f"q{p}"] = round(reactive[p], 4)
    payload["zwggl"] = round(total_reactive, 4)
    for p in phases:
        payload[f"s{p}"] = round(apparent[p], 4)
    payload["zszgl"] = round(total_apparent, 4)
    for p in phases:
        payload[f"pf{p}"] = round(active[p] / apparent[p], 3)
    payload["zglys"] = round(total_active / total_apparent, 3)
    payload["f"] = round(rng.uniform(49.95, 50.05), 3)
    for p in phases:
        payload[f"uxj{p}"] = round(_angle(voltage_angle[p]), 3)
    for p in phases:
        payload[f"ixj{p}"] = round(_angle(voltage_angle[p] - phi[p]), 3)
    payload["unb"] = round((max(voltage.values()) - min(voltage.values())) / mean_voltage * 100, 3)
    payload["inb"] = round((max(current.values()) - min(current.values())) / mean_current * 100, 3)
    payload["pdm"] = round(total_active * rng.uniform(0.98, 1.02), 4)
    payload["qdm"] = round(total_reactive * rng.uniform(0.98, 1.02), 4)
    payload["sdm"] = round(total_apparent * rng.uniform(0.98, 1.02), 4)
    for p in phases:
        payload[f"i{p}dm"] = round(current[p] * rng.uniform(0.98, 1.02), 4)
    payload["time"] = format_meter_time(when)
    payload["isend"] = "1"
    return payload


def _to_milli(kwh: float, name: str) -> int:
    """Energy as an integer count of Wh, so tariff sums are exact."""
    if not math.isfinite(kwh) or kwh < 0:
        raise ValueError(f"{name} must be a finite energy >= 0 kWh, got {kwh}")
    return round(kwh * 1000)


def _tariff_split(total_milli: int) -> list[int]:
    """Split an energy (in Wh) over the five tariffs, summing exactly."""
    parts = [total_milli * percent // 100 for percent in TARIFF_PERCENT]
    parts[_REMAINDER_TARIFF] += total_milli - sum(parts)
    return parts


def eny_now_payload(meter_id: str, when: datetime, import_kwh: float, export_kwh: float = 0.0) -> dict[str, Any]:
    """Build one complete ``MQTT_ENY_NOW`` message for the given registers.

    Energies keep the meter's 3 decimals (Wh resolution). The five import
    and export tariff registers add up exactly to the totals, as on a real
    meter; reactive and apparent energies are derived from the active ones so
    that they move together.
    """
    import_milli = _to_milli(import_kwh, "import_kwh")
    export_milli = _to_milli(export_kwh, "export_kwh")
    values: dict[str, int] = {
        "zygsz": import_milli,
        "fygsz": export_milli,
        "zwgsz": import_milli // 100,
        "fwgsz": import_milli * 7 // 100,
        "zszsz": (import_milli + export_milli) * 10075 // 10000,
    }
    for tag, part in zip(IMPORT_TARIFF_TAGS, _tariff_split(import_milli), strict=True):
        values[tag] = part
    for tag, part in zip(EXPORT_TARIFF_TAGS, _tariff_split(export_milli), strict=True):
        values[tag] = part
    payload: dict[str, Any] = {"id": meter_id}
    for tag in _ENY_NOW_WIRE_ORDER:
        payload[tag] = values[tag] / 1000
    payload["time"] = format_meter_time(when)
    payload["isend"] = "1"
    return payload


def zero_reading(payload: Mapping[str, Any], meter_time: str | None = None) -> dict[str, Any]:
    """An all-zero copy of a reading, as real meters send spuriously.

    ``meter_time`` overrides the ``time`` field: a meter with an unset clock
    dates its real readings 2005 but its zero readings with the real date
    (meter …029 in the capture).
    """
    zero: dict[str, Any] = {key: (value if key in ENVELOPE_KEYS else 0.0) for key, value in payload.items()}
    if meter_time is not None:
        zero["time"] = meter_time
    return zero


def spurious_sequence(payload: Mapping[str, Any], zero_time: str | None = None) -> list[dict[str, Any]]:
    """What a real meter sends for one ENY_NOW reading: real, all-zero, duplicate.

    The order copies the capture (e.g. meter …028 at 17:00): the real reading,
    an all-zero one with the same time, then the real reading again.
    """
    return [dict(payload), zero_reading(payload, zero_time), dict(payload)]


def split_packets(payload: Mapping[str, Any], parts: int) -> list[dict[str, Any]]:
    """Split a reading over ``parts`` packets, as a KPM37 over WiFi does.

    Every packet carries the ``id`` and ``time``; the measurement tags are
    spread as evenly as possible in their original order; all packets but the
    last say ``"isend":"0"``, the last ``"1"``.
    """
    tags = [key for key in payload if key not in ENVELOPE_KEYS]
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if parts > max(len(tags), 1):
        raise ValueError(f"cannot split {len(tags)} tags over {parts} packets")
    packets: list[dict[str, Any]] = []
    base, extra = divmod(len(tags), parts)
    position = 0
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        packet: dict[str, Any] = {"id": payload["id"]}
        for tag in tags[position : position + size]:
            packet[tag] = payload[tag]
        position += size
        packet["time"] = payload["time"]
        packet["isend"] = "1" if index == parts - 1 else "0"
        packets.append(packet)
    return packets


def merge_packets(packets: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Reassemble split packets into one reading (the inverse of split_packets).

    Raises ValueError when the packets do not form exactly one complete
    reading (mixed ids or times, or no final ``isend`` "1" at the end), so that
    tests catch a split that a consumer could not put back together.
    """
    merged: dict[str, Any] = {}
    packet_list = list(packets)
    if not packet_list:
        raise ValueError("no packets")
    for index, packet in enumerate(packet_list):
        if merged and (packet["id"] != merged["id"] or packet["time"] != merged["time"]):
            raise ValueError(f"packet {index} belongs to another reading")
        expected_isend = "1" if index == len(packet_list) - 1 else "0"
        if packet["isend"] != expected_isend:
            raise ValueError(f"packet {index} has isend {packet['isend']!r}, expected {expected_isend!r}")
        merged.setdefault("id", packet["id"])
        merged.setdefault("time", packet["time"])
        merged.update({key: value for key, value in packet.items() if key not in ENVELOPE_KEYS})
    reading: dict[str, Any] = {"id": merged.pop("id")}
    meter_time = merged.pop("time")
    reading.update(merged)
    reading["time"] = meter_time
    reading["isend"] = "1"
    return reading


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Serialise a payload compactly, like the meters do (no spaces)."""
    return json.dumps(payload, separators=(",", ":")).encode()


def parse_capture_line(line: str) -> tuple[str, bytes] | None:
    """Parse one ``TOPIC PAYLOAD`` line of a capture file.

    The topic ends at the first space; the rest of the line is the payload,
    byte for byte (it may itself contain spaces). Blank lines and ``#``
    comments give None. A line with a topic but no payload is malformed.
    """
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    topic, separator, payload = text.partition(" ")
    if not separator or not payload.strip():
        raise ValueError(f"capture line has no payload: {text[:80]!r}")
    return topic, payload.encode()


def _decode_command(payload: bytes) -> dict[str, Any] | None:
    """The command as a dict, or None when it is not a JSON object."""
    try:
        decoded = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def requested_interval(payload: bytes) -> tuple[Literal["seconds", "minutes"], int] | None:
    """The upload frequency an ``MQTT_COMMOD_SET_`` command asks for.

    Returns ``("seconds", 60)`` for ``Cmd`` "0000" (RT_DATA interval in
    seconds) or ``("minutes", 5)`` for "0001" (ENY_NOW interval in minutes),
    or None when the command or its value is not one the meter accepts.
    """
    command = _decode_command(payload)
    if command is None:
        return None
    value = command.get("value")
    if not isinstance(value, str) or not value.isdigit():
        return None
    number = int(value)
    if command.get("Cmd") == CMD_SECONDS and number in ALLOWED_SECONDS_INTERVALS:
        return "seconds", number
    if command.get("Cmd") == CMD_MINUTES and number in ALLOWED_MINUTES_INTERVALS:
        return "minutes", number
    return None


def requested_time(payload: bytes) -> datetime | None:
    """The clock setting an ``MQTT_SETTIME_`` command asks for, or None if invalid."""
    command = _decode_command(payload)
    if command is None:
        return None
    value = command.get("time")
    if not isinstance(value, str) or len(value) != 14 or not value.isdigit():
        return None
    try:
        return datetime.strptime(value, TIME_FORMAT)
    except ValueError:
        return None


def command_reply(kind: CommandKind, payload: bytes, meter_id: str, fail: bool = False) -> dict[str, Any] | None:
    """The reply a meter sends to a command, or None when it stays silent.

    ``kind`` is ``"config"`` (``MQTT_COMMOD_SET_``) or ``"time"``
    (``MQTT_SETTIME_``). Like a real meter, it does not answer a payload that
    is not a JSON object or whose ``oprid`` is not exactly 32 characters.
    A command it cannot apply gets ``"code":"02"`` with a ``msg``; ``fail``
    forces that answer (a meter in "error" mode).
    """
    command = _decode_command(payload)
    if command is None:
        return None
    oprid = command.get("oprid")
    if not isinstance(oprid, str) or len(oprid) != OPRID_LENGTH:
        return None
    reply: dict[str, Any] = {"id": meter_id, "oprid": oprid}
    if fail:
        reason = "simulated failure"
    elif kind == COMMAND_CONFIG:
        reason = "" if requested_interval(payload) is not None else "unsupported Cmd or value"
    elif kind == COMMAND_TIME:
        reason = "" if requested_time(payload) is not None else "invalid time"
    else:
        raise ValueError(f"unknown command kind {kind!r}")
    if reason:
        reply["code"] = "02"
        reply["msg"] = reason
    else:
        reply["code"] = "01"
    return reply


# --------------------------------------------------------------------------
# Imperative shell
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MeterTopics(InternalTopics):
    """The project's internal topic names, seen from the meter's side."""

    def config_topic(self, meter_id: str) -> str:
        """The upload-frequency command topic one meter listens on."""
        return command_topic(self.meter_config, meter_id)

    def time_topic(self, meter_id: str) -> str:
        """The clock command topic one meter listens on."""
        return command_topic(self.meter_time, meter_id)


class ReceivedCommand(NamedTuple):
    """A command as a meter received it (payload ``{"raw": text}`` if not JSON)."""

    meter_id: str
    topic: str
    payload: dict[str, Any]
    received_at: float


class SentReply(NamedTuple):
    """A reply as a meter published it, with the monotonic time it was handed to paho."""

    meter_id: str
    topic: str
    reply: dict[str, Any]
    sent_at: float


class _Connection:
    """One paho client and the bounded window of QoS 1 publishes in it.

    paho keys outgoing QoS 1 messages by a 16-bit id: beyond ~65,000
    unacknowledged publishes ids collide and messages are lost. The window
    keeps at most ``max_in_flight`` publishes inside the client; a publisher
    waits (off the network thread) until acknowledgements free a slot.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        username: str | None,
        password: str | None,
        subscriptions: Sequence[str],
        on_message: Callable[[str, bytes], None],
        should_stop: Callable[[], bool],
        max_in_flight: int,
        subscribe_batch: int,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.ready = threading.Event()
        self._on_command = on_message
        self._should_stop = should_stop
        self._max_in_flight = max_in_flight
        self._subscribe_batch = subscribe_batch
        self._window = threading.Condition()
        self._outstanding = 0
        self._pending_subscriptions: set[int] = set()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        # More than paho's default 20 in flight: localhost round trips would
        # otherwise cap a 1,000-meter round at a few thousand messages/s.
        self.client.max_inflight_messages_set(min(100, max_in_flight))
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=5)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_subscribe = self._handle_subscribe
        self.client.on_publish = self._handle_publish
        self.client.on_message = self._handle_message

    def start(self) -> None:
        """Connect in the background; paho's thread retries until the broker is there."""
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def close(self) -> None:
        """Disconnect and stop paho's thread."""
        self.client.disconnect()
        self.client.loop_stop()

    # paho callbacks: network thread, so only bookkeeping here.
    def _handle_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        if reason_code.is_failure:
            LOG.warning(
                "%s: broker %s:%d refused the connection: %s", self.client_id, self.host, self.port, reason_code
            )
            return
        LOG.debug("%s: connected to %s:%d", self.client_id, self.host, self.port)
        self._pending_subscriptions.clear()
        # Subscribe in batches: one SUBSCRIBE per topic would take thousands
        # of round trips for a large fleet, one giant packet risks size limits.
        for first in range(0, len(self.subscriptions), self._subscribe_batch):
            batch = [(topic, 1) for topic in self.subscriptions[first : first + self._subscribe_batch]]
            result, mid = client.subscribe(batch)
            if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
                self._pending_subscriptions.add(mid)
        if not self._pending_subscriptions:
            self.ready.set()

    def _handle_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[mqtt.ReasonCode],
        properties: mqtt.Properties | None,
    ) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            LOG.warning("%s: broker refused %d subscription(s): %s", self.client_id, len(refused), refused[0])
        self._pending_subscriptions.discard(mid)
        if not self._pending_subscriptions:
            self.ready.set()

    def _handle_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        self.ready.clear()
        if not self._should_stop():
            LOG.warning("%s: disconnected (%s), reconnecting", self.client_id, reason_code)

    def _handle_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: mqtt.ReasonCode,
        properties: mqtt.Properties | None,
    ) -> None:
        with self._window:
            self._outstanding -= 1
            self._window.notify_all()

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._on_command(message.topic, message.payload)

    def publish(self, topic: str, payload: bytes) -> bool:
        """Publish at QoS 1 once the window has room; False if stopping or refused.

        Never call from a paho callback: it may wait for acknowledgements.
        """
        with self._window:
            while self._outstanding >= self._max_in_flight:
                if self._should_stop():
                    return False
                self._window.wait(0.1)
            self._outstanding += 1
        info = self.client.publish(topic, payload, qos=1)
        # NO_CONN still queues a QoS 1 message inside paho; it goes out on
        # reconnect and its acknowledgement frees the slot then.
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            with self._window:
                self._outstanding -= 1
                self._window.notify_all()
            LOG.error("%s: publish to %s failed: %s", self.client_id, topic, mqtt.error_string(info.rc))
            return False
        return True

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every publish handed to paho has been acknowledged."""
        deadline = time.monotonic() + timeout
        with self._window:
            while self._outstanding > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._window.wait(min(remaining, 0.1))
        return True


@dataclass
class _Meter:
    """The mutable state of one simulated meter (guarded by the simulator's lock)."""

    meter_id: str
    reply_mode: str
    clock_offset: timedelta | None  # None: clock never set, reads 2005
    seconds_interval: float
    minutes_interval: float
    import_wh: int
    power_kw: float
    rng: random.Random
    connection: _Connection | None = None
    seconds_generation: int = 0
    minutes_generation: int = 0

    def clock(self, now: datetime) -> datetime:
        """What this meter's clock reads at wall-clock time ``now``."""
        if self.clock_offset is None:
            return clock_2005(now)
        return now + self.clock_offset


class _Reading(NamedTuple):
    kind: Literal["seconds", "minutes"]
    meter_id: str
    generation: int


class _Reply(NamedTuple):
    meter_id: str
    topic: str
    reply: dict[str, Any]


def _per_meter(setting: Any, meter_id: str, default: str) -> str:
    """Resolve a per-meter setting given as one value, a mapping or a callable."""
    if callable(setting):
        return str(setting(meter_id))
    if isinstance(setting, Mapping):
        return str(setting.get(meter_id, default))
    return str(setting)


@dataclass
class _Outbox:
    """Messages built under the lock, published after it is released."""

    messages: list[tuple[_Connection, str, bytes]] = field(default_factory=list)
    seconds_readings: int = 0
    minutes_readings: int = 0
    meters: set[str] = field(default_factory=set)


class MeterSimulator:
    """A fleet of simulated KPM33B meters on one MQTT broker.

    By default all meters share one MQTT connection (a real installation has
    one per meter, but thousands of sockets and threads would make the
    simulator, not the proxy, the bottleneck); ``connection_per_meter`` gives
    each meter its own client with username = last 8 characters of its id, for
    brokers with per-meter accounts and ACLs.

    A single scheduler thread with a heap publishes readings on each meter's
    cadence and sends delayed command replies, so paho callbacks only record
    and enqueue, and thousands of meters cost no thousands of timers.

    ``reply_mode`` and ``clock`` are one value for all meters, a mapping
    meter_id -> value (missing ids get the default) or a callable. Reply modes:
    ``prompt`` (answer at once), ``delay`` (answer after ``reply_delay`` s),
    ``error`` (answer ``"code":"02"`` and change nothing), ``none`` (ignore
    commands entirely, like a meter that never answers). Clock ``2005`` is a
    clock never set: readings are dated now but in 2005 until a SETTIME.

    ``seconds_interval`` and ``minutes_interval`` are the RT_DATA and ENY_NOW
    cadences in seconds (floats, so tests can run fast). A command that
    changes a cadence sets it to the commanded value in seconds times
    ``interval_scale`` (e.g. 0.01 turns "60" into 0.6 s for a fast test).
    """

    def __init__(
        self,
        host: str,
        port: int,
        meters: Sequence[str],
        *,
        username: str | None = None,
        password: str | None = None,
        seconds_interval: float = 60.0,
        minutes_interval: float = 60.0,
        reply_mode: str | Mapping[str, str] | Callable[[str], str] = "prompt",
        reply_delay: float = 5.0,
        clock: str | Mapping[str, str] | Callable[[str], str] = "now",
        packets: int = 1,
        spurious: bool = False,
        topics: MeterTopics | None = None,
        connection_per_meter: bool = False,
        interval_scale: float = 1.0,
        seed: int | None = None,
        max_in_flight: int = 1000,
        subscribe_batch: int = 500,
    ) -> None:
        if seconds_interval <= 0 or minutes_interval <= 0:
            raise ValueError("seconds_interval and minutes_interval must be > 0")
        if packets < 1:
            raise ValueError(f"packets must be >= 1, got {packets}")
        if reply_delay < 0:
            raise ValueError(f"reply_delay must be >= 0, got {reply_delay}")
        if max_in_flight < 1 or subscribe_batch < 1:
            raise ValueError("max_in_flight and subscribe_batch must be >= 1")
        if len(set(meters)) != len(meters):
            raise ValueError("meter ids must be unique")
        self.host = host
        self.port = port
        self.topics = topics or MeterTopics()
        self.packets = packets
        self.spurious = spurious
        self.reply_delay = reply_delay
        self.interval_scale = interval_scale
        self._username = username
        self._password = password
        self._connection_per_meter = connection_per_meter
        self._max_in_flight = max_in_flight
        self._subscribe_batch = subscribe_batch
        seed_text = str(seed) if seed is not None else uuid.uuid4().hex

        self._lock = threading.Lock()
        self._meters: dict[str, _Meter] = {}
        for meter_id in meters:
            mode = _per_meter(reply_mode, meter_id, "prompt")
            if mode not in REPLY_MODES:
                raise ValueError(f"reply mode for {meter_id} must be one of {sorted(REPLY_MODES)}, got {mode!r}")
            clock_mode = _per_meter(clock, meter_id, "now")
            if clock_mode not in CLOCK_MODES:
                raise ValueError(f"clock for {meter_id} must be one of {sorted(CLOCK_MODES)}, got {clock_mode!r}")
            rng = random.Random(f"{seed_text}:{meter_id}")
            self._meters[meter_id] = _Meter(
                meter_id=meter_id,
                reply_mode=mode,
                clock_offset=None if clock_mode == "2005" else timedelta(0),
                seconds_interval=seconds_interval,
                minutes_interval=minutes_interval,
                import_wh=rng.randint(10_000, 500_000),
                power_kw=rng.uniform(0.3, 7.0),
                rng=rng,
            )
        # Several meters may share the last 8 characters of their ids; a real
        # broker would then deliver a command to all of them.
        self._command_topics: dict[str, list[tuple[CommandKind, str]]] = {}
        for meter_id in self._meters:
            self._command_topics.setdefault(self.topics.config_topic(meter_id), []).append((COMMAND_CONFIG, meter_id))
            self._command_topics.setdefault(self.topics.time_topic(meter_id), []).append((COMMAND_TIME, meter_id))

        self._connections: list[_Connection] = []
        self._heap: list[tuple[float, int, _Reading | _Reply]] = []
        self._sequence = itertools.count()
        self._wakeup = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._interrupted = False
        self._started = False
        self._cadence = False
        self._scheduler: threading.Thread | None = None
        self._received: list[ReceivedCommand] = []
        self._replies: list[SentReply] = []
        self._published = 0
        self._rounds = 0

    # ---------------------------------------------------------------- public

    @property
    def meter_ids(self) -> list[str]:
        """The ids of the simulated meters, in the order given."""
        return list(self._meters)

    @property
    def received_commands(self) -> list[ReceivedCommand]:
        """A snapshot of every command received so far: (meter_id, topic, payload, monotonic time)."""
        with self._lock:
            return list(self._received)

    @property
    def sent_replies(self) -> list[SentReply]:
        """A snapshot of every command reply published so far."""
        with self._lock:
            return list(self._replies)

    @property
    def published(self) -> int:
        """How many messages (packets) have been handed to paho so far."""
        with self._lock:
            return self._published

    @property
    def rounds(self) -> int:
        """How many publishing rounds (cadence batches or publish_round calls) have run."""
        with self._lock:
            return self._rounds

    def intervals(self, meter_id: str) -> tuple[float, float]:
        """A meter's current (RT_DATA, ENY_NOW) intervals in seconds."""
        with self._lock:
            meter = self._meters[meter_id]
            return meter.seconds_interval, meter.minutes_interval

    def start(self, cadence: bool = True) -> None:
        """Connect, subscribe to every meter's command topics, start publishing.

        With ``cadence`` the first readings go out as soon as the connection
        and subscriptions are up, then on each meter's interval. Without it
        the meters only answer commands and publish when ``publish_round`` is
        called, which makes counting tests deterministic.
        """
        if self._started:
            raise RuntimeError("simulator already started")
        self._started = True
        self._cadence = cadence
        self._connections = self._make_connections()
        for connection in self._connections:
            connection.start()
        self._scheduler = threading.Thread(target=self._run_scheduler, name="meter-simulator", daemon=True)
        self._scheduler.start()
        LOG.info(
            "simulating %d meter(s) on %s:%d over %d connection(s)%s",
            len(self._meters),
            self.host,
            self.port,
            len(self._connections),
            "" if cadence else " (no cadence: publish on request)",
        )

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Wait until every connection is up and its subscriptions acknowledged.

        Commands published before that could be lost, so tests call this
        before sending any.
        """
        deadline = time.monotonic() + timeout
        for connection in self._connections:
            if not connection.ready.wait(max(0.0, deadline - time.monotonic())):
                return False
        return bool(self._connections)

    def publish_round(self) -> int:
        """Publish one RT_DATA and one ENY_NOW reading per meter now.

        Energy counters advance as if one minutes-interval had passed.
        Returns the number of MQTT messages published (more than two per meter
        with split packets or spurious readings).
        """
        self._require_started()
        with self._lock:
            outbox = _Outbox()
            now = datetime.now()
            for meter in self._meters.values():
                self._build_seconds_reading(meter, now, outbox)
                self._build_minutes_reading(meter, now, outbox)
        return self._send(outbox)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the broker has acknowledged everything published so far."""
        deadline = time.monotonic() + timeout
        return all(connection.wait_drained(max(0.0, deadline - time.monotonic())) for connection in self._connections)

    def replay(self, path: str | Path, rate: float | None = None) -> int:
        """Publish each line of a capture file (``TOPIC PAYLOAD``) to its topic.

        ``rate`` is in messages per second (None: as fast as the window
        allows). Payloads go out byte for byte. Malformed lines are logged and
        skipped. Returns the number of messages published once the broker has
        acknowledged them all.
        """
        self._require_started()
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        connection = self._connections[0]
        began = time.monotonic()
        count = 0
        with open(path, encoding="utf-8") as capture:
            for line_number, line in enumerate(capture, start=1):
                if self._should_stop():
                    break
                try:
                    parsed = parse_capture_line(line)
                except ValueError as error:
                    LOG.warning("%s:%d skipped: %s", path, line_number, error)
                    continue
                if parsed is None:
                    continue
                if rate is not None:
                    self._sleep_until(began + count / rate)
                topic, payload = parsed
                if not connection.publish(topic, payload):
                    break
                count += 1
                with self._lock:
                    self._published += 1
        self.flush()
        LOG.info("replayed %d message(s) from %s", count, path)
        return count

    def interrupt(self) -> None:
        """Ask running loops to stop; safe to call from a signal handler.

        It only sets a flag (taking no lock), so it cannot deadlock with the
        thread it interrupts; call ``stop`` afterwards to clean up.
        """
        self._interrupted = True

    def stop(self, timeout: float = 5.0) -> None:
        """Stop publishing, wait briefly for in-flight publishes, disconnect."""
        if not self._started or self._stopping.is_set():
            return
        with self._lock:
            self._stopping.set()
            self._wakeup.notify_all()
        if self._scheduler is not None:
            self._scheduler.join(timeout)
        # Messages already handed to paho still go out before the disconnect.
        self.flush(timeout)
        for connection in self._connections:
            connection.close()
        LOG.info("simulator stopped after %d message(s)", self.published)

    def __enter__(self) -> MeterSimulator:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --------------------------------------------------------------- helpers

    def _require_started(self) -> None:
        if not self._started:
            raise RuntimeError("call start() first")

    def _should_stop(self) -> bool:
        return self._interrupted or self._stopping.is_set()

    def _sleep_until(self, due: float) -> None:
        """Sleep in short slices so an interrupt is noticed (never in a callback)."""
        while not self._should_stop():
            remaining = due - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, 0.1))

    def _make_connections(self) -> list[_Connection]:
        if not self._connection_per_meter:
            shared = self._connection(
                f"kpm33b-simulator-{uuid.uuid4().hex[:8]}", self._username, list(self._command_topics)
            )
            for meter in self._meters.values():
                meter.connection = shared
            return [shared]
        for meter in self._meters.values():
            # A real meter logs in with its own account; the client id is its id.
            meter.connection = self._connection(
                meter.meter_id,
                meter.meter_id[-8:],
                [self.topics.config_topic(meter.meter_id), self.topics.time_topic(meter.meter_id)],
            )
        return [meter.connection for meter in self._meters.values() if meter.connection is not None]

    def _connection(self, client_id: str, username: str | None, subscriptions: list[str]) -> _Connection:
        return _Connection(
            host=self.host,
            port=self.port,
            client_id=client_id,
            username=username,
            password=self._password,
            subscriptions=subscriptions,
            on_message=self._handle_command,
            should_stop=self._should_stop,
            max_in_flight=self._max_in_flight,
            subscribe_batch=self._subscribe_batch,
        )

    def _schedule(self, due: float, task: _Reading | _Reply) -> None:
        """Push a task on the heap; the caller holds the lock."""
        heapq.heappush(self._heap, (due, next(self._sequence), task))
        self._wakeup.notify()

    def _handle_command(self, topic: str, payload: bytes) -> None:
        """Record a command, apply it and queue the reply (paho's thread: no waiting)."""
        received_at = time.monotonic()
        targets = self._command_topics.get(topic, [])
        if not targets:
            LOG.warning("message on unexpected topic %s ignored", topic)
            return
        decoded = _decode_command(payload)
        if decoded is None:
            decoded = {"raw": payload.decode("utf-8", errors="replace")}
        with self._lock:
            for kind, meter_id in targets:
                meter = self._meters[meter_id]
                self._received.append(ReceivedCommand(meter_id, topic, decoded, received_at))
                LOG.info(
                    "meter %s received on %s (%s mode): %s",
                    meter_id,
                    topic,
                    meter.reply_mode,
                    payload.decode("utf-8", errors="replace"),
                )
                if meter.reply_mode == "none":
                    continue
                reply = command_reply(kind, payload, meter_id, fail=meter.reply_mode == "error")
                if reply is None:
                    LOG.info("meter %s ignores the command: oprid missing or not %d characters", meter_id, OPRID_LENGTH)
                    continue
                if reply["code"] == "01":
                    self._apply_command(meter, kind, payload, received_at)
                ack_topic = self.topics.meter_config_ack if kind == COMMAND_CONFIG else self.topics.meter_time_ack
                delay = self.reply_delay if meter.reply_mode == "delay" else 0.0
                self._schedule(received_at + delay, _Reply(meter_id, ack_topic, reply))

    def _apply_command(self, meter: _Meter, kind: CommandKind, payload: bytes, received_at: float) -> None:
        """Change a meter's cadence or clock as a real meter would; the caller holds the lock."""
        if kind == COMMAND_TIME:
            commanded = requested_time(payload)
            assert commanded is not None  # command_reply said "01"
            offset = commanded - datetime.now()
            # The command has 1 s resolution and took some ms to arrive: a
            # difference that small is "set correctly", not a skew to keep.
            meter.clock_offset = timedelta(0) if abs(offset) < timedelta(seconds=2) else offset
            LOG.info("meter %s clock set to %s", meter.meter_id, format_meter_time(commanded))
            return
        interval = requested_interval(payload)
        assert interval is not None
        unit, value = interval
        seconds = value * (60 if unit == "minutes" else 1) * self.interval_scale
        if unit == "seconds":
            meter.seconds_interval = seconds
            meter.seconds_generation += 1
            generation = meter.seconds_generation
        else:
            meter.minutes_interval = seconds
            meter.minutes_generation += 1
            generation = meter.minutes_generation
        LOG.info("meter %s %s interval set to %s (%g s)", meter.meter_id, unit, value, seconds)
        if self._cadence:
            # The old schedule entry is now stale (generation changed); the
            # next reading comes one new interval from now.
            self._schedule(received_at + seconds, _Reading(unit, meter.meter_id, generation))

    def _run_scheduler(self) -> None:
        """The one thread that publishes readings and replies when they fall due."""
        while not self._should_stop():
            if all(connection.ready.wait(0.1) for connection in self._connections):
                break
        if self._cadence and not self._should_stop():
            with self._lock:
                now = time.monotonic()
                for meter in self._meters.values():
                    self._schedule(now, _Reading("seconds", meter.meter_id, meter.seconds_generation))
                    self._schedule(now, _Reading("minutes", meter.meter_id, meter.minutes_generation))
        while not self._should_stop():
            replies: list[_Reply] = []
            outbox = _Outbox()
            with self._lock:
                while not self._should_stop():
                    now = time.monotonic()
                    if self._heap and self._heap[0][0] <= now:
                        break
                    timeout = self._heap[0][0] - now if self._heap else 0.5
                    self._wakeup.wait(min(timeout, 0.5))
                if self._should_stop():
                    return
                wall_clock = datetime.now()
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due, _, task = heapq.heappop(self._heap)
                    if isinstance(task, _Reply):
                        replies.append(task)
                    else:
                        self._due_reading(task, due, now, wall_clock, outbox)
            for reply in replies:
                self._send_reply(reply)
            if outbox.messages:
                self._send(outbox)

    def _due_reading(self, task: _Reading, due: float, now: float, wall_clock: datetime, outbox: _Outbox) -> None:
        """Build a due reading and schedule the next; the caller holds the lock."""
        meter = self._meters[task.meter_id]
        current = meter.seconds_generation if task.kind == "seconds" else meter.minutes_generation
        if task.generation != current:
            return  # superseded by an interval change
        interval = meter.seconds_interval if task.kind == "seconds" else meter.minutes_interval
        # Keep the cadence drift-free, but after a stall skip missed readings
        # instead of bursting them out.
        next_due = due + interval if due + interval > now else now + interval
        self._schedule(next_due, task)
        if task.kind == "seconds":
            self._build_seconds_reading(meter, wall_clock, outbox)
        else:
            self._build_minutes_reading(meter, wall_clock, outbox)

    def _packets(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        tag_count = len(payload) - len(ENVELOPE_KEYS)
        return split_packets(payload, min(self.packets, tag_count))

    def _build_seconds_reading(self, meter: _Meter, now: datetime, outbox: _Outbox) -> None:
        assert meter.connection is not None
        payload = rt_data_payload(meter.meter_id, meter.clock(now), meter.rng)
        for packet in self._packets(payload):
            outbox.messages.append((meter.connection, self.topics.meter_seconds_data, encode_payload(packet)))
        outbox.seconds_readings += 1
        outbox.meters.add(meter.meter_id)

    def _build_minutes_reading(self, meter: _Meter, now: datetime, outbox: _Outbox) -> None:
        assert meter.connection is not None
        # The counter advances by the energy of one interval at this meter's
        # load, at least 1 Wh so that every reading is strictly higher.
        meter.import_wh += max(1, round(meter.power_kw * meter.minutes_interval / 3.6))
        payload = eny_now_payload(meter.meter_id, meter.clock(now), meter.import_wh / 1000)
        readings = spurious_sequence(payload, format_meter_time(now)) if self.spurious else [payload]
        for reading in readings:
            for packet in self._packets(reading):
                outbox.messages.append((meter.connection, self.topics.meter_minutes_data, encode_payload(packet)))
        outbox.minutes_readings += 1
        outbox.meters.add(meter.meter_id)

    def _send(self, outbox: _Outbox) -> int:
        """Publish built messages through the window (never under the lock)."""
        sent = 0
        for connection, topic, payload in outbox.messages:
            if not connection.publish(topic, payload):
                break
            sent += 1
        with self._lock:
            self._published += sent
            self._rounds += 1
            round_number = self._rounds
        LOG.info(
            "round %d: %d %s and %d %s reading(s) from %d meter(s), %d message(s)",
            round_number,
            outbox.seconds_readings,
            self.topics.meter_seconds_data,
            outbox.minutes_readings,
            self.topics.meter_minutes_data,
            len(outbox.meters),
            sent,
        )
        return sent

    def _send_reply(self, reply: _Reply) -> None:
        meter = self._meters[reply.meter_id]
        assert meter.connection is not None
        if not meter.connection.publish(reply.topic, encode_payload(reply.reply)):
            return
        with self._lock:
            self._published += 1
            self._replies.append(SentReply(reply.meter_id, reply.topic, reply.reply, time.monotonic()))
        LOG.info("meter %s answered on %s: %s", reply.meter_id, reply.topic, encode_payload(reply.reply).decode())


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (kept separate so tests can inspect it)."""
    parser = argparse.ArgumentParser(
        prog="meter_simulator.py",
        description="Simulate Compere KPM33B meters publishing to an MQTT broker.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="broker host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=11883, help="broker port (default 11883)")
    parser.add_argument("--username", help="broker username (per-meter mode: ignored, last 8 of the id)")
    parser.add_argument("--password", help="broker password")
    parser.add_argument("--meters", type=_non_negative_int, default=3, help="number of meters (default 3)")
    parser.add_argument("--prefix", default="33B12259", help="id prefix (default 33B12259)")
    parser.add_argument(
        "--first-serial", type=_non_negative_int, default=50027, help="serial of the first meter (default 50027)"
    )
    parser.add_argument(
        "--seconds-interval",
        type=_positive_float,
        default=60.0,
        help="seconds between MQTT_RT_DATA readings (default 60)",
    )
    parser.add_argument(
        "--minutes-interval",
        type=_positive_float,
        default=60.0,
        help="seconds (not minutes) between MQTT_ENY_NOW readings (default 60)",
    )
    parser.add_argument("--silent", type=_non_negative_int, default=0, help="the last K meters never reply to commands")
    parser.add_argument(
        "--error", type=_non_negative_int, default=0, help='the K meters before the silent ones reply "code":"02"'
    )
    parser.add_argument(
        "--delay", type=_non_negative_int, default=0, help="the K meters before those reply after --reply-delay"
    )
    parser.add_argument("--reply-delay", type=float, default=5.0, help="seconds a delayed reply waits (default 5)")
    parser.add_argument(
        "--clock-2005",
        type=_non_negative_int,
        default=0,
        help="the first K meters have an unset clock (readings dated 2005)",
    )
    parser.add_argument("--packets", type=int, default=1, help="split each reading into N packets like a KPM37")
    parser.add_argument(
        "--spurious", action="store_true", help="after each ENY_NOW also send an all-zero copy and a duplicate"
    )
    parser.add_argument(
        "--interval-scale",
        type=_positive_float,
        default=1.0,
        help="multiply commanded intervals by this (e.g. 0.1 for a fast demo)",
    )
    parser.add_argument(
        "--connection-per-meter",
        action="store_true",
        help="one MQTT client per meter, username = last 8 characters of its id",
    )
    parser.add_argument("--replay", type=Path, metavar="FILE", help="publish a capture file instead, then exit")
    parser.add_argument("--rate", type=_positive_float, help="replay rate in messages per second (default: max)")
    parser.add_argument("--count", type=_non_negative_int, help="exit after N publishing rounds (one log line each)")
    parser.add_argument("--duration", type=_positive_float, help="exit after S seconds")
    parser.add_argument("--seed", type=int, help="random seed for reproducible values")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def reply_modes_for(ids: Sequence[str], silent: int, error: int, delay: int) -> dict[str, str]:
    """Assign reply modes from the end of the list: silent last, then error, then delay."""
    if silent + error + delay > len(ids):
        raise ValueError(f"--silent + --error + --delay = {silent + error + delay} exceeds {len(ids)} meters")
    modes = dict.fromkeys(ids, "prompt")
    position = len(ids)
    for mode, count in (("none", silent), ("error", error), ("delay", delay)):
        for meter_id in ids[position - count : position]:
            modes[meter_id] = mode
        position -= count
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until --count/--duration is reached or SIGINT/SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stdout, format="%(asctime)s %(levelname)s %(message)s")
    try:
        ids = [] if args.replay else meter_ids(args.meters, args.prefix, args.first_serial)
        modes = reply_modes_for(ids, args.silent, args.error, args.delay)
        if args.clock_2005 > len(ids):
            raise ValueError(f"--clock-2005 {args.clock_2005} exceeds {len(ids)} meters")
        clocks = {meter_id: ("2005" if index < args.clock_2005 else "now") for index, meter_id in enumerate(ids)}
        simulator = MeterSimulator(
            args.host,
            args.port,
            ids,
            username=args.username,
            password=args.password,
            seconds_interval=args.seconds_interval,
            minutes_interval=args.minutes_interval,
            reply_mode=modes,
            reply_delay=args.reply_delay,
            clock=clocks,
            packets=args.packets,
            spurious=args.spurious,
            connection_per_meter=args.connection_per_meter,
            interval_scale=args.interval_scale,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))

    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        # Only flags: a signal handler must not take locks the interrupted
        # code might hold.
        nonlocal stop_requested
        stop_requested = True
        simulator.interrupt()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    started = time.monotonic()
    simulator.start(cadence=args.replay is None)
    if args.replay is not None:
        if not args.replay.is_file():
            LOG.error("capture file %s not found", args.replay)
            simulator.stop()
            return 2
        while not simulator.wait_connected(1.0):
            if stop_requested:
                simulator.stop()
                return 0
            LOG.info("waiting for the broker at %s:%d", args.host, args.port)
        simulator.replay(args.replay, args.rate)
        simulator.stop()
        return 0

    warned = False
    while not stop_requested:
        if args.count is not None and simulator.rounds >= args.count:
            break
        if args.duration is not None and time.monotonic() - started >= args.duration:
            break
        if not warned and time.monotonic() - started > 5 and not simulator.wait_connected(0):
            LOG.warning("still waiting for the broker at %s:%d", args.host, args.port)
            warned = True
        time.sleep(0.05)
    simulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
