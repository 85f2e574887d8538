"""The proxy's state that must survive a restart: the last energy forwarded per meter.

Without it, the first reading after a restart has nothing to compare with,
and a spurious low energy value would reach Home Assistant as a meter reset.

Stored as an append-only journal (``energy.journal``, one ``<meter id>
<kWh>`` line per forwarded energy reading), flushed twice a second: no rewrite
of a large file per message, and no system call per reading. The journal is compacted to one line per meter
at start-up and whenever it has grown well past that.

The state directory is locked while the proxy runs: two proxies writing the
same state would corrupt each other's filters.
"""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path
from typing import TextIO

from data_mapping import is_valid_meter_id

JOURNAL_NAME = "energy.journal"
LOCK_NAME = "proxy.lock"


class StateLocked(Exception):
    """Another process holds the state directory."""


def parse_journal(lines: list[str]) -> dict[str, float]:
    """The last energy per meter from journal lines; damaged lines are skipped."""
    energy: dict[str, float] = {}
    for line in lines:
        parts = line.split()
        if len(parts) != 2 or not is_valid_meter_id(parts[0]):
            continue  # a line cut short by a crash, or a damaged file
        try:
            value = float(parts[1])
        except ValueError:
            continue
        if math.isfinite(value):
            energy[parts[0]] = value
    return energy


class EnergyJournal:
    """The locked state directory and its energy journal."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self._lock_file: TextIO | None = None
        self._journal: TextIO | None = None
        self._lines = 0
        self._meters = 0

    def open(self) -> dict[str, float]:
        """Lock the directory, read and compact the journal; the last energy per meter."""
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
        energy = parse_journal(self.path.read_text().splitlines()) if self.path.exists() else {}
        self.compact(energy)
        return energy

    def record(self, meter_id: str, energy: float) -> None:
        """Append one forwarded energy reading (buffered: see ``flush``)."""
        if self._journal is None:
            return
        self._journal.write(f"{meter_id} {energy!r}\n")
        self._lines += 1

    def flush(self) -> None:
        """Hand the buffered lines to the operating system.

        Called twice a second and at shutdown rather than per reading: a proxy
        killed outright loses at most the last half second of journal, which
        only weakens the counter guard for a value between two forwarded ones.
        """
        if self._journal is not None:
            self._journal.flush()

    def needs_compaction(self) -> bool:
        """Whether the journal has grown to several lines per meter."""
        return self._lines > 4 * self._meters + 10_000

    def compact(self, energy: dict[str, float]) -> None:
        """Rewrite the journal as one line per meter, atomically."""
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            handle.writelines(f"{meter_id} {value!r}\n" for meter_id, value in energy.items())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self.path)
        if self._journal is not None:
            self._journal.close()
        self._journal = open(self.path, "a")  # noqa: SIM115 (appended to while running)
        self._lines = self._meters = len(energy)

    def close(self) -> None:
        """Flush and close the journal, release the lock."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
