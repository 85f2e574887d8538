"""Pure mapping of raw KPM33B messages to clean per-meter messages.

No I/O and no paho here: the proxy hands in a topic kind, the raw payload and
the current time, and gets back either a clean message to publish or the
reason it was dropped. Everything the meters do wrong in the field is handled
here, where it can be tested exhaustively:

- hostile input (not JSON, not an object, a meter id that would inject topic
  levels such as ``/``, ``+`` or ``#``, non-finite or non-numeric values,
  oversized payloads) is rejected with a reason;
- payloads split over several packets (``isend`` ``"0"`` … ``"1"``, KPM37 and
  others) are reassembled, with pending parts bounded in number and age;
- spurious all-zero readings, exact repeats and energy counters going
  backwards (what real meters send, see tests/fixtures) are dropped, so that a
  consumer such as Home Assistant's Energy dashboard never books a reset.

See doc/data_mapping.md for the mapping table.
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

SECONDS = "seconds"
MINUTES = "minutes"
KINDS = (SECONDS, MINUTES)

# The tag of the one value each clean message carries, and its clean name.
VALUE_TAGS = {SECONDS: ("zyggl", "active_power"), MINUTES: ("zygsz", "active_energy")}

# Optional per-phase values, asked for per meter (meters.devices.<id>.per_phase):
# group → (tag, clean name) pairs added to that meter's SECONDS payload.
PER_PHASE_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "voltage": (("ua", "voltage_l1"), ("ub", "voltage_l2"), ("uc", "voltage_l3")),
    "current": (("ia", "current_l1"), ("ib", "current_l2"), ("ic", "current_l3")),
    "power": (("pa", "active_power_l1"), ("pb", "active_power_l2"), ("pc", "active_power_l3")),
    "power_factor": (("pfa", "power_factor_l1"), ("pfb", "power_factor_l2"), ("pfc", "power_factor_l3"),
                     ("zglys", "power_factor")),
}
PER_PHASE_GROUPS = tuple(PER_PHASE_FIELDS)

METER_ID_PATTERN = re.compile(r"[0-9A-Za-z]{13}")
METER_TIME_PATTERN = re.compile(r"[0-9]{14}")
MAX_PAYLOAD_BYTES = 16 * 1024  # meters send well under 1 KB; JSON parsing is the costly step

# Drop and rejection reasons, as counted and reported.
REJECT_OVERSIZED = "oversized"
REJECT_NOT_UTF8 = "not_utf8"
REJECT_NOT_JSON = "not_json"
REJECT_NOT_OBJECT = "not_object"
REJECT_BAD_METER_ID = "bad_meter_id"
REJECT_BAD_TIME = "bad_time"
REJECT_BAD_ISEND = "bad_isend"
REJECT_BAD_VALUE = "bad_value"
DROP_EXCLUDED = "excluded"
DROP_DUPLICATE = "duplicate"
DROP_ALL_ZERO = "all_zero"
DROP_ENERGY_DECREASE = "energy_decrease"
DROP_PART_EXPIRED = "part_expired"
DROP_PART_OVERFLOW = "part_overflow"
REJECTIONS = (REJECT_OVERSIZED, REJECT_NOT_UTF8, REJECT_NOT_JSON, REJECT_NOT_OBJECT, REJECT_BAD_METER_ID,
              REJECT_BAD_TIME, REJECT_BAD_ISEND, REJECT_BAD_VALUE)


class Rejected(Exception):
    """A raw message that is not a valid meter packet; ``reason`` is one of REJECTIONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Packet:
    """One validated raw packet: a complete reading, or one part of a split one."""

    meter_id: str
    time: str  # the meter's clock, YYYYMMDDhhmmss
    is_last: bool
    values: dict[str, float]


@dataclass(frozen=True, slots=True)
class CleanMessage:
    """A clean message ready to publish on the central broker."""

    meter_id: str
    kind: str  # SECONDS or MINUTES
    time: str  # the meter's clock, YYYYMMDDhhmmss
    payload: dict[str, object]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one raw packet: a message, a drop reason, or neither (a held part)."""

    message: CleanMessage | None = None
    meter_id: str | None = None  # known once the packet was valid enough to name its meter
    reason: str | None = None
    detail: str = ""


# --- pure helpers -------------------------------------------------------------


def iso_time(meter_time: str) -> str:
    """``20260112163900`` → ``2026-01-12T16:39:00`` (the meter sends no zone)."""
    t = meter_time
    return f"{t[0:4]}-{t[4:6]}-{t[6:8]}T{t[8:10]}:{t[10:12]}:{t[12:14]}"


def is_valid_meter_id(value: object) -> bool:
    """Exactly 13 letters and digits: nothing that could add or match topic levels."""
    return isinstance(value, str) and METER_ID_PATTERN.fullmatch(value) is not None


def clean_topic(main_topic: str, meter_id: str, kind: str) -> str:
    """``<main>/<id>/seconds`` and friends; ``meter_id`` must be valid already."""
    return f"{main_topic}/{meter_id}/{kind}"


def clean_payload(kind: str, meter_id: str, meter_time: str, values: dict[str, float],
                  per_phase: Iterable[str] = ()) -> dict[str, object]:
    """The clean reading: id, ISO time and the one value; a missing tag is ``None``.

    ``per_phase`` groups (see PER_PHASE_FIELDS) add their fields to a SECONDS
    reading, only for the meters that ask for them: the others keep the
    minimal payload that existing consumers parse.
    """
    tag, name = VALUE_TAGS[kind]
    payload: dict[str, object] = {"id": meter_id, "time": iso_time(meter_time), name: values.get(tag)}
    if kind == SECONDS:
        for group in per_phase:
            for phase_tag, field in PER_PHASE_FIELDS[group]:
                payload[field] = values.get(phase_tag)
    return payload


def encode_payload(payload: dict[str, object]) -> bytes:
    """The clean payload as published: JSON, the meter's precision kept."""
    return json.dumps(payload).encode()


def _reject_constant(name: str) -> float:
    raise ValueError(name)


def _is_finite(value: float) -> bool:
    """Finite, and representable as a float (a 400-digit integer is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_packet(raw: bytes) -> Packet:
    """Validate one raw payload into a Packet, or raise Rejected with the reason."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise Rejected(REJECT_OVERSIZED, f"{len(raw)} bytes, more than {MAX_PAYLOAD_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(REJECT_NOT_UTF8, "payload is not UTF-8") from None
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise Rejected(REJECT_NOT_JSON, f"not JSON: {text[:60]!r}") from None
    if not isinstance(document, dict):
        raise Rejected(REJECT_NOT_OBJECT, f"JSON {type(document).__name__}, not an object")
    meter_id = document.pop("id", None)
    if not is_valid_meter_id(meter_id):
        raise Rejected(REJECT_BAD_METER_ID, f"id {str(meter_id)[:40]!r} is not 13 letters and digits")
    meter_id = sys.intern(meter_id)  # one string per meter, however many structures key on it
    meter_time = document.pop("time", None)
    problem = _meter_time_problem(meter_time) if isinstance(meter_time, str) else "is not YYYYMMDDhhmmss"
    if problem is not None:
        raise Rejected(REJECT_BAD_TIME, f"meter {meter_id}: time {str(meter_time)[:40]!r} {problem}")
    meter_time = sys.intern(meter_time)  # a fleet reports the same few times: remembered once
    isend = document.pop("isend", "1")
    if isend not in ("0", "1"):
        raise Rejected(REJECT_BAD_ISEND, f"meter {meter_id}: isend {str(isend)[:20]!r} is not \"0\" or \"1\"")
    # What is left are the measured values. One C-level pass checks them all in the
    # usual case; only a payload that fails it (or holds a boolean, which fsum would
    # take for a number) is checked value by value, to name the culprit.
    values: dict[str, float] = document
    try:
        all_finite = math.isfinite(math.fsum(values.values()))
    except (TypeError, OverflowError):
        all_finite = False
    if not all_finite or b"true" in raw or b"false" in raw:
        for tag, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not _is_finite(value):
                raise Rejected(REJECT_BAD_VALUE, f"meter {meter_id}: {str(tag)[:30]!r} is {str(value)[:30]!r}, "
                                                 "not a finite number")
    return Packet(meter_id=meter_id, time=meter_time, is_last=isend == "1", values=values)


@functools.lru_cache(maxsize=4096)
def _meter_time_problem(text: str) -> str | None:
    """What is wrong with a meter time, if anything; cached, since a fleet reports the same few times."""
    if not METER_TIME_PATTERN.fullmatch(text):
        return "is not YYYYMMDDhhmmss"
    try:
        datetime.strptime(text, "%Y%m%d%H%M%S")
    except ValueError:
        return "is not a date"
    return None


def is_all_zero(values: dict[str, float]) -> bool:
    """Whether a reading measured nothing: no values, or every value zero."""
    return not any(values.values())


# --- stateful pieces, still pure (time is passed in) ---------------------------


class PacketAssembler:
    """Holds the parts of split readings until the part with ``isend`` ``"1"`` arrives.

    Keyed by kind, meter id and meter time. At most ``max_pending`` readings are
    held and none longer than ``max_age`` seconds, so a flood of never-finished
    parts with fake ids cannot grow memory without limit.
    """

    def __init__(self, max_pending: int = 10_000, max_age: float = 120.0) -> None:
        self.max_pending = max_pending
        self.max_age = max_age
        self._pending: OrderedDict[tuple[str, str, str], tuple[float, dict[str, float]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, kind: str, packet: Packet, now: float) -> tuple[dict[str, float] | None, list[str]]:
        """Add one packet: the merged values when the reading is complete, and drop reasons."""
        drops = self.expire(now)
        key = (kind, packet.meter_id, packet.time)
        if packet.is_last:
            held = self._pending.pop(key, None)
            if held is None:
                return packet.values, drops
            merged = held[1]
            merged.update(packet.values)
            return merged, drops
        held = self._pending.get(key)
        if held is None:
            if len(self._pending) >= self.max_pending:
                self._pending.popitem(last=False)
                drops.append(DROP_PART_OVERFLOW)
            self._pending[key] = (now, dict(packet.values))
        else:
            held[1].update(packet.values)
        return None, drops

    def expire(self, now: float) -> list[str]:
        """Forget readings whose last part never came; one drop reason each."""
        drops: list[str] = []
        while self._pending:
            key, (started, _values) = next(iter(self._pending.items()))
            if now - started <= self.max_age:
                break
            del self._pending[key]
            drops.append(DROP_PART_EXPIRED)
        return drops


class _MeterRecord:
    """The filters' memory of one meter: compact, since there may be 100,000 of them.

    The times are references to interned strings (a fleet shares them), so a
    record costs its slots and the energy's float.
    """

    __slots__ = ("energy", "last_minutes", "last_seconds")

    def __init__(self) -> None:
        self.last_seconds: str | None = None
        self.last_minutes: str | None = None
        self.energy: float | None = None


class MeterMemory:
    """What the filters remember per meter, bounded to ``max_meters`` (least recently seen go first).

    For each meter and kind, the meter time of the last forwarded reading (a
    repeat of it is a duplicate: meters repeat their latest reading), and the
    last energy forwarded (the counter guard, which also stops an older
    reading sent again). The energy is what must survive a restart: see
    ``energy_snapshot`` and ``restore_energy``.
    """

    def __init__(self, max_meters: int = 200_000) -> None:
        self.max_meters = max_meters
        # A plain dict keeps insertion order at half an OrderedDict's size per entry;
        # a meter is moved to the young end by taking it out and putting it back.
        self._meters: dict[str, _MeterRecord] = {}

    def is_duplicate(self, meter_id: str, kind: str, meter_time: str, redelivered: bool = False) -> bool:
        """Whether a reading with this meter time counts as already forwarded.

        A repeat of the last forwarded time is a duplicate. A reading the broker
        sends again (MQTT's DUP flag: a redelivery after a reconnect) is also one
        when it is not newer than the last forwarded reading: it was seen on the
        earlier connection. Meter times compare as text (fixed-width digits).
        """
        record = self._meters.get(meter_id)
        if record is None:
            return False
        last = record.last_seconds if kind == SECONDS else record.last_minutes
        return last is not None and (meter_time == last or (redelivered and meter_time < last))

    def last_energy(self, meter_id: str) -> float | None:
        """The last active energy forwarded for a meter, if any."""
        record = self._meters.get(meter_id)
        return None if record is None else record.energy

    def remember(self, meter_id: str, kind: str, meter_time: str, energy: float | None) -> None:
        """Record a forwarded reading."""
        record = self._touch(meter_id)
        if kind == SECONDS:
            record.last_seconds = meter_time
        else:
            record.last_minutes = meter_time
        if energy is not None:
            record.energy = energy

    def restore_energy(self, meter_id: str, energy: float) -> None:
        """Set the last forwarded energy of a meter (from the state file at start-up)."""
        self._touch(meter_id).energy = energy

    def _touch(self, meter_id: str) -> _MeterRecord:
        """The meter's record, moved to the most recently seen end; the oldest evicted beyond the bound."""
        record = self._meters.pop(meter_id, None)
        if record is None:
            record = _MeterRecord()
            if len(self._meters) >= self.max_meters:
                del self._meters[next(iter(self._meters))]
        self._meters[meter_id] = record
        return record

    def energy_snapshot(self) -> dict[str, float]:
        """The last forwarded energy per meter, to persist."""
        # list() copies in one step under the GIL: the proxy's network thread may be adding meters.
        records = list(self._meters.items())
        return {meter_id: r.energy for meter_id, r in records if r.energy is not None}

    def __len__(self) -> int:
        return len(self._meters)


class MeterDataProcessor:
    """Raw packet in, clean message or drop reason out; counts every drop by reason.

    One instance per proxy; not thread-safe (the proxy calls it from one
    thread). ``excluded`` meters are dropped before anything is remembered.
    ``per_phase`` maps a meter id to the per-phase groups its SECONDS
    payload carries (see ``clean_payload``).
    """

    def __init__(self, excluded: Iterable[str] = (), memory: MeterMemory | None = None,
                 assembler: PacketAssembler | None = None,
                 per_phase: Mapping[str, tuple[str, ...]] | None = None) -> None:
        self.excluded = frozenset(excluded)
        self.per_phase = dict(per_phase or {})
        self.memory = memory if memory is not None else MeterMemory()
        self.assembler = assembler if assembler is not None else PacketAssembler()
        self.drops: Counter[str] = Counter()

    def process(self, kind: str, raw: bytes, now: float, redelivered: bool = False) -> Outcome:
        """Map one raw payload of ``kind`` (SECONDS or MINUTES) received at ``now``.

        ``redelivered``: the broker sent it again (MQTT's DUP flag), see ``MeterMemory.is_duplicate``.
        """
        try:
            packet = parse_packet(raw)
        except Rejected as rejected:
            self.drops[rejected.reason] += 1
            return Outcome(reason=rejected.reason, detail=rejected.detail)
        meter_id = packet.meter_id
        if meter_id in self.excluded:
            self.drops[DROP_EXCLUDED] += 1
            return Outcome(meter_id=meter_id, reason=DROP_EXCLUDED)
        values, part_drops = self.assembler.add(kind, packet, now)
        for reason in part_drops:
            self.drops[reason] += 1
        if values is None:
            return Outcome(meter_id=meter_id)
        reason = self._filter(kind, meter_id, packet.time, values, redelivered)
        if reason is not None:
            self.drops[reason] += 1
            return Outcome(meter_id=meter_id, reason=reason)
        payload = clean_payload(kind, meter_id, packet.time, values, self.per_phase.get(meter_id, ()))
        energy = payload.get("active_energy") if kind == MINUTES else None
        self.memory.remember(meter_id, kind, packet.time, energy if isinstance(energy, float | int) else None)
        return Outcome(message=CleanMessage(meter_id, kind, packet.time, payload), meter_id=meter_id)

    def _filter(self, kind: str, meter_id: str, meter_time: str, values: dict[str, float],
                redelivered: bool) -> str | None:
        if is_all_zero(values):
            return DROP_ALL_ZERO
        if self.memory.is_duplicate(meter_id, kind, meter_time, redelivered):
            return DROP_DUPLICATE
        if kind == MINUTES:
            energy = values.get(VALUE_TAGS[MINUTES][0])
            last = self.memory.last_energy(meter_id)
            if energy is not None and last is not None and energy < last:
                return DROP_ENERGY_DECREASE
        return None
