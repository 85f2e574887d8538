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
- spurious all-zero readings and exact repeats (what real meters send, see
  tests/fixtures) are dropped;
- the energy guard keeps the forwarded energy counter true: a value lower
  than the last one forwarded, or higher than the meter could have reached at
  its ``max_power_kw``, is held back until the meter's next readings show
  whether it was a glitch (dropped) or real (a counter reset, or a real jump:
  forwarded in order), so that a consumer such as Home Assistant's Energy
  dashboard never books a phantom reset or phantom consumption;
- the exported energy (``fygsz``, for the meters that ask for it) has a
  floor of its own: a value below it is published as ``null`` until
  ``RESET_READINGS`` readings in a row confirm a new count.

See doc/data_mapping.md for the mapping table.
"""

from __future__ import annotations

import calendar
import functools
import json
import math
import re
from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import orjson

from meter_table import METER_TIME, MeterIds, MeterTable
from topics import MINUTES, SECONDS, is_valid_meter_id

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
BASE_TAGS = frozenset(tag for tag, _name in VALUE_TAGS.values())

# The exported energy (kWh, solar installations), asked for per meter
# (meters.export_energy, meters.devices.<id>.export_energy): added to that meter's MINUTES payload.
EXPORT_TAG, EXPORT_FIELD = "fygsz", "active_energy_export"

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
DROP_ENERGY_DECREASE = "energy_decrease"  # lower than the last energy forwarded, and not a counter reset
DROP_IMPLAUSIBLE_RISE = "implausible_rise"  # a rise faster than max_power_kw that the next reading did not confirm
DROP_PART_EXPIRED = "part_expired"
DROP_PART_OVERFLOW = "part_overflow"
REJECTIONS = (REJECT_OVERSIZED, REJECT_NOT_UTF8, REJECT_NOT_JSON, REJECT_NOT_OBJECT, REJECT_BAD_METER_ID,
              REJECT_BAD_TIME, REJECT_BAD_ISEND, REJECT_BAD_VALUE)
# A lower energy is a counter reset once this many readings of the new count
# (the first lower one included) rose plausibly one after the other.
RESET_READINGS = 3
DEFAULT_MAX_POWER_KW = 500.0  # see config_loader.DEFAULT_MAX_POWER_KW


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
class Settled:
    """A reading the energy guard held back, now decided: forward ``message``, or it was dropped for ``reason``.

    ``token`` is what the caller handed in with the held packet (the proxy's
    internal message id, acknowledged only now).
    """

    token: object
    message: CleanMessage | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class GuardEvent:
    """Something the energy guard decided that an operator should hear of.

    ``kind`` is ``EVENT_RESET`` (a counter reset accepted: ``old`` → ``new``)
    or ``EVENT_IMPLAUSIBLE`` (a rise from ``old`` to ``new`` dropped).
    """

    kind: str
    meter_id: str
    old: float
    new: float


EVENT_RESET = "reset"
EVENT_IMPLAUSIBLE = "implausible"


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one raw packet.

    ``message`` to publish now, or a drop ``reason``, or neither: a held part
    of a split reading, or (``held``) an energy reading the guard holds back
    until the meter's next readings decide it. ``settled`` are earlier held
    readings that this packet decided, oldest first: they go before
    ``message``.
    """

    message: CleanMessage | None = None
    meter_id: str | None = None  # known once the packet was valid enough to name its meter
    reason: str | None = None
    detail: str = ""
    held: bool = False
    settled: tuple[Settled, ...] = ()
    events: tuple[GuardEvent, ...] = ()


# --- pure helpers -------------------------------------------------------------


def iso_time(meter_time: str) -> str:
    """``20260112163900`` → ``2026-01-12T16:39:00`` (the meter sends no zone)."""
    t = meter_time
    return f"{t[0:4]}-{t[4:6]}-{t[6:8]}T{t[8:10]}:{t[10:12]}:{t[12:14]}"


def clean_payload(kind: str, meter_id: str, meter_time: str, values: dict[str, float],
                  per_phase: Iterable[str] = (), export: bool = False) -> dict[str, object]:
    """The clean reading: id, ISO time and the one value; a missing tag is ``None``.

    ``per_phase`` groups (see PER_PHASE_FIELDS) add their fields to a SECONDS
    reading, and ``export`` the exported energy to a MINUTES reading, only
    for the meters that ask for them: the others keep the minimal payload
    that existing consumers parse.
    """
    tag, name = VALUE_TAGS[kind]
    payload: dict[str, object] = {"id": meter_id, "time": iso_time(meter_time), name: values.get(tag)}
    if kind == SECONDS:
        for group in per_phase:
            for phase_tag, field in PER_PHASE_FIELDS[group]:
                payload[field] = values.get(phase_tag)
    elif export:
        payload[EXPORT_FIELD] = values.get(EXPORT_TAG)
    return payload


class ExportFloor(NamedTuple):
    """The exported-energy guard's memory of one meter.

    ``value``: the last exported energy published; ``low`` and ``run``: the
    last of the readings in a row below it, and how many there were.
    """

    value: float
    low: float | None = None
    run: int = 0


def guard_export(floor: ExportFloor | None, value: float | None) -> tuple[float | None, ExportFloor | None]:
    """The exported energy to publish (``None``: withheld) and the floor after it.

    Kept simpler than the import guard, which holds whole readings: the
    exported counter never steps back. A value below the floor is withheld
    (the reading still goes, with ``null``), unless it is the
    ``RESET_READINGS``-th in a row below the floor, each at least the one
    before: then it is a counter reset, published, and the new floor. A
    missing or negative value is withheld and changes nothing.
    """
    if value is None or value < 0:
        return None, floor
    if floor is None or value >= floor.value:
        return value, ExportFloor(value)
    run = floor.run + 1 if floor.low is not None and value >= floor.low else 1
    if run >= RESET_READINGS:
        return value, ExportFloor(value)
    return None, ExportFloor(floor.value, value, run)


def encode_payload(payload: dict[str, object]) -> bytes:
    """The clean payload as published: JSON, the meter's precision kept."""
    return json.dumps(payload).encode()


def _reject_constant(name: str) -> float:
    raise ValueError(name)


# One decoder for every payload: ``json.loads`` with an argument builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _decode_strictly(raw: bytes) -> object:
    """The standard library's reading of a payload orjson refused, or Rejected with the reason.

    orjson (ten times faster on a reading) refuses what the standard library
    takes: a number no float can hold (``1e400``), a lone surrogate. Such a
    value in a tag the mapping does not use must not cost the reading, and in
    a mapped one it must be named: this path keeps the verdicts as they were.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Rejected(REJECT_NOT_UTF8, "payload is not UTF-8") from None
    try:
        return _DECODER.decode(text)
    except (ValueError, RecursionError):
        raise Rejected(REJECT_NOT_JSON, f"not JSON: {text[:60]!r}") from None


def _is_finite(value: float) -> bool:
    """Finite, and representable as a float (a 400-digit integer is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _every_mapped_tag(_meter_id: str) -> Container[str]:
    return ALL_MAPPED_TAGS


def parse_packet(raw: bytes, mapped_tags: Callable[[str], Container[str]] = _every_mapped_tag) -> Packet:
    """Validate one raw payload into a Packet, or raise Rejected with the reason.

    The tags the mapping uses for this meter (``mapped_tags(meter_id)``) must
    be finite numbers; any other tag that is not one (a firmware version
    string, say, as other models of the family send) is left out of the
    values, so it cannot spoil the reading nor be taken for a measurement.
    """
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise Rejected(REJECT_OVERSIZED, f"{len(raw)} bytes, more than {MAX_PAYLOAD_BYTES}")
    try:
        document = orjson.loads(raw)
    except orjson.JSONDecodeError:
        document = _decode_strictly(raw)
    if not isinstance(document, dict):
        raise Rejected(REJECT_NOT_OBJECT, f"JSON {type(document).__name__}, not an object")
    meter_id = document.pop("id", None)
    if not is_valid_meter_id(meter_id):
        raise Rejected(REJECT_BAD_METER_ID, f"id {str(meter_id)[:40]!r} is not 13 letters and digits")
    meter_time = document.pop("time", None)
    problem = _meter_time_problem(meter_time) if isinstance(meter_time, str) else "is not YYYYMMDDhhmmss"
    if problem is not None:
        raise Rejected(REJECT_BAD_TIME, f"meter {meter_id}: time {str(meter_time)[:40]!r} {problem}")
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
        mapped = mapped_tags(meter_id)
        for tag, value in list(values.items()):
            if isinstance(value, bool) or not isinstance(value, int | float) or not _is_finite(value):
                if tag not in mapped:
                    del values[tag]  # not a measurement the mapping uses: ignored
                    continue
                raise Rejected(REJECT_BAD_VALUE, f"meter {meter_id}: {str(tag)[:30]!r} is {str(value)[:30]!r}, "
                                                 "not a finite number")
    return Packet(meter_id=meter_id, time=meter_time, is_last=isend == "1", values=values)


@functools.lru_cache(maxsize=4096)
def meter_seconds(meter_time: str) -> int:
    """A valid meter time as seconds on its own clock (treated as UTC: only differences matter)."""
    return calendar.timegm(datetime.strptime(meter_time, "%Y%m%d%H%M%S").timetuple())


def plausible_rise(old: float, old_time: str | None, new: float, new_time: str, max_power_kw: float) -> bool:
    """Whether an energy counter can have gone from ``old`` to ``new`` (kWh) between two meter times.

    Never downwards; upwards by at most ``max_power_kw`` times the hours
    between the two readings on the meter's clock (no rise at all when the
    clock did not advance). With the earlier time unknown (a floor from an
    old state file) any rise is taken as plausible.
    """
    rise = new - old
    if rise < 0:
        return False
    if rise == 0 or old_time is None:
        return True
    hours = (meter_seconds(new_time) - meter_seconds(old_time)) / 3600
    # The slack absorbs the decimal rounding of the meter's three decimals.
    return rise <= max_power_kw * max(hours, 0.0) + 1e-9 * max(abs(new), 1.0)


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


ALL_MAPPED_TAGS = (BASE_TAGS | frozenset(tag for fields in PER_PHASE_FIELDS.values() for tag, _ in fields)
                   | {EXPORT_TAG})


@functools.lru_cache(maxsize=128)
def mapped_tags_for(per_phase: tuple[str, ...], export: bool = False) -> frozenset[str]:
    """The tags the mapping reads for a meter with these per-phase groups (and its exported energy)."""
    tags = BASE_TAGS | frozenset(tag for group in per_phase for tag, _name in PER_PHASE_FIELDS[group])
    return tags | {EXPORT_TAG} if export else tags


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


class _Held:
    """Energy readings of one meter the guard holds back, oldest first, and why.

    ``rise``: one reading above what the meter could have reached, waiting
    for the next to confirm it. Otherwise a run of readings below the last
    energy forwarded, each rising plausibly from the one before: a counter
    reset once it is ``RESET_READINGS`` long.
    """

    __slots__ = ("readings", "rise")

    def __init__(self, rise: bool, reading: tuple[str, float, CleanMessage, object]) -> None:
        self.rise = rise
        self.readings = [reading]  # (meter time, energy, clean message, caller's token)

    @property
    def last(self) -> tuple[str, float, CleanMessage, object]:
        return self.readings[-1]


# An energy not known yet is NaN (a valid energy is a finite number); the meter times are ``METER_TIME`` columns.
_NO_ENERGY = math.nan


class _TimeField:
    """A meter-time column of ``MeterMemory``'s table, seen as the text the processor compares."""

    def __init__(self, column: str) -> None:
        self.column = column

    def __get__(self, record: _MeterRecord, _owner: object = None) -> str | None:
        return record._table.time(self.column, record._slot)

    def __set__(self, record: _MeterRecord, meter_time: str | None) -> None:
        record._table.set_time(self.column, record._slot, meter_time)


class _SideField:
    """A rare per-meter value (the guard's held readings, the export floor), in a dict of ``MeterMemory``'s own."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __get__(self, record: _MeterRecord, _owner: object = None) -> Any:
        return getattr(record._memory, self.attribute).get(record.meter_id)

    def __set__(self, record: _MeterRecord, value: object) -> None:
        values = getattr(record._memory, self.attribute)
        if value is None:
            values.pop(record.meter_id, None)
        else:
            values[record.meter_id] = value


class _MeterRecord:
    """One meter's entry in ``MeterMemory``, seen through its slot in the table.

    Valid while that meter is in the table: its slot is freed (and may be
    another meter's) once it is evicted. The processor keeps one only while
    the meter's reading is handled. ``held`` and ``export`` are rare, so
    they live in dicts of their own.
    """

    __slots__ = ("_memory", "_slot", "_table", "meter_id")

    last_seconds = _TimeField("last_seconds")
    last_minutes = _TimeField("last_minutes")
    energy_time = _TimeField("energy_time")  # the meter time of the reading that carried ``energy``
    held = _SideField("_held")  # _Held | None
    export = _SideField("_export")  # ExportFloor | None: only for the meters that publish their exported energy

    def __init__(self, memory: MeterMemory, slot: int, meter_id: str) -> None:
        self._memory, self._table, self._slot, self.meter_id = memory, memory._table, slot, meter_id

    @property
    def energy(self) -> float | None:
        energy = self._table.column("energy")[self._slot]
        return None if math.isnan(energy) else energy

    @energy.setter
    def energy(self, energy: float | None) -> None:
        self._table.column("energy")[self._slot] = _NO_ENERGY if energy is None else energy


class MeterMemory:
    """What the filters remember per meter, bounded to ``max_meters`` (least recently seen go first).

    For each meter and kind, the meter time of the last forwarded reading (a
    repeat of it is a duplicate: meters repeat their latest reading); the
    last energy forwarded and its meter time (the energy guard's floor); and
    the energy readings the guard holds back. The floor is what must survive
    a restart: see ``restore_energy``.

    Kept in a ``MeterTable`` (arrays, see meter_table): a site may have
    100,000 meters, and a dict of records cost 152 bytes per meter once the
    fleet was heard again (a slotted record, a float, and the dict's table
    grown by moving each meter to the end); this costs 76 (20,000 meters).
    """

    def __init__(self, max_meters: int = 200_000, ids: MeterIds | None = None) -> None:
        self.max_meters = max_meters
        self._table = MeterTable({"last_seconds": METER_TIME, "last_minutes": METER_TIME, "energy_time": METER_TIME,
                                  "energy": "d"}, defaults={"energy": _NO_ENERGY}, ids=ids)
        self._held: dict[str, _Held] = {}
        self._export: dict[str, ExportFloor] = {}

    def _find(self, meter_id: str) -> _MeterRecord | None:
        slot = self._table.find(meter_id)
        return None if slot < 0 else _MeterRecord(self, slot, meter_id)

    def is_duplicate(self, meter_id: str, kind: str, meter_time: str, redelivered: bool = False) -> bool:
        """Whether a reading with this meter time counts as already forwarded (or already held).

        A repeat of the last forwarded time is a duplicate, and so is a repeat
        of the last energy reading held back. A reading the broker sends again
        (MQTT's DUP flag: a redelivery after a reconnect) is also one when it
        is not newer than the last forwarded reading: it was seen on the
        earlier connection. Meter times compare as their fixed-width digits do.
        """
        table = self._table
        slot = table.find(meter_id)
        if slot < 0:
            return False
        if kind == SECONDS:
            last = table.time("last_seconds", slot)
        else:  # after a restart only the floor's time is known: it was delivered
            last = table.time("last_minutes", slot)
            if last is None:
                last = table.time("energy_time", slot)
        if last is not None and (meter_time == last or (redelivered and meter_time < last)):
            return True
        held = self._held.get(meter_id) if self._held else None
        return kind == MINUTES and held is not None and held.last[0] == meter_time

    def last_energy(self, meter_id: str) -> float | None:
        """The last active energy forwarded for a meter, if any."""
        record = self._find(meter_id)
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
            record.energy_time = meter_time

    def restore_energy(self, meter_id: str, energy: float, meter_time: str | None = None) -> None:
        """Set the energy guard's floor of a meter (from the state file at start-up)."""
        record = self._touch(meter_id)
        record.energy = energy
        record.energy_time = meter_time

    def record(self, meter_id: str) -> _MeterRecord:
        """The meter's record, created when new (for the processor; valid while it handles this meter)."""
        return self._touch(meter_id)

    def _touch(self, meter_id: str) -> _MeterRecord:
        """The meter's record, moved to the most recently seen end; the oldest evicted beyond the bound."""
        table = self._table
        slot = table.find(meter_id)
        if slot >= 0:
            table.touch(slot)
        else:
            if len(table) >= self.max_meters:
                oldest = table.oldest()
                gone = table.meter_id(oldest)
                self._held.pop(gone, None)
                self._export.pop(gone, None)
                table.remove(oldest)
            slot = table.add(meter_id)
        return _MeterRecord(self, slot, meter_id)

    def energy_snapshot(self) -> dict[str, float]:
        """The last forwarded energy per meter, least recently seen first (called before the traffic starts)."""
        table = self._table
        energies = table.column("energy")
        return {table.meter_id(slot): energies[slot] for slot in table.slots() if not math.isnan(energies[slot])}

    def held_count(self) -> int:
        """How many energy readings the guard holds back, all meters together."""
        held = list(self._held.values())  # one step under the GIL: the network thread may change it
        return sum(len(h.readings) for h in held)

    def __len__(self) -> int:
        return len(self._table)


class MeterDataProcessor:
    """Raw packet in, clean message or drop reason out; counts every drop by reason.

    One instance per proxy; not thread-safe (the proxy calls it from one
    thread). ``excluded`` meters are dropped before anything is remembered.
    ``per_phase`` maps a meter id to the per-phase groups its SECONDS
    payload carries (see ``clean_payload``). ``max_power_kw`` is the energy
    guard's limit, ``max_power_by_meter`` its per-meter overrides.
    ``export_energy`` says whether MINUTES payloads carry the exported
    energy, ``export_by_meter`` its per-meter overrides.
    """

    def __init__(self, excluded: Iterable[str] = (), memory: MeterMemory | None = None,
                 assembler: PacketAssembler | None = None,
                 per_phase: Mapping[str, tuple[str, ...]] | None = None,
                 max_power_kw: float = DEFAULT_MAX_POWER_KW,
                 max_power_by_meter: Mapping[str, float] | None = None,
                 export_energy: bool = False, export_by_meter: Mapping[str, bool] | None = None) -> None:
        self.excluded = frozenset(excluded)
        self.per_phase = dict(per_phase or {})
        self.max_power_kw = max_power_kw
        self.max_power_by_meter = dict(max_power_by_meter or {})
        self.export_energy = export_energy
        self.export_by_meter = dict(export_by_meter or {})
        self.memory = memory if memory is not None else MeterMemory()
        self.assembler = assembler if assembler is not None else PacketAssembler()
        self.drops: Counter[str] = Counter()

    def exports(self, meter_id: str) -> bool:
        """Whether a meter's MINUTES payload carries its exported energy."""
        return self.export_by_meter.get(meter_id, self.export_energy)

    def _mapped_tags(self, meter_id: str) -> Container[str]:
        return mapped_tags_for(self.per_phase.get(meter_id, ()), self.exports(meter_id))

    def process(self, kind: str, raw: bytes, now: float, redelivered: bool = False,
                token: object = None) -> Outcome:
        """Map one raw payload of ``kind`` (SECONDS or MINUTES) received at ``now``.

        ``redelivered``: the broker sent it again (MQTT's DUP flag), see
        ``MeterMemory.is_duplicate``. ``token`` comes back in ``Settled``
        when the energy guard holds this reading and decides it later.
        """
        try:
            packet = parse_packet(raw, self._mapped_tags)
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
        energy = values.get(VALUE_TAGS[MINUTES][0]) if kind == MINUTES else None
        if energy is not None and energy < 0:
            self.drops[REJECT_BAD_VALUE] += 1
            return Outcome(meter_id=meter_id, reason=REJECT_BAD_VALUE,
                           detail=f"meter {meter_id}: energy {energy!r} is negative")
        reason = self._filter(kind, meter_id, packet.time, values, redelivered)
        if reason is not None:
            self.drops[reason] += 1
            return Outcome(meter_id=meter_id, reason=reason)
        export = kind == MINUTES and self.exports(meter_id)
        payload = clean_payload(kind, meter_id, packet.time, values, self.per_phase.get(meter_id, ()), export)
        if export:
            record = self.memory.record(meter_id)
            payload[EXPORT_FIELD], record.export = guard_export(record.export, values.get(EXPORT_TAG))
        message = CleanMessage(meter_id, kind, packet.time, payload)
        if energy is None:
            self.memory.remember(meter_id, kind, packet.time, None)
            return Outcome(message=message, meter_id=meter_id)
        return self._guard(meter_id, packet.time, float(energy), message, token)

    def _filter(self, kind: str, meter_id: str, meter_time: str, values: dict[str, float],
                redelivered: bool) -> str | None:
        if is_all_zero(values):
            return DROP_ALL_ZERO
        if self.memory.is_duplicate(meter_id, kind, meter_time, redelivered):
            return DROP_DUPLICATE
        return None

    # --- the energy guard ---------------------------------------------------------

    def _guard(self, meter_id: str, meter_time: str, energy: float, message: CleanMessage,
               token: object) -> Outcome:
        """Forward, hold or drop one energy reading; decide the readings held before it.

        The rules (doc/data_mapping.md): a reading that continues the floor
        (the last energy forwarded) plausibly is forwarded. One that rises
        faster than ``max_power_kw`` is held until the next reading: forwarded
        with it when that one continues from it plausibly, dropped otherwise.
        One below the floor, newer than it, is held as the possible start of a
        new count: when ``RESET_READINGS`` readings in a row rise plausibly
        from it, the reset is accepted and all of them forwarded in order; a
        reading that continues the old count instead drops them.
        """
        record = self.memory.record(meter_id)
        max_power = self.max_power_by_meter.get(meter_id, self.max_power_kw)
        reading = (meter_time, energy, message, token)
        settled: list[Settled] = []
        events: list[GuardEvent] = []
        held = record.held
        if held is not None:
            last_time, last_energy = held.last[0], held.last[1]
            continues_held = meter_time > last_time and plausible_rise(
                last_energy, last_time, energy, meter_time, max_power)
            if held.rise and continues_held:  # the jump was real: the meter goes on from it
                record.held = None
                settled.extend(self._forward(record, m_time, m_energy, m_message, m_token)
                               for m_time, m_energy, m_message, m_token in held.readings)
                return self._forwarded(record, reading, settled, events)
            if not held.rise and continues_held and not self._continues_floor(record, meter_time, energy,
                                                                                max_power):
                held.readings.append(reading)
                if len(held.readings) < RESET_READINGS:
                    return Outcome(meter_id=meter_id, held=True)
                record.held = None
                old = record.energy if record.energy is not None else held.readings[0][1]
                events.append(GuardEvent(EVENT_RESET, meter_id, old, held.readings[0][1]))
                settled.extend(self._forward(record, m_time, m_energy, m_message, m_token)
                               for m_time, m_energy, m_message, m_token in held.readings[:-1])
                return self._forwarded(record, reading, settled, events)
            # Not confirmed: the held readings were glitches.
            record.held = None
            reason = DROP_IMPLAUSIBLE_RISE if held.rise else DROP_ENERGY_DECREASE
            for _time, held_energy, _message, held_token in held.readings:
                self.drops[reason] += 1
                settled.append(Settled(held_token, reason=reason))
                if held.rise:
                    events.append(GuardEvent(EVENT_IMPLAUSIBLE, meter_id, record.energy or 0.0, held_energy))
        floor, floor_time = record.energy, record.energy_time
        if floor is None or self._continues_floor(record, meter_time, energy, max_power):
            return self._forwarded(record, reading, settled, events)
        if energy < floor and floor_time is not None and meter_time <= floor_time:
            # Older on the meter's clock than the floor: a reading sent again, not a new count.
            self.drops[DROP_ENERGY_DECREASE] += 1
            return Outcome(meter_id=meter_id, reason=DROP_ENERGY_DECREASE, settled=tuple(settled),
                           events=tuple(events))
        record.held = _Held(energy > floor, reading)
        return Outcome(meter_id=meter_id, held=True, settled=tuple(settled), events=tuple(events))

    @staticmethod
    def _continues_floor(record: _MeterRecord, meter_time: str, energy: float, max_power: float) -> bool:
        """Whether a reading goes on plausibly from the last energy forwarded."""
        if record.energy is None:
            return True
        return plausible_rise(record.energy, record.energy_time, energy, meter_time, max_power)

    @staticmethod
    def _forward(record: _MeterRecord, meter_time: str, energy: float, message: CleanMessage,
                 token: object) -> Settled:
        """A held reading released: it becomes the floor."""
        record.last_minutes = meter_time
        record.energy, record.energy_time = energy, meter_time
        return Settled(token, message=message)

    def _forwarded(self, record: _MeterRecord, reading: tuple[str, float, CleanMessage, object],
                   settled: list[Settled], events: list[GuardEvent]) -> Outcome:
        meter_time, energy, message, _token = reading
        record.last_minutes = meter_time
        record.energy, record.energy_time = energy, meter_time
        return Outcome(message=message, meter_id=message.meter_id, settled=tuple(settled), events=tuple(events))
