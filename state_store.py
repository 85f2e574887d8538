"""The proxy's state that must survive a restart: per meter, the last energy the central broker acknowledged.

Without it, the first reading after a restart has nothing to compare with,
and a spurious low energy value would reach Home Assistant as a meter reset.
It must never run ahead of what the central broker has: the readings the
internal broker delivers again after a restart would then look like an
energy counter going backwards and be dropped for good. So only energy the
central broker acknowledged is ever written, and compaction rewrites the
journal's own record of those, not the filters' memory (which already holds
readings still queued).

Stored as an append-only journal (``energy.journal``, one ``<meter id> <kWh>
<meter time YYYYMMDDhhmmss>`` line per acknowledged energy reading; older
two-field lines still load), flushed twice a second: no rewrite of a large
file per message, and no system call per reading. The journal is compacted
to one line per meter at start-up and whenever it has grown well past that.

The state directory is locked while the proxy runs: two proxies writing the
same state would corrupt each other's filters.
"""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path
from typing import NamedTuple, TextIO

from data_mapping import is_valid_meter_id

JOURNAL_NAME = "energy.journal"
LOCK_NAME = "proxy.lock"
COMPACT_AFTER_LINES = 10_000  # beyond 4 lines per meter
MAX_METERS = 200_000  # as the filters' memory (data_mapping.MeterMemory): least recently recorded go first


class StateLocked(Exception):
    """Another process holds the state directory."""


class Floor(NamedTuple):
    """The last energy the central broker acknowledged for a meter.

    ``meter_time`` is the meter's clock (``YYYYMMDDhhmmss``) of the reading
    that carried it; None when unknown (a journal of the older format).
    """

    energy: float
    meter_time: str | None


def is_meter_time(text: str) -> bool:
    """Whether ``text`` has the form of a meter time: 14 ASCII digits."""
    return len(text) == 14 and text.isascii() and text.isdigit()


def format_line(meter_id: str, floor: Floor) -> str:
    """The journal line of one floor (the older two-field form when its meter time is unknown)."""
    if floor.meter_time is None:
        return f"{meter_id} {floor.energy!r}\n"
    return f"{meter_id} {floor.energy!r} {floor.meter_time}\n"


def parse_journal(lines: list[str]) -> dict[str, Floor]:
    """The last floor per meter from journal lines; damaged lines are skipped."""
    floors: dict[str, Floor] = {}
    for line in lines:
        parts = line.split()
        if len(parts) not in (2, 3) or not is_valid_meter_id(parts[0]):
            continue  # a line cut short by a crash, or a damaged file
        try:
            value = float(parts[1])
        except ValueError:
            continue
        if not math.isfinite(value) or (len(parts) == 3 and not is_meter_time(parts[2])):
            continue
        floors.pop(parts[0], None)  # the most recently recorded meters last, as the journal keeps them
        floors[parts[0]] = Floor(value, parts[2] if len(parts) == 3 else None)
    return floors


class EnergyJournal:
    """The locked state directory and its energy journal of acknowledged floors."""

    def __init__(self, directory: Path, compact_after: int = COMPACT_AFTER_LINES,
                 max_meters: int = MAX_METERS) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.compact_after = compact_after
        self.max_meters = max_meters
        self._lock_file: TextIO | None = None
        self._journal: TextIO | None = None
        self._floors: dict[str, Floor] = {}  # acknowledged, least recently recorded first
        self._lines = 0
        self._meters = 0

    def open(self) -> dict[str, Floor]:
        """Lock the directory, read and compact the journal; the acknowledged floor per meter."""
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.directory / LOCK_NAME, "a+")  # noqa: SIM115 (held open while running)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise StateLocked(
                f"state directory {self.directory} is in use by another kpm33b_proxy process"
            ) from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()
        self._lock_file = lock_file
        floors = parse_journal(self.path.read_text().splitlines()) if self.path.exists() else {}
        while len(floors) > self.max_meters:
            del floors[next(iter(floors))]
        self._floors = floors
        self.compact()
        return dict(floors)

    def record(self, meter_id: str, energy: float, meter_time: str) -> None:
        """Note the energy of a reading the central broker acknowledged (buffered: see ``flush``)."""
        floors = self._floors
        floors.pop(meter_id, None)  # moved to the most recently recorded end
        floor = floors[meter_id] = Floor(float(energy), meter_time)
        if len(floors) > self.max_meters:
            del floors[next(iter(floors))]
        if self._journal is None:
            return
        self._journal.write(format_line(meter_id, floor))
        self._lines += 1

    def flush(self) -> None:
        """Hand the buffered lines to the operating system.

        Called twice a second and at shutdown rather than per reading: a proxy
        killed outright loses at most the last half second of journal, which
        only leaves the counter guard at an older acknowledged value.
        """
        if self._journal is not None:
            self._journal.flush()

    def needs_compaction(self) -> bool:
        """Whether the journal has grown to several lines per meter."""
        return self._lines > 4 * self._meters + self.compact_after

    def compact(self) -> None:
        """Rewrite the journal from the acknowledged floors, one line per meter, atomically."""
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.writelines(format_line(meter_id, floor) for meter_id, floor in self._floors.items())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        if self._journal is not None:
            self._journal.close()
        self._journal = open(self.path, "a")  # noqa: SIM115 (appended to while running)
        self._lines = self._meters = len(self._floors)

    def close(self) -> None:
        """Flush and close the journal, release the lock."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
