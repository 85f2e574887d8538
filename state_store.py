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
two-field lines still load), each line written out (one ``write``, no
``fsync``) before the proxy releases the raw reading it came from: no rewrite
of a large file per message, and a killed proxy never restarts with a floor
older than what it acknowledged. The journal is compacted
to one line per meter at start-up and whenever it has grown well past that.

The file is input like any other: a damaged line is skipped with a warning
and counted, a line without its newline at the end is a write cut short and
ignored, and a non-empty file that yields nothing is kept aside, never
overwritten. A write that fails while running (a full disk) is logged at most
once a minute and retried; forwarding goes on with the floors held here in
memory. A state directory that cannot be used at start is ``StateUnusable``.

The state directory is locked while the proxy runs: two proxies writing the
same state would corrupt each other's filters.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple, TextIO

from meter_table import METER_TIME, MeterIds, MeterTable
from topics import is_valid_meter_id

JOURNAL_NAME = "energy.journal"
# A rewrite writes its lines this many at a time: 100,000 meters joined at once made 13.4 MB of short-lived strings.
REWRITE_CHUNK_LINES = 4096
LOCK_NAME = "proxy.lock"
KEPT_ASIDE_SUFFIX = ".damaged-"
# A journal line is about 50 bytes; anything much longer is damage, and is not read whole into memory.
MAX_LINE_BYTES = 200
COMPACT_AFTER_LINES = 10_000  # beyond 4 lines per meter
RETRY_SECONDS = 5.0  # a failed write is retried (as a full rewrite) this often
ERROR_INTERVAL_SECONDS = 60.0  # a failing journal logs an ERROR at most this often
MAX_METERS = 200_000  # as the filters' memory (data_mapping.MeterMemory): least recently recorded go first

log = logging.getLogger(__name__)


class StateError(Exception):
    """The state directory cannot be used: the proxy must not start."""


class StateLocked(StateError):
    """Another process holds the state directory."""


class StateUnusable(StateError):
    """The state directory or its journal cannot be created, read or written."""


class Floor(NamedTuple):
    """The last energy the central broker acknowledged for a meter.

    ``meter_time`` is the meter's clock (``YYYYMMDDhhmmss``) of the reading
    that carried it; None when unknown (a journal of the older format).
    """

    energy: float
    meter_time: str | None


class ParsedJournal(NamedTuple):
    """What a journal file holds: the floors, and what was wrong with it."""

    floors: dict[str, Floor]
    damaged: int  # complete lines skipped as damaged
    first_damaged: tuple[int, bytes] | None  # (line number, the line cut to 60 bytes) of the first one
    torn: bool  # the last line had no newline: a write cut short, ignored


def is_meter_time(text: str) -> bool:
    """Whether ``text`` has the form of a meter time: 14 ASCII digits."""
    return len(text) == 14 and text.isascii() and text.isdigit()


def parse_line(line: bytes) -> tuple[str, Floor] | None:
    """One complete journal line (without its newline) as (meter id, floor); None when damaged."""
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        return None
    parts = text.split(" ")
    if len(parts) not in (2, 3) or not is_valid_meter_id(parts[0]):
        return None
    try:
        energy = float(parts[1])
    except ValueError:
        return None
    if not math.isfinite(energy):
        return None
    meter_time = None
    if len(parts) == 3:
        if not is_meter_time(parts[2]):
            return None
        meter_time = parts[2]
    return parts[0], Floor(energy, meter_time)


def format_line(meter_id: str, floor: Floor) -> str:
    """The journal line of one floor (the older two-field form when its meter time is unknown)."""
    if floor.meter_time is None:
        return f"{meter_id} {floor.energy!r}\n"
    return f"{meter_id} {floor.energy!r} {floor.meter_time}\n"


def split_lines(handle: BinaryIO) -> Iterator[bytes]:
    """The journal's lines, each with its newline when it has one.

    Reads at most ``MAX_LINE_BYTES`` at a time: a file of garbage without
    newlines is never held in memory whole. An overlong line is cut to its
    start (longer than ``MAX_LINE_BYTES`` with its newline: damaged, see
    ``parse_journal``).
    """
    while True:
        line = handle.readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            rest = line
            while rest and not rest.endswith(b"\n"):  # skip to the end of the overlong line
                rest = handle.readline(65_536)
            line = line + (b"\n" if rest.endswith(b"\n") else b"")
        yield line


def parse_journal(lines: Iterable[bytes]) -> ParsedJournal:
    """The last floor per meter from journal lines (each with its newline, as read from the file).

    Later lines win. A damaged line (not ASCII, not ``<meter id> <kWh>
    [<YYYYMMDDhhmmss>]``, a value that is not a finite number, overlong) is
    skipped and counted; the valid lines around it still load. A last line without its
    newline is a write cut short (``16`` of ``16234.5``): it would read as a
    smaller floor, so it is ignored.
    """
    floors: dict[str, Floor] = {}
    damaged = 0
    first_damaged: tuple[int, bytes] | None = None
    torn = False
    for number, line in enumerate(lines, start=1):
        if not line.endswith(b"\n"):
            torn = True  # only the last line can lack its newline
            break
        parsed = parse_line(line[:-1]) if len(line) <= MAX_LINE_BYTES else None
        if parsed is None:
            damaged += 1
            if first_damaged is None:
                first_damaged = (number, line[:60])
            continue
        meter_id, floor = parsed
        floors.pop(meter_id, None)  # the most recently recorded meters last, as the journal keeps them
        floors[meter_id] = floor
    return ParsedJournal(floors, damaged, first_damaged, torn)


class EnergyJournal:
    """The locked state directory and its energy journal.

    ``record`` (once the central broker acknowledged a reading), ``flush``,
    ``needs_compaction`` and ``compact`` are called under one lock by the
    proxy; none of them raises on a failing disk (see ``flush``).
    """

    def __init__(self, directory: Path, compact_after: int = COMPACT_AFTER_LINES,
                 max_meters: int = MAX_METERS, retry_seconds: float = RETRY_SECONDS,
                 clock: Callable[[], float] = time.monotonic, ids: MeterIds | None = None) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self._ids = ids
        self.compact_after = compact_after
        self.max_meters = max_meters
        self.retry_seconds = retry_seconds
        self._clock = clock
        self._lock_file: TextIO | None = None
        self._fd: int | None = None  # the journal, opened for appending
        self._floors = _floor_table(ids=ids)  # acknowledged, least recently recorded first
        self._pending: list[str] = []  # lines recorded since the last flush
        self._lines = 0  # lines in the file (as far as written)
        self._meters = 0  # meters at the last compaction
        self.damaged_lines = 0  # skipped when the journal was read at start-up
        self.kept_aside: Path | None = None  # where an unreadable journal was moved at start-up
        self.write_failures = 0  # failed writes while running, in all
        self._failing = False  # the last write failed: retried as a full rewrite
        self._retry_at = 0.0
        self._failures_unreported = 0
        self._next_error_at = 0.0

    # --- start-up -----------------------------------------------------------------

    def open(self) -> dict[str, Floor]:
        """Lock the directory, read and compact the journal; the acknowledged floor per meter.

        Raises ``StateLocked`` when another proxy holds the directory, and
        ``StateUnusable`` when it cannot be created, read or written.
        """
        try:
            self._lock()
            floors = self._read().floors
            while len(floors) > self.max_meters:
                del floors[next(iter(floors))]
            self._floors.clear()  # its meters are let go of in the shared ids before the new table holds them
            self._floors = _floor_table(floors, self._ids)
            del floors
            self._rewrite()
        except OSError as error:
            self.close()
            raise StateUnusable(f"cannot use the state directory {self.directory}: {_describe(error)}") from None
        return self.floors()

    def _lock(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.directory))
        self.directory.mkdir(parents=True, exist_ok=True)
        lock_file = open(self.directory / LOCK_NAME, "a+")  # noqa: SIM115 (held open while running)
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise StateLocked(
                f"state directory {self.directory} is in use by another kpm33b_proxy process"
            ) from None
        self._lock_file = lock_file
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"{os.getpid()}\n")
        lock_file.flush()

    def _read(self) -> ParsedJournal:
        """Parse the journal; report damage; keep aside a non-empty file that yields nothing."""
        try:
            handle = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            return ParsedJournal({}, 0, None, False)
        with handle:
            parsed = parse_journal(split_lines(handle))
            size = handle.tell()
        self.damaged_lines = parsed.damaged
        if parsed.damaged:
            number, line = parsed.first_damaged or (0, b"")
            log.warning("skipped %d damaged lines of the energy journal %s (the first: line %d, %s); "
                        "the valid lines are loaded", parsed.damaged, self.path, number, ascii(line))
        if parsed.torn:
            log.warning("ignored the unfinished last line of the energy journal %s (a write cut short)", self.path)
        if size and not parsed.floors:
            self.kept_aside = self._keep_aside()
            log.error("the energy journal %s (%d bytes) holds no valid line: kept aside as %s; starting without "
                      "the last energy of any meter", self.path, size, self.kept_aside)
        return parsed

    def _keep_aside(self) -> Path:
        """Rename the journal to a name not taken yet; the new path."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        candidate = self.path.with_name(f"{JOURNAL_NAME}{KEPT_ASIDE_SUFFIX}{stamp}")
        number = 1
        while candidate.exists():
            candidate = self.path.with_name(f"{JOURNAL_NAME}{KEPT_ASIDE_SUFFIX}{stamp}.{number}")
            number += 1
        os.rename(self.path, candidate)
        return candidate

    # --- running --------------------------------------------------------------------

    def record(self, meter_id: str, energy: float, meter_time: str) -> None:
        """Note the energy of a reading the central broker acknowledged (written by ``flush``)."""
        floor = Floor(float(energy), meter_time)
        _check_floor(floor)  # before the table changes: a meter is never left with a floor half set
        floors = self._floors
        slot = floors.find(meter_id)
        if slot < 0:
            slot = floors.add(meter_id)
        else:
            floors.touch(slot)  # moved to the most recently recorded end
        _put_floor(floors, slot, floor)
        if len(floors) > self.max_meters:
            floors.remove(floors.oldest())
        if self._fd is not None and not self._failing:
            self._pending.append(format_line(meter_id, floor))

    def flush(self) -> None:
        """Hand the recorded lines to the operating system (while failing: retry a full rewrite).

        The proxy calls it for each acknowledged energy reading before it
        releases the raw one (one ``write``, no ``fsync``: what the operating
        system has survives a killed process), and on its ticks to retry.
        A write that fails is an ERROR (at most once a minute), never an
        exception: the floors stay here in memory and the next successful
        rewrite catches the file up.
        """
        if self._failing:
            if self._clock() >= self._retry_at:
                self.compact()
            return
        if not self._pending or self._fd is None:
            return
        data = "".join(self._pending).encode("ascii")
        self._pending.clear()
        try:
            _write_all(self._fd, data)
        except OSError as error:
            self._failed(error)
            return
        self._lines += data.count(b"\n")

    def needs_compaction(self) -> bool:
        """Whether the journal has grown to several lines per meter."""
        return not self._failing and self._lines > 4 * self._meters + self.compact_after

    def compact(self) -> None:
        """Rewrite the journal from the acknowledged floors, one line per meter, atomically."""
        try:
            self._rewrite()
        except OSError as error:
            self._failed(error)
            return
        if self._failing:
            self._failing = False
            log.warning("the energy journal %s is written again (after %d failed writes in all)", self.path,
                        self.write_failures)

    def _rewrite(self) -> None:
        """Write the floors to a temporary file, make it durable, and put it in place of the journal."""
        self._pending.clear()  # the floors include every line recorded so far
        temporary = self.path.with_suffix(".tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                lines: list[str] = []
                for meter_id, floor in _floor_items(self._floors):
                    lines.append(format_line(meter_id, floor))
                    if len(lines) == REWRITE_CHUNK_LINES:
                        _write_all(fd, "".join(lines).encode("ascii"))
                        lines.clear()
                _write_all(fd, "".join(lines).encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temporary, self.path)
        except OSError:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)  # give the space back
            raise
        self._close_journal()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._lines = self._meters = len(self._floors)

    def _failed(self, error: OSError) -> None:
        """A write failed: retry later as a full rewrite; an ERROR at most once a minute."""
        self._failing = True
        self._pending.clear()
        self.write_failures += 1
        self._failures_unreported += 1
        now = self._clock()
        self._retry_at = now + self.retry_seconds
        log.debug("energy journal write failed (%d in all): %s", self.write_failures, _describe(error))
        if now >= self._next_error_at:
            self._next_error_at = now + ERROR_INTERVAL_SECONDS
            log.error("cannot write the energy journal %s: %s (%d failed writes since the last report); forwarding "
                      "goes on with the last energy per meter kept in memory, writing retried every %g s",
                      self.path, _describe(error), self._failures_unreported, self.retry_seconds)
            self._failures_unreported = 0

    def floors(self) -> dict[str, Floor]:
        """A copy of the acknowledged floors (what the next rewrite writes), least recently recorded first."""
        return dict(_floor_items(self._floors))

    def close(self) -> None:
        """Write what is recorded (one last attempt when failing), close the journal, release the lock."""
        if self._failing:
            self.compact()
            if self._failing:
                log.error("the energy journal %s could not be written before stopping: the next start takes the "
                          "last energy per meter from what it holds", self.path)
        elif self._fd is not None:
            self.flush()
        self._close_journal()
        if self._lock_file is not None:
            lock_file, self._lock_file = self._lock_file, None
            with contextlib.suppress(OSError):  # the pid in it is for people; the lock goes with the descriptor
                fcntl.flock(lock_file, fcntl.LOCK_UN)
                lock_file.close()

    def _close_journal(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # nothing is buffered here: os.write handed every byte over
                os.close(fd)


# The floors of a large fleet, compact (see meter_table): the energy, and the meter time (None for a floor of
# the older format without one).
def _floor_table(floors: dict[str, Floor] | None = None, ids: MeterIds | None = None) -> MeterTable:
    """A table of floors, filled with ``floors`` in their order (``ids`` shared with the proxy's other tables)."""
    table = MeterTable({"energy": "d", "time": METER_TIME}, ids=ids)
    for meter_id, floor in (floors or {}).items():
        _put_floor(table, table.add(meter_id), floor)
    return table


def _check_floor(floor: Floor) -> None:
    """Raise ValueError for a floor whose time is not a meter time (14 digits of a date and time)."""
    if floor.meter_time is not None and not is_meter_time(floor.meter_time):
        raise ValueError(f"not a meter time: {floor.meter_time!r}")


def _put_floor(table: MeterTable, slot: int, floor: Floor) -> None:
    """Write a checked floor (``_check_floor``; the journal's parser checks what it reads) into its slot."""
    table.column("energy")[slot] = floor.energy
    table.set_time("time", slot, floor.meter_time)


def _floor_items(table: MeterTable) -> Iterator[tuple[str, Floor]]:
    """(meter id, floor) of every meter, least recently recorded first."""
    energies = table.column("energy")
    for slot in table.slots():
        yield table.meter_id(slot), Floor(energies[slot], table.time("time", slot))


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte (``os.write`` may take fewer than it is given)."""
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def _describe(error: OSError) -> str:
    """An OSError as one line naming the file: ``No space left on device (/var/lib/…/energy.journal.tmp)``."""
    what = error.strerror or type(error).__name__
    return f"{what} ({error.filename})" if error.filename else what


# --- when each meter was last heard from ---------------------------------------------

LAST_SEEN_NAME = "last_seen"
LAST_SEEN_STATES = ("online", "offline")


def parse_last_seen(lines: Iterable[bytes]) -> tuple[dict[str, tuple[float, bool]], int]:
    """``<meter id> <unix seconds> <online|offline>`` lines as meter → (when, online); and how many were damaged."""
    seen: dict[str, tuple[float, bool]] = {}
    damaged = 0
    for line in lines:
        if not line.endswith(b"\n"):  # cut short (the file is replaced whole, so: damaged)
            damaged += 1
            continue
        try:
            meter_id, when, state = line[:-1].decode("ascii").split(" ")
            seconds = float(when)
        except (UnicodeDecodeError, ValueError):
            damaged += 1
            continue
        if not is_valid_meter_id(meter_id) or state not in LAST_SEEN_STATES or not math.isfinite(seconds):
            damaged += 1
            continue
        seen[meter_id] = (seconds, state == "online")
    return seen, damaged


class LastSeenFile:
    """When each known meter's last reading came (wall clock), and whether it was online then.

    Kept beside the energy journal so that a restarted proxy still reports a
    meter that stays silent as offline at its limit, counted from its last
    reading rather than from the restart. Rewritten whole, atomically, every
    minute and at stop: losing the last minute of it only makes a silent
    meter's offline come up to a minute late. Hostile input like the
    journal: damaged lines are skipped with a WARNING; a write that fails is
    an ERROR at most once a minute, and the proxy goes on.
    """

    def __init__(self, directory: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = directory / LAST_SEEN_NAME
        self._clock = clock
        self._next_error_at = 0.0

    def load(self) -> dict[str, tuple[float, bool]]:
        """The meters last seen, oldest first; empty when there is no (usable) file."""
        try:
            with open(self.path, "rb") as handle:
                seen, damaged = parse_last_seen(split_lines(handle))
        except FileNotFoundError:
            return {}
        except OSError as error:
            log.warning("cannot read %s (%s): meters not heard from since the start go offline at their limit "
                        "counted from the start", self.path, _describe(error))
            return {}
        if damaged:
            log.warning("skipped %d damaged lines of %s", damaged, self.path)
        return dict(sorted(seen.items(), key=lambda item: item[1][0]))

    def save(self, entries: Iterable[tuple[str, float, bool]]) -> bool:
        """Replace the file with ``(meter id, unix seconds, online)`` entries; False (logged) when it failed."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="ascii") as handle:
                handle.writelines(f"{meter_id} {when:.0f} {'online' if online else 'offline'}\n"
                                  for meter_id, when, online in entries)
            os.replace(temporary, self.path)
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            now = self._clock()
            if now >= self._next_error_at:
                self._next_error_at = now + ERROR_INTERVAL_SECONDS
                log.error("cannot write %s: %s; retried in a minute", self.path, _describe(error))
            return False
        return True
