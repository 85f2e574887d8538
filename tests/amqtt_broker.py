"""A real amqtt broker (MQTT 3.1.1 only, not Mosquitto) as its own process, for integration tests.

amqtt (pinned in requirements-dev.txt) stands for the central brokers that
speak only MQTT 3.1.1: RabbitMQ's MQTT plugin before 3.13, older embedded
brokers. It answers an MQTT 5 CONNECT without a will with a refusal, and one
with a will not at all (it waits for bytes that never come): both ways a
daemon must find out by itself that it has to speak 3.1.1.

Each broker runs on a free port of 127.0.0.1 with anonymous access, started
as ``python -m amqtt.scripts.broker_script`` with the test interpreter, and is
stopped by the test's clean-up.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

from broker import free_port, wait_for


class Amqtt:
    """One amqtt process on 127.0.0.1:<port>; its log in ``log()``."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="kpm33b-amqtt-"))
        self.log_path = self.workdir / "amqtt.log"
        self.config_file = self.workdir / "amqtt.yaml"
        self.config_file.write_text(
            "listeners:\n"
            "  default:\n"
            "    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Amqtt:
        """Start the broker and wait until it accepts connections (its imports take a second or two)."""
        self._log = log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(self.config_file)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        wait_for(self._accepting, timeout=30)
        return self

    def _accepting(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"amqtt exited with {self.process.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def log(self) -> str:
        """What the broker logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go within 10 s."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop the broker and remove its working directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
