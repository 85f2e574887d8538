"""Notices when a configuration file changed, symlinks included, and says so once.

Both daemons re-read ``config.yaml`` while running, and installations keep it
in places that change in different ways:

- edited in place, or replaced by renaming (what most editors do);
- a symlink (``config.yaml -> site/config.yaml``) whose *target* is edited;
- a symlink re-pointed with ``ln -sfn new/config.yaml config.yaml``, which
  renames a new link over the old one (also how Kubernetes swaps ConfigMaps).

A watcher that filters on the name it was given sees only the first kind. So
:class:`ConfigWatcher` watches the directory of the path given *and* the
directory of every link on the way to the file, re-resolving the chain after
each change (a re-pointed link moves the watch to the new target's
directory). Only events about those names (each link, each directory link on
the way, the target) lead to a check, so a busy directory (a log file beside
the configuration) costs nothing. The check decides by the file's signature:
the resolved target, the links' contents, and the target's modification time,
inode, device and size. Events come in bursts (an editor writes in several
steps), so a check runs once things have been quiet for ``debounce`` seconds,
or at the latest ``MAX_DELAY_FACTOR`` debounces after the first event;
``on_change`` is called only when the signature differs from the last one.

``on_change`` runs on the watcher's own thread: it must only hand the work
over (put an item on a queue, set an event) and return. The daemons reload on
their own worker thread, so a reload never races another one.

inotify (watchdog's ``Observer``) is tried first; when it cannot be used (no
inotify, or its limits reached) the watcher falls back to watchdog's
``PollingObserver``, which notices changes within about a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

DEBOUNCE_SECONDS = 0.2
# A steady stream of events must not postpone the check for ever.
MAX_DELAY_FACTOR = 5
# More links than this in a chain is a loop (the kernel's own limit is 40).
MAX_LINKS = 40
# Events that cannot change the file: reading the configuration opens and closes it.
_HARMLESS_EVENTS = frozenset(("opened", "closed_no_write"))

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileSignature:
    """What tells one state of the configuration file from another."""

    links: tuple[str, ...]  # each link's own content, in the order followed
    target: str             # the file finally reached
    mtime_ns: int
    inode: int
    device: int
    size: int


def link_chain(path: Path) -> list[Path]:
    """``path`` and every path its symlinks lead to, in order; the last one is not a link (or is missing).

    Relative link contents are taken relative to the link's own directory,
    as the kernel does. Stops after ``MAX_LINKS`` links (a loop).
    """
    chain = [Path(os.path.abspath(path))]
    for _ in range(MAX_LINKS):
        current = chain[-1]
        try:
            content = os.readlink(current)
        except OSError:  # not a link, or gone
            break
        chain.append(Path(os.path.normpath(os.path.join(current.parent, content))))
    return chain


def file_signature(path: Path) -> FileSignature | None:
    """The signature of the file ``path`` names now, following symlinks; None when it cannot be reached."""
    links: list[str] = []
    for hop in link_chain(path)[:-1]:
        try:
            links.append(os.readlink(hop))
        except OSError:
            return None  # changed under our feet: the next event tells
    try:
        target = os.path.realpath(path, strict=True)
        stat = os.stat(target)
    except (OSError, RuntimeError):
        return None
    return FileSignature(tuple(links), target, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_size)


def directories_to_watch(path: Path) -> frozenset[str]:
    """The existing directories whose entries decide what ``path`` is: its own, each link's, the target's."""
    candidates = [hop.parent for hop in link_chain(path)]
    with contextlib.suppress(OSError, RuntimeError):
        candidates.append(Path(os.path.realpath(path)).parent)
    return frozenset(os.path.realpath(d) for d in candidates if os.path.isdir(d))


def names_that_matter(path: Path, directories: Iterable[str]) -> frozenset[str]:
    """The entries of the watched ``directories`` whose change can change what ``path`` is.

    Each link of the chain and the target, and every directory on their way
    that lies in a watched directory (a directory link such as Kubernetes'
    ``..data``), named as the events name them: watched directory + entry.
    """
    watched = set(directories)
    names: set[str] = set()
    hops = link_chain(path)
    with contextlib.suppress(OSError, RuntimeError):
        hops.append(Path(os.path.realpath(path)))
    for hop in hops:
        for entry in (hop, *hop.parents):
            if entry.name:
                parent = os.path.realpath(entry.parent)
                if parent in watched:
                    names.add(os.path.join(parent, entry.name))
    return frozenset(names)


class _Touched(FileSystemEventHandler):
    """Tells the watcher that something happened to one of the names that matter."""

    def __init__(self, touched: Callable[[], None]) -> None:
        self.touched = touched
        self.names: frozenset[str] = frozenset()  # replaced whole by the watcher's thread

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in _HARMLESS_EVENTS:
            return
        names = self.names
        paths = (event.src_path, getattr(event, "dest_path", ""))
        if any(path and os.fsdecode(path) in names for path in paths):
            self.touched()


class ConfigWatcher:
    """Calls ``on_change()`` after the file at ``path`` (symlinks followed) changed.

    ``start()`` returns whether watching works; ``stop()`` ends it. The
    signature the changes are compared with is taken when the watcher is
    made: make it right after loading the file. A file that disappears is a
    change too (``on_change`` is called; loading it then fails and says why),
    and so is its return.
    """

    def __init__(self, path: Path, on_change: Callable[[], None], *, debounce: float = DEBOUNCE_SECONDS,
                 log: logging.Logger | None = None,
                 observer_types: Iterable[type[BaseObserver]] = (Observer, PollingObserver)) -> None:
        self.path = Path(path)
        self._on_change = on_change
        self._debounce = debounce
        self._log = log or logger
        self._observer_types = tuple(observer_types)
        self._signature = file_signature(self.path)
        self._handler = _Touched(self._touched)
        self._condition = threading.Condition()
        self._touched_at: float | None = None
        self._first_touched_at: float | None = None
        self._stopping = False
        self._observer: BaseObserver | None = None
        self._watches: dict[str, ObservedWatch] = {}
        self._thread = threading.Thread(target=self._run, name="config-watch", daemon=True)

    @property
    def directories(self) -> frozenset[str]:
        """The directories watched now."""
        return frozenset(self._watches)

    @property
    def observer_name(self) -> str | None:
        """``InotifyObserver``, ``PollingObserver`` … once started; None when not watching."""
        return type(self._observer).__name__ if self._observer is not None else None

    def start(self) -> bool:
        """Start watching; False (and an ERROR) when no observer works: then only SIGHUP or a restart reloads."""
        directories = directories_to_watch(self.path)
        self._handler.names = names_that_matter(self.path, directories)
        for observer_type in self._observer_types:
            observer = observer_type()
            try:
                watches = {d: observer.schedule(self._handler, d, recursive=False) for d in sorted(directories)}
                observer.start()
            except OSError as error:
                self._log.warning("cannot watch %s with %s (%s)", ", ".join(sorted(directories)),
                                  observer_type.__name__, error)
                continue
            self._observer = observer
            self._watches = watches
            self._thread.start()
            self._log.info("watching %s for changes", self.path)
            return True
        self._log.error("cannot watch %s: configuration changes need a reload (SIGHUP) or a restart", self.path)
        return False

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; no ``on_change`` call starts after this returns."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self) -> bool:
        """Follow the links again and call ``on_change`` if the signature changed; whether it did.

        The watches move before the signature is taken, so that a change to
        a new target made in between is seen by the next check.
        """
        self._follow_links()
        signature = file_signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        self._on_change()
        return True

    # --- internals -------------------------------------------------------------------------

    def _touched(self) -> None:
        """On an observer thread: note the time; the watcher's thread does the rest."""
        with self._condition:
            self._touched_at = time.monotonic()
            if self._first_touched_at is None:
                self._first_touched_at = self._touched_at
            self._condition.notify_all()

    def _run(self) -> None:
        """Wait for events, let them settle for ``debounce`` seconds (not much longer), check."""
        while True:
            with self._condition:
                while not self._stopping and self._touched_at is None:
                    self._condition.wait()
                while not self._stopping and self._touched_at is not None and self._first_touched_at is not None:
                    due = min(self._touched_at + self._debounce,
                              self._first_touched_at + MAX_DELAY_FACTOR * self._debounce)
                    remaining = due - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                if self._stopping:
                    return
                self._touched_at = None
                self._first_touched_at = None
            try:
                self.check()
            except Exception:
                # A bug here must not end the watching for good.
                self._log.exception("checking %s for changes failed", self.path)

    def _follow_links(self) -> None:
        """Watch the directories the link chain goes through now, and no others (not on an observer thread)."""
        observer = self._observer
        if observer is None:
            return
        wanted = directories_to_watch(self.path)
        self._handler.names = names_that_matter(self.path, wanted)
        for directory in sorted(self._watches.keys() - wanted):
            with contextlib.suppress(KeyError, OSError):
                observer.unschedule(self._watches[directory])
            del self._watches[directory]
        for directory in sorted(wanted - self._watches.keys()):
            try:
                self._watches[directory] = observer.schedule(self._handler, directory, recursive=False)
            except OSError as error:
                self._log.warning("cannot watch %s (%s): changes there are noticed only by a reload (SIGHUP)",
                                  directory, error)
