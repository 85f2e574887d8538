"""What both daemons do as processes, written once: logging, counters, signals, the command line, ``main``.

Logging with syslog priorities for journald that never blocks the caller,
rate-limited logging of hostile input, thread-safe counters, the
SIGTERM/SIGINT/SIGHUP handling, the command line (``--config``,
``--check-config``) and the ``main`` skeleton both daemons run: parse the
command line, load the configuration or exit 2, start, run until a signal,
stop, exit with the daemon's code.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TextIO

from config_loader import Config, ConfigError, describe, load_config

CONFIG_ENV_VAR = "KPM33B_CONFIG"
EXIT_CONFIG_ERROR = 2

# Python has no level for syslog's "alert"; the missing-reply alerts need one
# so that `journalctl -p alert` finds exactly them.
ALERT = logging.CRITICAL + 5
logging.addLevelName(ALERT, "ALERT")

SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
    ALERT: 1,
}

# Log lines waiting for standard output; beyond this many they are dropped (and counted).
LOG_QUEUE_LINES = 10_000
# How long flushing (at exit) waits for the last lines to be written.
LOG_FLUSH_SECONDS = 2.0


class _JournalFormatter(logging.Formatter):
    """``<priority>logger: message``: journald stores the priority and the time."""

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return f"<{priority}>{record.name}: {super().format(record)}"


class NonBlockingStreamHandler(logging.Handler):
    """Writes log lines to a stream from a thread of its own: logging never blocks the caller.

    A daemon's standard output may be a pipe nobody reads (it fills and every
    write blocks: a network thread stuck in a log call stops the data flow)
    or one closed at the other end (every write fails: the standard
    ``StreamHandler`` prints a traceback per line). Here the caller only
    formats the line and puts it on a queue; one writer thread writes the
    lines in order. When ``capacity`` lines are waiting, further lines are
    dropped and counted (``dropped``), and so are lines whose write failed
    (``BrokenPipeError`` and any other ``OSError``), without a traceback:
    losing log lines is better than stopping the readings. Once writing works
    again, one WARNING line says how many were lost.

    The queue is a ``SimpleQueue``, whose ``put`` is reentrant, so a signal
    handler may log. ``flush()`` waits (at most ``flush_timeout``) until the
    lines logged before it are written, and ``close()`` (called by
    ``logging.shutdown`` at exit) flushes first: the last lines before an exit
    reach the journal. A file descriptor is written with ``os.write`` on a
    duplicate of its own, so that the stream's buffer (and its lock, and the
    interpreter's flush of it at exit) never meets a blocked writer.
    """

    def __init__(self, stream: TextIO, capacity: int = LOG_QUEUE_LINES,
                 flush_timeout: float = LOG_FLUSH_SECONDS) -> None:
        super().__init__()
        self._stream = stream
        self._fd = _duplicate_fd(stream)
        self._capacity = capacity
        self._flush_timeout = flush_timeout
        self._queue: queue.SimpleQueue[str | threading.Event | None] = queue.SimpleQueue()
        self._overflowed = 0   # lines dropped by ``emit`` (callers' threads, under the handler's lock)
        self._failed = 0       # lines whose write failed (the writer thread only)
        self._reported = 0     # of the dropped lines, how many a WARNING line has told of
        self._closed = False
        self._last_flush: threading.Event | None = None
        self._writer = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._writer.start()

    @property
    def dropped(self) -> int:
        """Lines lost so far: the queue was full, or standard output failed."""
        return self._overflowed + self._failed

    def emit(self, record: logging.LogRecord) -> None:
        """Format the line here, write it later: never waits for the stream."""
        if self._closed:
            return
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)  # a bug in a log call, not the stream
            return
        if self._queue.qsize() >= self._capacity:
            self._overflowed += 1
            return
        self._queue.put(line)

    def flush(self) -> None:
        """Wait until every line logged so far is written (or lost), at most ``flush_timeout`` seconds.

        Once a flush has timed out (the stream takes nothing), later ones do
        not wait again: an exit must not wait for a pipe nobody reads.
        """
        if self._closed or not self._writer.is_alive() or self._stuck():
            return
        written = threading.Event()
        self._last_flush = written
        self._queue.put(written)
        written.wait(self._flush_timeout)

    def close(self) -> None:
        """Write what is waiting (within ``flush_timeout``), then stop the writer."""
        if not self._closed:
            self.flush()
            self._closed = True
            self._queue.put(None)
            self._writer.join(0.0 if self._stuck() else self._flush_timeout)
            if not self._writer.is_alive() and self._fd is not None:
                os.close(self._fd)
                self._fd = None
        super().close()

    def _stuck(self) -> bool:
        return self._last_flush is not None and not self._last_flush.is_set()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < 500:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            lines: list[str] = []
            for item in batch:
                if isinstance(item, str):
                    lines.append(item)
                    continue
                self._write_lines(lines)  # everything before a flush marker or the end
                lines = []
                if item is None:
                    return
                item.set()
            self._write_lines(lines)

    def _write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        dropped = self.dropped
        missed = dropped - self._reported
        if missed:
            lines.insert(0, self.format(logging.makeLogRecord({
                "name": "logging", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"{missed} log lines were dropped: standard output was not read, or closed"})) + "\n")
        if self._write("".join(lines)):
            self._reported = dropped
        else:
            self._failed += len(lines) - (1 if missed else 0)

    def _write(self, text: str) -> bool:
        try:
            if self._fd is None:
                self._stream.write(text)
                self._stream.flush()
                return True
            view = memoryview(text.encode("utf-8", "backslashreplace"))
            while view:
                view = view[os.write(self._fd, view):]
        except (OSError, ValueError):  # BrokenPipeError, a closed stream, a full disk …
            return False
        return True


def _duplicate_fd(stream: TextIO) -> int | None:
    """A descriptor of our own for the stream's file, or None when it has none (tests' StringIO)."""
    try:
        return os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return None


def log_lines_dropped() -> int:
    """How many log lines the daemon's standard output lost so far (for its stats)."""
    return sum(handler.dropped for handler in logging.getLogger().handlers
               if isinstance(handler, NonBlockingStreamHandler))


def setup_logging(level: str, environ: Mapping[str, str], stream: TextIO | None = None) -> None:
    """Log one line per event to stdout (or ``stream``); with syslog priorities under systemd.

    ``$JOURNAL_STREAM`` is set by systemd when stdout goes to the journal.
    The handler never blocks the caller (``NonBlockingStreamHandler``):
    under systemd the journal reads the lines; elsewhere nobody may, and
    losing lines is better than stopping the data flow.
    """
    handler = NonBlockingStreamHandler(stream if stream is not None else sys.stdout)
    if environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for previous in root.handlers:
        if isinstance(previous, NonBlockingStreamHandler):
            previous.close()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("paho").setLevel(logging.WARNING)
    # watchdog logs every file event at DEBUG: noise, and a loop when the log
    # file lies in the configuration's directory (each line is an event).
    logging.getLogger("watchdog").setLevel(logging.WARNING)


class RateLimitedLog:
    """Logs at most ``burst`` lines per ``window`` seconds and counts the rest.

    A flood of garbage on the meters' broker must not flood the journal: the
    first few rejections are logged in full, the rest summarised with counts
    when the window ends. The summary has the level of the most severe line
    it stands for, so that ``journalctl -p err`` still shows that errors were
    left out.
    """

    def __init__(self, logger: logging.Logger, burst: int = 10, window: float = 60.0,
                 what: str = "rejected messages") -> None:
        self.logger = logger
        self.burst = burst
        self.window = window
        self.what = what  # what the summary says was not logged
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._logged = 0
        self._suppressed: Counter[str] = Counter()
        self._suppressed_level = logging.WARNING

    def warning(self, reason: str, message: str, *args: object) -> None:
        """Log a warning about input rejected for ``reason``, unless over the limit."""
        self._log(logging.WARNING, reason, message, *args)

    def error(self, reason: str, message: str, *args: object) -> None:
        """Log an error (e.g. a publish the broker refused for ``reason``), unless over the limit."""
        self._log(logging.ERROR, reason, message, *args)

    def _log(self, level: int, reason: str, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            summary = self._roll_window(now)
            allowed = self._logged < self.burst
            if allowed:
                self._logged += 1
            else:
                self._suppressed[reason] += 1
                self._suppressed_level = max(self._suppressed_level, level)
        if summary:
            self.logger.log(*summary)
        if allowed:
            self.logger.log(level, message, *args)

    def flush(self) -> None:
        """Log the summary of the current window now (at shutdown), and start a new window."""
        with self._lock:
            summary = self._roll_window(time.monotonic(), force=True)
        if summary:
            self.logger.log(*summary)

    def _roll_window(self, now: float, force: bool = False) -> tuple[int, str, str] | None:
        """Start a new window if the current one is over (or ``force``); the summary line to log, if any.

        ``force`` rather than a time one window on: ``(start + window) - start``
        can round to just below ``window``, and the summary would be lost.
        """
        if not force and now - self._window_start < self.window:
            return None
        summary = None
        if self._suppressed:
            counts = ", ".join(f"{reason} {count}" for reason, count in sorted(self._suppressed.items()))
            summary = (self._suppressed_level, "%s",
                       f"{sum(self._suppressed.values())} more {self.what} not logged ({counts})")
        self._window_start = now
        self._logged = 0
        self._suppressed.clear()
        self._suppressed_level = logging.WARNING
        return summary


class Counters:
    """Thread-safe named counters, for the stats and the tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to the counter ``name``."""
        with self._lock:
            self._counts[name] += amount

    def snapshot(self) -> dict[str, int]:
        """A copy of all counters."""
        with self._lock:
            return dict(self._counts)

    def get(self, name: str) -> int:
        """The value of one counter (0 when never counted)."""
        with self._lock:
            return self._counts[name]


def install_signal_handlers(stop: threading.Event, reload: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT set ``stop``; the main loop finishes and exits 0. SIGHUP never kills.

    ``systemctl reload`` sends SIGHUP, and its default action (terminate) is
    an exit systemd's ``Restart=on-failure`` takes for clean. With ``reload``,
    SIGHUP calls it; without, SIGHUP is logged and ignored.

    A handler runs on the main thread between two bytecodes, perhaps while
    that thread holds a lock: inside ``stop.wait`` it holds the event's own.
    Setting the event there, or logging, would wait for that lock for ever.
    So the handler only puts the signal on a ``queue.SimpleQueue`` (its
    ``put`` is reentrant), and a thread of its own logs it and sets ``stop``
    or calls ``reload``, which should still only hand the work over.
    """
    log = logging.getLogger(__name__)
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def deliver() -> None:
        while True:
            signum = received.get()
            name = signal.Signals(signum).name
            if signum != signal.SIGHUP:
                log.info("%s received, shutting down", name)
                stop.set()
            elif reload is None:
                log.warning("SIGHUP received: this daemon reads its configuration at start-up only; "
                            "restart it to apply changes")
            else:
                reload()

    threading.Thread(target=deliver, name="signals", daemon=True).start()

    def handle(signum: int, _frame: object) -> None:
        received.put(signum)

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGHUP, handle)


# --- the command line and main ----------------------------------------------------------


@dataclass(frozen=True)
class CommandLine:
    """What a daemon was asked to do on its command line."""

    config_path: Path
    check_only: bool


def parse_command_line(argv: list[str], environ: Mapping[str, str], script_dir: Path,
                       description: str) -> CommandLine:
    """``--config`` (default ``$KPM33B_CONFIG``, else config.yaml beside the script) and ``--check-config``."""
    default = environ.get(CONFIG_ENV_VAR) or str(script_dir / "config.yaml")
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default, help=f"configuration file (default: {default})")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the configuration, print any problems and exit (0 valid, 2 invalid)")
    args = parser.parse_args(argv)
    return CommandLine(config_path=Path(args.config), check_only=args.check_config)


def exit_with_problems(path: Path, error: ConfigError) -> NoReturn:
    """Print one line per problem and exit with code 2: never a traceback."""
    print(f"Invalid configuration {path}:", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def load_or_exit(command_line: CommandLine, environ: Mapping[str, str]) -> Config:
    """Load the configuration for a daemon; on ``--check-config`` report and exit."""
    try:
        config = load_config(command_line.config_path, environ)
    except ConfigError as error:
        exit_with_problems(command_line.config_path, error)
    if command_line.check_only:
        print(f"{command_line.config_path}: valid ({describe(config)})")
        sys.exit(0)
    return config


class Refused(Exception):
    """A daemon that must not start (its state is locked or unusable): one ERROR line, then ``exit_code``."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Daemon(Protocol):
    """What ``main`` runs: started, run until a signal, stopped; SIGHUP asks it to reload."""

    def start(self) -> None: ...

    def run(self, stop: threading.Event) -> int: ...

    def stop(self) -> None: ...

    def request_reload(self) -> None: ...


def freeze_long_lived() -> int:
    """Keep what is alive now out of the cyclic garbage collector's full passes (``gc.freeze``); how many.

    What a daemon has once started (modules, configuration, the state it
    loaded: up to 100,000 meters') lives as long as the daemon. A full
    collection walks every tracked object with the GIL held: 7 ms in a proxy
    with a few hundred meters, 23 ms with 100,000, a stall for every reading in
    flight. Frozen objects are still freed when nothing refers to them any
    more; only a reference cycle among them would stay, and the collection
    first clears those that are garbage now.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(name: str, description: str, script_dir: Path, argv: list[str], environ: Mapping[str, str],
         build: Callable[[Config, CommandLine], Daemon]) -> int:
    """The life of either daemon; its exit code.

    ``--check-config`` or an invalid configuration end here (0, or 2 with one
    line per problem). Otherwise: logging set up, ``starting: …`` logged under
    ``name``, the daemon built and started (``Refused``: its ERROR line and
    exit code), what it holds then frozen (``freeze_long_lived``),
    SIGTERM/SIGINT end ``run``, SIGHUP reloads, and ``stop``
    always runs once started.
    """
    command_line = parse_command_line(argv, environ, script_dir, description)
    config = load_or_exit(command_line, environ)
    setup_logging(config.logging.level, environ)
    log = logging.getLogger(name)
    log.info("starting: %s", describe(config))
    daemon = build(config, command_line)
    stop = threading.Event()
    install_signal_handlers(stop, reload=daemon.request_reload)
    try:
        daemon.start()
    except Refused as refused:
        log.error("%s", refused)
        return refused.exit_code
    log.debug("%d objects of the start kept out of the garbage collector's full passes", freeze_long_lived())
    try:
        return daemon.run(stop)
    finally:
        daemon.stop()
