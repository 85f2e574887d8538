"""What both daemons do with MQTT and with their process, written once.

Client construction (MQTT 5, credentials, TLS with host-name verification,
last will, reconnect backoff), logging with syslog priorities for journald
that never blocks the caller, rate-limited logging of hostile input,
thread-safe counters and the SIGTERM/SIGINT/SIGHUP handling. The daemons stay
thin wiring on top of this.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from config_loader import BrokerSettings

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

# paho's own reconnect backoff (seconds): quick first retry, doubling, capped so
# that a broker coming back is found within half a minute. Each client draws its own
# first delay (the jitter), so that many clients do not retry in lock-step.
RECONNECT_MIN_DELAY = 1.0
RECONNECT_MAX_DELAY = 30.0
# After the broker refused our credentials, retrying fast cannot help.
REFUSED_MIN_DELAY = 30.0
REFUSED_MAX_DELAY = 300.0
CREDENTIALS_REFUSED = frozenset(("Bad user name or password", "Not authorized"))
SESSION_TAKEN_OVER = "Session taken over"
# Connections closed this soon after they began, this many times in a row, are
# taken for a fight over one client id (see ConnectionReporter.disconnected).
SHORT_LIVED_SECONDS = 10.0
SHORT_LIVED_LIMIT = 2
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


def make_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    will_topic: str | None = None,
    will_payload: str | None = None,
) -> mqtt.Client:
    """An MQTT 5 client for ``settings``, not yet connected.

    TLS always verifies the broker's certificate and host name: there is no
    option to turn that off, and no plaintext fallback.
    """
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls is not None:
        client.tls_set(
            ca_certs=settings.tls.ca_file,
            certfile=settings.tls.cert_file,
            keyfile=settings.tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will_topic is not None:
        client.will_set(will_topic, will_payload, qos=1, retain=True)
    reset_backoff(client)
    # A failing callback is logged and the network thread carries on, instead of
    # dying with the exception and leaving the daemon deaf.
    client.suppress_exceptions = True
    paho_log = logging.getLogger(f"paho.{client_id}")
    paho_log.addFilter(_drop_disconnected_loop_noise)
    client.enable_logger(paho_log)
    return client


def _drop_disconnected_loop_noise(record: logging.LogRecord) -> bool:
    """paho logs an ERROR for every loop pass after a deliberate disconnect: not an error."""
    return not record.getMessage().startswith("Client is not connected")


def connect_in_background(client: mqtt.Client, settings: BrokerSettings, *,
                          clean_start: bool = True, session_expiry: int = 0,
                          receive_maximum: int | None = None) -> None:
    """Start paho's network thread; it connects and reconnects with backoff by itself."""
    properties = Properties(PacketTypes.CONNECT)
    if session_expiry:
        properties.SessionExpiryInterval = session_expiry
    if receive_maximum:
        properties.ReceiveMaximum = receive_maximum
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=settings.keepalive_seconds,
        clean_start=clean_start,
        properties=properties,
    )
    client.loop_start()


def reset_backoff(client: mqtt.Client) -> None:
    """The normal reconnect backoff, with a jittered first delay."""
    client.reconnect_delay_set(RECONNECT_MIN_DELAY * random.uniform(1.0, 2.0), RECONNECT_MAX_DELAY)


def slow_backoff(client: mqtt.Client) -> None:
    """Retry slowly: the broker refused us, and hammering it will not change that."""
    client.reconnect_delay_set(REFUSED_MIN_DELAY * random.uniform(1.0, 1.5), REFUSED_MAX_DELAY)


def describe_connect_failure(error: BaseException | None) -> str:
    """Why a connection attempt failed, in words an operator can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate of the broker not accepted: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {error.reason or error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the broker running, and is the port right?)"
    if isinstance(error, socket.gaierror):
        return f"host name not found ({error.strerror})"
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    return "unknown error"


class ConnectionReporter:
    """Logs a broker connection's failures clearly and adapts the backoff.

    TLS problems (wrong CA, wrong host name) are ERRORs naming the cause,
    never followed by a plaintext attempt; refused credentials are an ERROR
    and slow the retries down; a session taken over by another client with the
    same id is an ERROR saying so, retried slowly instead of fighting for it.
    """

    def __init__(self, client: mqtt.Client, name: str, settings: BrokerSettings, logger: logging.Logger) -> None:
        self.client = client
        self.where = f"{name} broker {settings.host}:{settings.port}"
        self.log = logger
        self.slowed = False
        self.connected_at: float | None = None
        self.short_lived = 0  # connections in a row that were closed soon after they began
        client.on_connect_fail = self._on_connect_fail

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # paho calls this inside its `except OSError` block: the error is at hand.
        error = sys.exc_info()[1]
        level = logging.ERROR if isinstance(error, ssl.SSLError) else logging.WARNING
        self.log.log(level, "cannot connect to the %s: %s; retrying", self.where, describe_connect_failure(error))

    def connected(self, reason_code: Any) -> bool:
        """Call from on_connect: False (and logged) when the broker refused us."""
        if not reason_code.is_failure:
            self.connected_at = time.monotonic()
            return True
        reason = reason_text(reason_code)
        if reason in CREDENTIALS_REFUSED:
            self.log.error("the %s refused the credentials (%s): check the username and password; "
                           "retrying slowly", self.where, reason)
            self._slow_down()
        else:
            self.log.error("the %s refused the connection: %s", self.where, reason)
        return False

    def disconnected(self, reason_code: Any, deliberate: bool) -> None:
        """Call from on_disconnect.

        Mosquitto 2.0 closes a connection taken over by another client with the
        same id without saying why (MQTT 5's "Session taken over" is not sent),
        so connections closed again and again soon after they began are taken
        for that: two instances would otherwise evict each other every second.
        """
        lasted = time.monotonic() - self.connected_at if self.connected_at is not None else None
        self.connected_at = None
        if deliberate:
            return
        reason = reason_text(reason_code)
        if lasted is not None and lasted >= SHORT_LIVED_SECONDS:
            self.short_lived = 0
            if self.slowed:
                reset_backoff(self.client)
                self.slowed = False
        elif lasted is not None:
            self.short_lived += 1
        if reason == SESSION_TAKEN_OVER or self.short_lived >= SHORT_LIVED_LIMIT:
            self.log.error("another client with the same client id took over the session on the %s "
                           "(%s; a second instance running?); retrying slowly", self.where, reason)
            self._slow_down()
        else:
            self.log.warning("disconnected from the %s (%s); reconnecting", self.where, reason)

    def _slow_down(self) -> None:
        if not self.slowed:
            slow_backoff(self.client)
            self.slowed = True


def reason_text(reason_code: Any) -> str:
    """A reason code as words, whatever paho handed over."""
    return str(getattr(reason_code, "getName", lambda: reason_code)())


def refusal(reason_code: Any) -> str | None:
    """Why the broker refused a publish (its PUBACK reason ≥ 0x80), or None when it took it.

    MQTT 5 brokers refuse a QoS 1 publish in the PUBACK (Mosquitto 2.0 sends
    0x87 "Not authorized" for one its ACL denies) and deliver it to nobody, so
    a PUBACK is not proof of delivery. "No matching subscribers" (0x10) is
    not a refusal. Anything but a reason code counts as accepted: that is
    what paho reports for MQTT 3.1.1, whose PUBACK carries no reason.
    """
    if not isinstance(reason_code, ReasonCode) or not reason_code.is_failure:
        return None
    return reason_text(reason_code)


def network_thread_alive(client: mqtt.Client) -> bool:
    """Whether paho's network thread still runs (for the systemd watchdog)."""
    thread = getattr(client, "_thread", None)
    return thread is not None and thread.is_alive()


def install_signal_handlers(stop: threading.Event, reload: Callable[[], None] | None = None) -> None:
    """SIGTERM and SIGINT set ``stop``; the main loop finishes and exits 0. SIGHUP never kills.

    ``systemctl reload`` sends SIGHUP, and its default action (terminate) is
    an exit systemd's ``Restart=on-failure`` takes for clean. With ``reload``,
    SIGHUP calls it; without, SIGHUP is logged and ignored. ``reload`` runs in
    the signal handler, on the main thread between two bytecodes, perhaps
    while that thread holds a lock: it must only hand the work over (set an
    event, put on a ``queue.SimpleQueue``) and return, never reload itself.
    """
    log = logging.getLogger(__name__)

    def handle(signum: int, _frame: object) -> None:
        log.info("%s received, shutting down", signal.Signals(signum).name)
        stop.set()

    def handle_hangup(_signum: int, _frame: object) -> None:
        if reload is None:
            log.warning("SIGHUP received: this daemon reads its configuration at start-up only; "
                        "restart it to apply changes")
            return
        reload()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
    signal.signal(signal.SIGHUP, handle_hangup)
