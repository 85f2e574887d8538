"""A compact table of meters: per-meter state in arrays, not in a Python object per meter.

Why: a site may have 100,000 meters. Kept in a dict, each meter costs its
key's share of the dict's table (38 bytes, twice that once entries are moved
to the end, as least-recently-used orders do) and at least one object per
value (a float is 24 bytes, a tuple 56, a slotted record 80), scattered
among the short-lived objects of the traffic, where they keep the
allocator's pools from being given back. Here a meter is 13 bytes of id, a
few bytes of hash index and of list links, and its columns: 8 bytes for a
float or an integer, 4 for a meter time.

The ids are meter ids as validated at the edge (``topics.is_valid_meter_id``):
13 ASCII letters and digits. A meter has a *slot*, a small integer that
indexes every array, and keeps it while it is in the table (the arrays are
extended in place as the table grows).

Several tables may keep the same fleet (the proxy's filters, energy
journal, availability and Home Assistant discovery each keep every meter):
they share one ``MeterIds``, so that each id and its hash index are kept
once, not once per table (100,000 meters: 2.6 MB a table). Without one, a
table has its own.

Meters are kept in ordered lists (``lists`` of them, oldest first): a meter
is in exactly one. ``touch`` moves it to the young end of a list, in
constant time and without growing anything (a dict grows when an entry is
taken out and put back).

A table is not thread-safe: its owner serialises access. ``MeterIds`` is:
the tables sharing it belong to different threads.
"""

from __future__ import annotations

import functools
import threading
from array import array
from collections.abc import Iterator, Mapping

ID_LENGTH = 13
_NONE = -1  # no slot: an empty index cell, the end of a list
_SMALLEST = 16  # slots allocated at least
_MOST_HOLDERS = 255  # tables that may hold one meter (a byte each): a process has a handful

# A column of meter times (``YYYYMMDDhhmmss`` text, or None): four bytes a meter, where the number the 14 digits
# spell takes eight. Each time is kept as its ``time_code``; a time without one (a clock set before 2000 or after
# 2132) is kept aside, as text, in a dict of the table's.
METER_TIME = "meter time"
TIME_EPOCH = 2000  # the year of code 0
_NO_TIME = 0xFFFFFFFF  # a time column's value for no time
_ASIDE = 0xFFFFFFFE  # the time is in the table's dict
_LAST_CODE = _ASIDE - 1


@functools.lru_cache(maxsize=4096)
def time_code(meter_time: str) -> int:
    """A meter time as an unsigned 32-bit number that sorts as the text does; ``_ASIDE`` when it has none.

    Seconds since 2000 counted with months of 31 days: no calendar to
    consult, still in order, and ``time_text`` gives the text back. Cached:
    a fleet reports the same few times.
    """
    if not (len(meter_time) == 14 and meter_time.isascii() and meter_time.isdigit()):
        return _ASIDE
    year, month, day = int(meter_time[:4]) - TIME_EPOCH, int(meter_time[4:6]), int(meter_time[6:8])
    hour, minute, second = int(meter_time[8:10]), int(meter_time[10:12]), int(meter_time[12:14])
    if not (year >= 0 and 1 <= month <= 12 and 1 <= day <= 31 and hour < 24 and minute < 60 and second < 60):
        return _ASIDE
    code = ((((year * 12 + month - 1) * 31 + day - 1) * 24 + hour) * 60 + minute) * 60 + second
    return code if code <= _LAST_CODE else _ASIDE


@functools.lru_cache(maxsize=4096)
def time_text(code: int) -> str:
    """The meter time of a ``time_code``."""
    rest, second = divmod(code, 60)
    rest, minute = divmod(rest, 60)
    rest, hour = divmod(rest, 24)
    rest, day = divmod(rest, 31)
    year, month = divmod(rest, 12)
    return f"{year + TIME_EPOCH:04d}{month + 1:02d}{day + 1:02d}{hour:02d}{minute:02d}{second:02d}"


class MeterIds:
    """Meter ids ↔ slots, for the tables that share them; thread-safe.

    A slot is the meter's for as long as some table holds it (``hold`` and
    ``release`` count the tables); then it is free for another meter. Slots
    are never renumbered: the tables index their own arrays by them. The ids
    grow by an eighth in place when they are all in use, and are given back only
    once no table holds any meter (a fleet that shrinks for good keeps its
    free slots, which new meters reuse).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._allocate(_SMALLEST)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids = bytearray(capacity * ID_LENGTH)
        self._holders = bytearray(capacity)  # how many tables hold each slot's meter (0: free)
        size = 1 << (2 * capacity - 1).bit_length()  # at least twice the capacity: probes stay short
        self._index = array("i", [_NONE]) * size
        self._mask = size - 1
        self._used = 0  # slots handed out so far
        self._free = array("i")  # slots given back, handed out again first
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def find(self, meter_id: str) -> int:
        """The meter's slot, or -1 when no table holds it (also for a text that is not ASCII)."""
        key = meter_id.encode("ascii", "replace")  # not ASCII: not a meter id, so never found (no exception)
        with self._lock:
            return self._lookup(meter_id, key)

    def hold(self, meter_id: str) -> int:
        """The meter's slot, for one more table (a new slot if no table holds it yet).

        Raises ValueError for an id that is not 13 ASCII characters.
        """
        key = meter_id.encode("ascii") if meter_id.isascii() else b""
        if len(key) != ID_LENGTH:
            raise ValueError(f"not a meter id: {meter_id!r}")
        with self._lock:
            slot = self._lookup(meter_id, key)
            if slot == _NONE:
                slot = self._add(meter_id, key)
            holders = self._holders[slot]
            if holders == _MOST_HOLDERS:
                raise RuntimeError(f"meter {meter_id} is held by {holders} tables already")
            self._holders[slot] = holders + 1
            return slot

    def release(self, slot: int) -> None:
        """A table no longer holds the meter in ``slot``: the slot is free once no table does."""
        with self._lock:
            holders = self._holders[slot] - 1
            self._holders[slot] = holders
            if holders:
                return
            self._unindex(slot)
            self._count -= 1
            if self._count:
                self._free.append(slot)
            else:
                self._allocate(_SMALLEST)  # no meter left: give the memory back at once

    def meter_id(self, slot: int) -> str:
        """The id of the meter in ``slot`` (held by the caller's table, so it cannot change meanwhile)."""
        start = slot * ID_LENGTH
        return self._ids[start:start + ID_LENGTH].decode("ascii")

    def prefix(self, slots: int) -> bytes:
        """The ids of the first ``slots`` slots, copied in one C call (free ones included)."""
        return bytes(self._ids[:slots * ID_LENGTH])

    # --- inside (with the lock held) --------------------------------------------------

    def _lookup(self, meter_id: str, key: bytes) -> int:
        ids, index, mask = self._ids, self._index, self._mask
        cell = hash(meter_id) & mask
        while True:
            slot = index[cell]
            if slot == _NONE:
                return _NONE
            start = slot * ID_LENGTH
            if ids[start:start + ID_LENGTH] == key:
                return slot
            cell = (cell + 1) & mask

    def _add(self, meter_id: str, key: bytes) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            if self._used == self.capacity:
                self._grow(self.capacity + self.capacity // 8)  # an eighth more: every table pays for the room unused
            slot = self._used
            self._used += 1
        start = slot * ID_LENGTH
        self._ids[start:start + ID_LENGTH] = key
        index, mask = self._index, self._mask
        cell = hash(meter_id) & mask
        while index[cell] != _NONE:
            cell = (cell + 1) & mask
        index[cell] = slot
        self._count += 1
        return slot

    def _unindex(self, slot: int) -> None:
        """Remove a slot from the hash index, shifting back the cells after it (linear probing)."""
        index, mask = self._index, self._mask
        cell = hash(self.meter_id(slot)) & mask
        while index[cell] != slot:
            cell = (cell + 1) & mask
        hole = cell
        cell = (cell + 1) & mask
        while (other := index[cell]) != _NONE:
            home = hash(self.meter_id(other)) & mask
            # ``other`` may fill the hole when its home cell is not in (hole, cell] (cyclically).
            if (cell - home) & mask >= (cell - hole) & mask:
                index[hole] = other
                hole = cell
            cell = (cell + 1) & mask
        index[hole] = _NONE

    def _grow(self, capacity: int) -> None:
        """Room for ``capacity`` meters, every slot kept where it is: the ids extended, the index rebuilt.

        In place and without moving a meter, so that a fleet appearing at once
        (100,000 meters at a start) costs one hash per meter and growth, not a
        copy of each meter in Python; and a table's slots stay valid.
        """
        extra = capacity - self.capacity
        self._ids.extend(bytes(extra * ID_LENGTH))
        self._holders.extend(bytes(extra))
        self.capacity = capacity
        size = 1 << (2 * capacity - 1).bit_length()
        if size == len(self._index):
            return
        index = self._index = array("i", [_NONE]) * size
        mask = self._mask = size - 1
        ids = self._ids
        for slot in range(self._used):  # all held: the ids grow only when no slot is free
            start = slot * ID_LENGTH
            cell = hash(ids[start:start + ID_LENGTH].decode("ascii")) & mask
            while index[cell] != _NONE:
                cell = (cell + 1) & mask
            index[cell] = slot


class MeterTable:
    """Meter ids ↔ slots, in ``lists`` ordered lists, with typed columns (``array`` typecode per name).

    ``defaults`` gives each column's value for a new meter (0 unless given).
    A ``METER_TIME`` column is read and written with ``time`` and
    ``set_time`` (a new meter has None).
    ``ids`` are the ids shared with other tables (a table of its own
    otherwise). The columns are ``array`` objects reached with
    ``column(name)``, indexed by slot; a slot is the meter's while it is in
    the table, and a column is valid until the table is emptied (its arrays
    are then given back).
    """

    def __init__(self, columns: Mapping[str, str] | None = None, defaults: Mapping[str, float] | None = None,
                 lists: int = 1, ids: MeterIds | None = None) -> None:
        self._ids = ids if ids is not None else MeterIds()
        columns, defaults = dict(columns or {}), dict(defaults or {})
        times = [name for name, kind in columns.items() if kind == METER_TIME]
        self._types = {**columns, **dict.fromkeys(times, "I")}
        self._defaults = {name: defaults.get(name, 0) for name in columns} | dict.fromkeys(times, _NO_TIME)
        # The times without a code, by column and slot: rare, so a dict (emptied with their meters).
        self._aside: dict[str, dict[int, str]] = {name: {} for name in times}
        self._heads = [_NONE] * lists
        self._tails = [_NONE] * lists
        self._counts = [0] * lists
        self._allocate(0)

    def _allocate(self, capacity: int) -> None:
        """Arrays for ``capacity`` slots, no meter in any list (the columns are replaced)."""
        self._capacity = capacity
        self._prev = array("i", [_NONE]) * capacity
        self._next = array("i", [_NONE]) * capacity
        self._list = array("b", [_NONE]) * capacity  # -1: not in this table
        self._columns = {name: array(kind, [self._defaults[name]]) * capacity for name, kind in self._types.items()}
        for aside in self._aside.values():
            aside.clear()
        self._size = 0
        self._heads[:] = [_NONE] * len(self._heads)
        self._tails[:] = [_NONE] * len(self._tails)
        self._counts[:] = [0] * len(self._counts)
        self._recent_id, self._recent_slot = "", _NONE  # see ``find``

    # --- looking up -----------------------------------------------------------------

    def find(self, meter_id: str) -> int:
        """The meter's slot, or -1 when it is not in the table.

        The last meter found or added is remembered: a reading asks about
        its meter several times (is it a duplicate, then record it).
        """
        if meter_id == self._recent_id:
            return self._recent_slot
        if not self._size:  # empty (as a waiting list mostly is): nothing to look up
            return _NONE
        slot = self._ids.find(meter_id)
        if slot == _NONE or slot >= self._capacity or self._list[slot] == _NONE:
            return _NONE  # not held by any table, or by others only
        self._recent_id, self._recent_slot = meter_id, slot
        return slot

    def __contains__(self, meter_id: str) -> bool:
        return self.find(meter_id) != _NONE

    def meter_id(self, slot: int) -> str:
        """The id of the meter in ``slot``."""
        return self._ids.meter_id(slot)

    def column(self, name: str) -> array:
        """The array of one column, indexed by slot."""
        return self._columns[name]

    def time(self, name: str, slot: int) -> str | None:
        """The meter time in a ``METER_TIME`` column, or None."""
        code = self._columns[name][slot]
        if code < _ASIDE:
            return time_text(code)
        return None if code == _NO_TIME else self._aside[name][slot]

    def set_time(self, name: str, slot: int, meter_time: str | None) -> None:
        """Write a meter time (or None) into a ``METER_TIME`` column."""
        code = _NO_TIME if meter_time is None else time_code(meter_time)
        values = self._columns[name]
        if values[slot] == _ASIDE:
            del self._aside[name][slot]
        values[slot] = code
        if code == _ASIDE:
            self._aside[name][slot] = meter_time

    def list_of(self, slot: int) -> int:
        """Which list the meter in ``slot`` is in."""
        return self._list[slot]

    def copy(self, column: str) -> TableCopy:
        """Every meter's id, list and value of one column, copied in C (for use outside the owner's lock).

        A few bulk copies of arrays, where a list of 100,000 tuples took 49
        ms and 15.7 MB of small objects.
        """
        slots = self._capacity
        return TableCopy(self._ids.prefix(slots), self._list[:slots], self._columns[column][:slots])

    def __len__(self) -> int:
        return self._size

    def count(self, which: int = 0) -> int:
        """How many meters list ``which`` holds."""
        return self._counts[which]

    def oldest(self, which: int = 0) -> int:
        """The slot at the old end of a list, or -1 when it is empty."""
        return self._heads[which]

    def following(self, slot: int) -> int:
        """The slot after ``slot`` in its list (younger), or -1 at the young end."""
        return self._next[slot]

    def slots(self, which: int = 0) -> Iterator[int]:
        """The slots of a list, oldest first (the table must not change meanwhile)."""
        slot, following = self._heads[which], self._next
        while slot != _NONE:
            yield slot
            slot = following[slot]

    def meter_ids(self, which: int = 0) -> list[str]:
        """The ids of a list, oldest first."""
        return [self.meter_id(slot) for slot in self.slots(which)]

    # --- changing -------------------------------------------------------------------

    def add(self, meter_id: str, which: int = 0) -> int:
        """Put a meter that is not in the table at the young end of a list; its slot (columns at their defaults).

        Raises ValueError for an id that is not 13 ASCII characters.
        """
        slot = self._ids.hold(meter_id)
        if slot >= self._capacity:
            self._grow(max(self._ids.capacity, slot + 1))  # as large as the ids: the shared ones may be ahead
        for name, values in self._columns.items():
            values[slot] = self._defaults[name]
        self._link(slot, which)
        self._size += 1
        self._recent_id, self._recent_slot = meter_id, slot
        return slot

    def touch(self, slot: int, which: int = 0) -> None:
        """Move a meter to the young end of list ``which`` (from wherever it is)."""
        if self._tails[which] == slot:
            return
        self._unlink(slot)
        self._link(slot, which)

    def remove(self, slot: int) -> None:
        """Take a meter out of the table."""
        self._recent_id, self._recent_slot = "", _NONE
        self._unlink(slot)
        self._list[slot] = _NONE
        for aside in self._aside.values():
            if aside:
                aside.pop(slot, None)
        self._size -= 1
        self._ids.release(slot)
        if not self._size:
            self._allocate(0)  # all gone: give the arrays back at once

    def clear(self) -> None:
        """Forget every meter."""
        for which in range(len(self._heads)):
            for slot in list(self.slots(which)):
                self._ids.release(slot)
        self._allocate(0)

    # --- inside ---------------------------------------------------------------------

    def _link(self, slot: int, which: int) -> None:
        tail = self._tails[which]
        self._prev[slot] = tail
        self._next[slot] = _NONE
        if tail == _NONE:
            self._heads[which] = slot
        else:
            self._next[tail] = slot
        self._tails[which] = slot
        self._list[slot] = which
        self._counts[which] += 1

    def _unlink(self, slot: int) -> None:
        which = self._list[slot]
        before, after = self._prev[slot], self._next[slot]
        if before == _NONE:
            self._heads[which] = after
        else:
            self._next[before] = after
        if after == _NONE:
            self._tails[which] = before
        else:
            self._prev[after] = before
        self._counts[which] -= 1

    def _grow(self, capacity: int) -> None:
        """Arrays for ``capacity`` slots, extended in place: every slot and column stays valid."""
        extra = capacity - self._capacity
        for links in (self._prev, self._next):
            links.extend(array("i", [_NONE]) * extra)
        self._list.extend(array("b", [_NONE]) * extra)
        for name, values in self._columns.items():
            values.extend(array(values.typecode, [self._defaults[name]]) * extra)
        self._capacity = capacity


class TableCopy:
    """A copy of a table's ids, lists and one column: ``entries`` yields them a meter at a time, in no order."""

    def __init__(self, ids: bytes, lists: array, values: array) -> None:
        self._ids, self._lists, self._values = ids, lists, values

    def entries(self) -> Iterator[tuple[str, float, int]]:
        """``(meter id, value, list)`` of every meter, in the order of their slots."""
        ids, values = self._ids, self._values
        for slot, which in enumerate(self._lists):
            if which != _NONE:
                start = slot * ID_LENGTH
                yield ids[start:start + ID_LENGTH].decode("ascii"), values[slot], which


class MeterSet:
    """An ordered set of meter ids (first added first), in a ``MeterTable``: 40 bytes a meter, not a dict's 100.

    About 10 (its list links) when its ``ids`` are shared with tables that
    hold the same meters.

    What a ``dict[str, None]`` used as an ordered set does, for the sets a
    whole fleet may be in: adding a member again keeps its place.
    """

    def __init__(self, ids: MeterIds | None = None) -> None:
        self._table = MeterTable(ids=ids)

    def add(self, meter_id: str) -> None:
        if self._table.find(meter_id) < 0:
            self._table.add(meter_id)

    def discard(self, meter_id: str) -> None:
        slot = self._table.find(meter_id)
        if slot >= 0:
            self._table.remove(slot)

    def first(self, count: int) -> list[str]:
        """The ``count`` oldest members (fewer when there are fewer)."""
        table, members = self._table, []
        slot = table.oldest()
        while slot != _NONE and len(members) < count:
            members.append(table.meter_id(slot))
            slot = table.following(slot)
        return members

    def clear(self) -> None:
        self._table.clear()

    def __contains__(self, meter_id: str) -> bool:
        return self._table.find(meter_id) >= 0

    def __len__(self) -> int:
        return len(self._table)

    def __iter__(self) -> Iterator[str]:
        """The members, oldest first (a copy: the set may change while it is walked)."""
        return iter(self._table.meter_ids())
