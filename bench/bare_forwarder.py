"""The Python ceiling for the proxy: the simplest paho forwarder there is.

    .venv/bin/python bench/bare_forwarder.py --internal-port P --central-port Q [--main-topic kpm33b]

It is the reference the proxy is measured against, not a copy of the proxy's
plumbing: two paho 2.x clients (``CallbackAPIVersion.VERSION2``, MQTT 5,
paho's defaults otherwise), the internal one with a persistent session (clean
start off, a session expiry: the broker keeps its queue while the forwarder is
paused or away), subscribed at QoS 1 to ``MQTT_RT_DATA`` and ``MQTT_ENY_NOW``;
``on_message`` publishes the payload, unchanged, at QoS 1 and retained on
``<main>/<meter id>/seconds`` or ``…/minutes`` (the meter id is the 13 bytes
after ``{"id":"``: a slice, not a parse) and returns; paho acknowledges the
raw message itself when ``on_message`` returns (not when the central broker
has it: the proxy's acknowledgement chain is stricter). No queue, no thread
of its own, no window: paho's own in-flight limit and queue.

``<main>/bridge/state`` turns ``online`` (retained) once subscribed and
connected, so the benchmark knows when to start, as with the proxy.

SIGTERM/SIGINT: stop and exit 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600  # as the proxy
ID_START = len(b'{"id":"')
ID_END = ID_START + 13


def main(argv: list[str] | None = None) -> int:
    """Forward until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Bare paho forwarder (benchmark reference).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--internal-port", type=int, required=True)
    parser.add_argument("--central-port", type=int, required=True)
    parser.add_argument("--main-topic", default="kpm33b")
    args = parser.parse_args(argv)
    main_topic = args.main_topic
    kinds = {"MQTT_RT_DATA": "seconds", "MQTT_ENY_NOW": "minutes"}
    bridge_topic = f"{main_topic}/bridge/state"
    ready = {"subscribed": False, "connected": False}

    internal = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-bare-forwarder",
                           protocol=MQTTProtocolVersion.MQTTv5)
    central = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-bare-forwarder-central",
                          protocol=MQTTProtocolVersion.MQTTv5)
    central.will_set(bridge_topic, "offline", qos=1, retain=True)

    def announce() -> None:
        if ready["subscribed"] and ready["connected"]:
            central.publish(bridge_topic, "online", qos=1, retain=True)

    def on_internal_connect(client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if not reason_code.is_failure:
            client.subscribe([(topic, 1) for topic in kinds])

    def on_internal_subscribe(*_args: Any) -> None:
        ready["subscribed"] = True
        announce()

    def on_central_connect(_client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        if not reason_code.is_failure:
            ready["connected"] = True
            announce()

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        payload = message.payload
        central.publish(f"{main_topic}/{payload[ID_START:ID_END].decode('ascii', 'replace')}/{kinds[message.topic]}",
                        payload, qos=1, retain=True)

    internal.on_connect = on_internal_connect
    internal.on_subscribe = on_internal_subscribe
    internal.on_message = on_message
    central.on_connect = on_central_connect

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    central.connect_async(args.host, args.central_port)
    central.loop_start()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = SESSION_EXPIRY_SECONDS
    internal.connect_async(args.host, args.internal_port, clean_start=False, properties=properties)
    internal.loop_start()
    while not stop.wait(0.5):
        pass
    internal.disconnect()
    internal.loop_stop()
    central.disconnect()
    central.loop_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
