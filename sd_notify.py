"""systemd service notifications (sd_notify) for both daemons, standard library only.

Under a ``Type=notify`` unit systemd passes ``NOTIFY_SOCKET`` (and, with
``WatchdogSec=``, ``WATCHDOG_USEC``/``WATCHDOG_PID``) to the service. The
daemons report ``READY=1`` once they do their job, ``STOPPING=1`` on shutdown,
a one-line ``STATUS=`` for ``systemctl status``, and ``WATCHDOG=1`` at half the
watchdog interval for as long as a health check passes: a daemon whose MQTT
network loop hangs stops pinging and systemd restarts it.

Outside systemd (no ``NOTIFY_SOCKET``: a terminal, the tests, ``make run``)
every call does nothing. Sending never raises: losing a notification must not
take a daemon down, so errors are only logged at debug level.

The environment is handed in (``SystemdNotifier(os.environ)``) rather than read
at import, so that tests and callers decide what the notifier sees.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping

LOGGER = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends sd_notify messages to the socket named by ``NOTIFY_SOCKET``."""

    def __init__(self, environ: Mapping[str, str], pid: int | None = None) -> None:
        """Read the notification settings from ``environ``.

        ``pid`` is this process's id (default ``os.getpid()``); the watchdog is
        only ours when ``WATCHDOG_PID``, if set, names it.
        """
        self._address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = environ.get("WATCHDOG_USEC", "")
        self._watchdog_pid = environ.get("WATCHDOG_PID", "")
        self._pid = os.getpid() if pid is None else pid
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._watchdog_stop = threading.Event()
        self._watchdog_thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a notification socket."""
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Send one raw notification (``"KEY=value"`` lines); True if it was sent."""
        if self._address is None:
            return False
        payload = state.encode("utf-8", errors="replace")
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.sendto(payload, self._address)
            except OSError as error:
                LOGGER.debug("sd_notify %r to %r failed: %s", state, self._address, error)
                self._close_socket()
                return False
        return True

    def ready(self, status: str = "") -> bool:
        """Tell systemd that start-up is complete (``READY=1``), with an optional status line."""
        if status:
            return self.notify(f"READY=1\nSTATUS={_one_line(status)}")
        return self.notify("READY=1")

    def stopping(self) -> bool:
        """Tell systemd that the daemon is shutting down (``STOPPING=1``)."""
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by ``systemctl status``."""
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Send one keep-alive ping (``WATCHDOG=1``)."""
        return self.notify("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between keep-alive pings (half of ``WATCHDOG_USEC``), or None.

        None when notifications are off, no watchdog is configured, the value
        is not a positive integer, or ``WATCHDOG_PID`` names another process.
        """
        if self._address is None:
            return None
        if self._watchdog_pid:
            try:
                if int(self._watchdog_pid) != self._pid:
                    return None
            except ValueError:
                return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def start_watchdog(self, is_healthy: Callable[[], bool]) -> threading.Thread | None:
        """Ping ``WATCHDOG=1`` every half interval while ``is_healthy()`` is True.

        Runs in a daemon thread, which is returned (None when systemd asked
        for no watchdog, or one is already running). The first check runs at
        once. A check that returns False or raises skips the ping: systemd
        then restarts the daemon when the interval runs out, unless the
        check passes again before that.
        """
        interval = self.watchdog_interval()
        if interval is None or self._watchdog_thread is not None:
            return None
        self._watchdog_stop.clear()
        thread = threading.Thread(
            target=self._watchdog_loop, args=(is_healthy, interval), name="sd-notify-watchdog", daemon=True
        )
        self._watchdog_thread = thread
        thread.start()
        return thread

    def stop_watchdog(self) -> None:
        """Stop the ping thread (on shutdown, before ``STOPPING=1``)."""
        thread = self._watchdog_thread
        if thread is None:
            return
        self._watchdog_stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout=5)
        self._watchdog_thread = None

    def close(self) -> None:
        """Stop the watchdog and release the socket."""
        self.stop_watchdog()
        with self._lock:
            self._close_socket()

    def _watchdog_loop(self, is_healthy: Callable[[], bool], interval: float) -> None:
        while True:
            try:
                healthy = bool(is_healthy())
            except Exception:
                LOGGER.exception("watchdog health check failed")
                healthy = False
            if healthy:
                self.watchdog()
            else:
                LOGGER.debug("watchdog: not healthy, no ping")
            if self._watchdog_stop.wait(interval):
                return

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(value: str) -> str | bytes | None:
    """The ``sendto`` address for ``NOTIFY_SOCKET``: a path, or an abstract name (``@``)."""
    if value.startswith("@") and len(value) > 1:
        # Abstract namespace: a leading NUL byte instead of the "@".
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # Empty, or a form this helper does not speak (vsock: "vsock:CID:PORT").
    return None


def _one_line(text: str) -> str:
    """A status value must not break the newline-separated KEY=value protocol."""
    return " ".join(text.splitlines())
