"""Real Mosquitto processes for integration tests.

Each test gets its own broker on a free port with a throw-away configuration,
so the suite never depends on (or disturbs) a broker already running on the
machine. The process can be stopped and restarted on the same port to inject
broker outages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> object:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes.

    Tests use this instead of fixed sleeps: they finish as soon as the
    condition holds and fail with a clear message when it never does.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


class Mosquitto:
    """One mosquitto process on 127.0.0.1:<port>, anonymous by default.

    ``extra_config`` lines are appended to the generated configuration
    (``max_queued_messages``, ``password_file`` …). ``config_file`` replaces the
    generated configuration entirely (to test the project's own broker config);
    the port must then be set in that file by the caller.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_config: str = "",
        config_file: Path | None = None,
        anonymous: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="kpm33b-mosquitto-"))
        self.log_path = self.workdir / "mosquitto.log"
        if config_file is None:
            config_file = self.workdir / "mosquitto.conf"
            # Started as root (as in CI), mosquitto would drop to the `mosquitto`
            # user, which cannot write its log or persistence file here.
            run_as = "user root\n" if os.geteuid() == 0 else ""
            config_file.write_text(
                run_as +
                f"listener {self.port} 127.0.0.1\n"
                f"allow_anonymous {'true' if anonymous else 'false'}\n"
                f"persistence true\n"
                f"persistence_location {self.workdir}/\n"
                f"log_dest file {self.log_path}\n"
                "log_type error\nlog_type warning\nlog_type notice\n"
                f"{extra_config}\n"
            )
        self.config_file = config_file
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        """Start the broker and wait until it accepts connections."""
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_for(self._accepting, timeout=10)
        return self

    def _accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            stderr = self.process.stderr.read().decode() if self.process.stderr else ""
            raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {stderr}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the broker (SIGTERM, so it saves its persistence file)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port, keeping persisted sessions."""
        self.stop()
        self.start()

    def log(self) -> str:
        """The broker's own log so far (for assertions on dropped messages)."""
        return self.log_path.read_text() if self.log_path.exists() else ""

    def cleanup(self) -> None:
        """Stop the broker and remove its working directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
