"""Helpers for integration tests: configurations, MQTT collectors, daemon processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, ClassVar

import paho.mqtt.client as mqtt
import yaml
from broker import wait_for
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

ROOT = Path(__file__).resolve().parent.parent


def config_dict(internal_port: int, central_port: int, **meters: Any) -> dict[str, Any]:
    """A configuration for brokers on 127.0.0.1 at the given ports; ``meters`` keys override."""
    return {
        "internal_broker": {"host": "127.0.0.1", "port": internal_port},
        "central_broker": {"host": "127.0.0.1", "port": central_port},
        "meters": {"upload_frequency_seconds": 60, "upload_frequency_minutes": 1, **meters},
        "logging": {"level": "DEBUG"},
    }


def write_config(directory: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as config.yaml in ``directory``; its path."""
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


class Collector:
    """Subscribes to topics on a broker and records every message it receives."""

    def __init__(self, port: int, *topics: str, client_id: str = "", persistent: bool = False) -> None:
        """``persistent``: a session that the broker keeps (and persists) across a restart of either side."""
        self.messages: list[tuple[str, bytes, bool]] = []
        # QoS 1 is at-least-once between the broker and this collector too: after a
        # broker restart it may resend what we had received (flagged DUP). Those are
        # counted here and left out of `messages`, which then shows what the
        # publisher sent, duplicates included.
        self.redelivered = 0
        self._seen: set[tuple[str, bytes]] = set()
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)
        # With a session kept by the broker the subscriptions are still there:
        # subscribing again would replay the retained messages as if new.
        self.client.on_connect = lambda c, _u, flags, *_: (
            None if flags.session_present else c.subscribe([(topic, 1) for topic in topics]))
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.1, 0.5)
        properties = None
        if persistent:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=properties)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("collector could not subscribe")

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        key = (message.topic, message.payload)
        with self._lock:
            if message.dup and key in self._seen:
                self.redelivered += 1
                return
            self._seen.add(key)
            self.messages.append((message.topic, message.payload, bool(message.retain)))

    def on(self, topic: str) -> list[bytes]:
        """Payloads received on ``topic``, in order."""
        with self._lock:
            return [payload for t, payload, _retain in self.messages if t == topic]

    def topics(self) -> list[str]:
        """Topics of all messages, in order of arrival."""
        with self._lock:
            return [topic for topic, _payload, _retain in self.messages]

    def count(self, suffix: str = "") -> int:
        """How many messages arrived on topics ending with ``suffix``."""
        with self._lock:
            return sum(1 for topic, _p, _r in self.messages if topic.endswith(suffix))

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


def publisher(port: int) -> mqtt.Client:
    """A connected MQTT client for publishing test input."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    wait_for(client.is_connected)
    return client


def publish_all(client: mqtt.Client, messages: list[tuple[str, bytes | str]]) -> None:
    """Publish at QoS 1 and wait until the broker has every message."""
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(timeout=30)


class DaemonProcess:
    """One of the project's daemons as a real process, its output captured to a file.

    Every instance is remembered until it has ended, so that a failing test
    cannot leave a daemon running (see ``kill_leftover_daemons`` in conftest).
    """

    started: ClassVar[list[DaemonProcess]] = []

    def __init__(self, script: str, config_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = config_path.parent / f"{Path(script).stem}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in wait/stop)
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, str(ROOT / script), "--config", str(config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=environment, cwd=config_path.parent,
        )
        DaemonProcess.started.append(self)

    def output(self) -> str:
        """What the daemon logged so far."""
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 15) -> int:
        """SIGTERM and wait; the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        self.process.kill()
        self.wait(10)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the exit; the exit code."""
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None
