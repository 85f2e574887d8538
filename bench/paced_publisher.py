"""A steady publisher for the latency benchmark: N messages per second, each send time recorded.

    .venv/bin/python bench/paced_publisher.py --port P --rate 1000 --input LINES --output TIMES

``LINES`` holds one ``<topic> <payload>`` per line. Each message is published
at QoS 1 at its slot ``start + i / rate`` (never early, never in a catch-up
burst); the ``time.monotonic()`` taken just before ``publish()`` is written to
``TIMES``, one line per message in input order, once the broker has
acknowledged them all. ``time.monotonic`` is the system-wide CLOCK_MONOTONIC,
so the benchmark compares it with its own receive times.

A process of its own, so that its pacing and the receiver's callbacks do not
share one interpreter lock. The garbage collector is off while it sends.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str] | None = None) -> int:
    """Publish the input at the rate; write the send times."""
    parser = argparse.ArgumentParser(description="Paced MQTT publisher (benchmark).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    messages = []
    for line in args.input.read_bytes().splitlines():
        topic, _, payload = line.partition(b" ")
        messages.append((topic.decode(), payload))
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-paced-publisher")
    client.max_inflight_messages_set(1000)
    client.connect(args.host, args.port)
    client.loop_start()
    deadline = time.monotonic() + 10
    while not client.is_connected():
        if time.monotonic() > deadline:
            print("paced publisher: cannot connect", file=sys.stderr)
            return 1
        time.sleep(0.01)
    sent: list[float] = []
    infos = []
    # A full collection here (12 ms seen) would hold a message between its send time and its
    # send, and count as the forwarder's latency: no collection until every message is out.
    gc.collect()
    gc.disable()
    start = time.monotonic() + 0.05
    for index, (topic, payload) in enumerate(messages):
        due = start + index / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sent.append(time.monotonic())
        infos.append(client.publish(topic, payload, qos=1))
    # The last message first: waiting on it lets paho's thread send it. Going through the others
    # first would keep the interpreter lock busy here and delay that send by up to a switch interval.
    for info in reversed(infos):
        info.wait_for_publish(timeout=30)
    client.disconnect()
    client.loop_stop()
    args.output.write_text("".join(f"{t:.9f}\n" for t in sent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
