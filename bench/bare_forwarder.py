"""The Python ceiling for the proxy: a bare paho forwarder that transforms nothing.

    .venv/bin/python bench/bare_forwarder.py --internal-port P --central-port Q [--main-topic kpm33b]

It moves messages exactly as ``kpm33b_proxy.py`` does, minus the proxy's own
work (parsing, validation, filters, availability, discovery, journal):

- the internal client: paho 2.x, ``CallbackAPIVersion.VERSION2``, MQTT 5, a
  fixed client id with a persistent session (clean start off, 7-day session
  expiry), Receive Maximum 65,535, subscribed to ``MQTT_RT_DATA`` and
  ``MQTT_ENY_NOW`` at QoS 1, re-subscribing on every connect;
- ``on_message`` appends the payload, unchanged, to a deque guarded by a
  ``threading.Condition`` (notified per message, like the proxy's
  ``OutgoingQueue``);
- one publisher thread hands the deque to the central client (MQTT 5, paho's
  default in-flight limit, a retained last will), never more than 1,000
  unacknowledged messages at a time, at QoS 1, retained, on
  ``<main>/<meter id>/seconds`` or ``…/minutes``; the meter id is the
  13 bytes after ``{"id":"`` (a slice, not a parse: compact meter JSON starts so);
- ``<main>/bridge/state`` turns ``online`` (retained) once subscribed and
  connected, so the benchmark knows when to start, as with the proxy.

SIGTERM/SIGINT: stop and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections import deque
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

RECEIVE_MAXIMUM = 65_535  # as the proxy
PUBLISH_WINDOW = 1_000  # as the proxy
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600  # as the proxy
KEEPALIVE_SECONDS = 60
ID_START = len(b'{"id":"')
ID_END = ID_START + 13


class BareForwarder:
    """Internal broker → central broker, payloads untouched."""

    def __init__(self, host: str, internal_port: int, central_port: int, main_topic: str) -> None:
        self.host = host
        self.internal_port = internal_port
        self.central_port = central_port
        self.main_topic = main_topic
        self.kinds = {"MQTT_RT_DATA": "seconds", "MQTT_ENY_NOW": "minutes"}
        self.condition = threading.Condition()
        self.messages: deque[tuple[str, bytes]] = deque()
        self.outstanding = 0
        self.stopping = threading.Event()
        self.subscribed = False
        self.connected = False
        self.bridge_topic = f"{main_topic}/bridge/state"
        self.internal = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                    client_id="bench-bare-forwarder", protocol=MQTTProtocolVersion.MQTTv5)
        self.central = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                   client_id="bench-bare-forwarder-central", protocol=MQTTProtocolVersion.MQTTv5)
        self.central.will_set(self.bridge_topic, "offline", qos=1, retain=True)
        self.internal.on_connect = self._on_internal_connect
        self.internal.on_subscribe = self._on_internal_subscribe
        self.internal.on_message = self._on_internal_message
        self.central.on_connect = self._on_central_connect
        self.central.on_disconnect = self._on_central_disconnect
        self.central.on_publish = self._on_central_publish
        self.publisher = threading.Thread(target=self._publish_loop, name="central-publisher", daemon=True)

    def start(self) -> None:
        """Connect both clients in the background and start the publisher thread."""
        self.publisher.start()
        self.central.connect_async(self.host, self.central_port, keepalive=KEEPALIVE_SECONDS)
        self.central.loop_start()
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
        properties.ReceiveMaximum = RECEIVE_MAXIMUM
        self.internal.connect_async(self.host, self.internal_port, keepalive=KEEPALIVE_SECONDS, clean_start=False,
                                    properties=properties)
        self.internal.loop_start()

    def stop(self) -> None:
        """Disconnect both clients."""
        self.internal.disconnect()
        self.internal.loop_stop()
        self.stopping.set()
        with self.condition:
            self.condition.notify_all()
        self.publisher.join(timeout=2)
        self.central.disconnect()
        self.central.loop_stop()

    def _on_internal_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                             _properties: Any) -> None:
        if not reason_code.is_failure:
            client.subscribe([(topic, 1) for topic in self.kinds])

    def _on_internal_subscribe(self, *_args: Any) -> None:
        self.subscribed = True
        self._announce()

    def _on_internal_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        kind = self.kinds.get(message.topic)
        if kind is None:
            return
        payload = message.payload
        topic = f"{self.main_topic}/{payload[ID_START:ID_END].decode('ascii', 'replace')}/{kind}"
        with self.condition:
            self.messages.append((topic, payload))
            self.condition.notify()

    def _on_central_connect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                            _properties: Any) -> None:
        if reason_code.is_failure:
            return
        self.connected = True
        self._announce()
        with self.condition:
            self.condition.notify()

    def _on_central_disconnect(self, *_args: Any) -> None:
        self.connected = False

    def _announce(self) -> None:
        if self.subscribed and self.connected:
            self.central.publish(self.bridge_topic, "online", qos=1, retain=True)

    def _publish_loop(self) -> None:
        while True:
            with self.condition:
                while not self.stopping.is_set() and not (
                    self.connected and self.messages and self.outstanding < PUBLISH_WINDOW
                ):
                    self.condition.wait(1.0)
                if self.stopping.is_set():
                    return
                count = min(PUBLISH_WINDOW - self.outstanding, len(self.messages))
                batch = [self.messages.popleft() for _ in range(count)]
                self.outstanding += count
            for topic, payload in batch:
                self.central.publish(topic, payload, qos=1, retain=True)

    def _on_central_publish(self, *_args: Any) -> None:
        with self.condition:
            self.outstanding -= 1
            self.condition.notify()


def main(argv: list[str] | None = None) -> int:
    """Forward until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Bare paho forwarder (benchmark reference).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--internal-port", type=int, required=True)
    parser.add_argument("--central-port", type=int, required=True)
    parser.add_argument("--main-topic", default="kpm33b")
    args = parser.parse_args(argv)
    forwarder = BareForwarder(args.host, args.internal_port, args.central_port, args.main_topic)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    forwarder.start()
    while not stop.wait(0.5):
        pass
    forwarder.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
