"""The proxy's memory between real Mosquitto processes: what a burst of new meters leaves behind."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from broker import Mosquitto, wait_for
from daemons import Collector, config_dict, publish_all, publisher, start_proxy, write_config

TRIMMED = re.compile(r"gave freed memory back to the system \((?P<why>[^)]*)\): (?P<meters>\d+) meters")
BURST = 5_000  # Home Assistant's diagnostic configs of these take 25 s at 100 meters a tick


def rt_data(meter_id: str) -> str:
    return json.dumps({"id": meter_id, "zyggl": 1.5, "time": "20260112170000", "isend": "1"})


def trims(output: str) -> list[tuple[str, int]]:
    """``(why, meters)`` of each time the proxy gave freed memory back, in order."""
    return [(m["why"], int(m["meters"])) for m in TRIMMED.finditer(output)]


def test_the_memory_of_a_burst_of_new_meters_is_given_back_once_they_are_forwarded_not_a_minute_later(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    """A burst of new meters leaves tens of MB freed (its messages, discovery's configs) that glibc keeps.

    The proxy gives it back once the burst's readings are forwarded. It used to wait
    for a tick that ended with nothing queued; discovery sends the burst's
    diagnostic configs 100 meters a tick for long after it, and queues them in
    the very tick: the memory stayed until the trim of every minute.
    """
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port))
    readings = Collector(central_broker.port, "kpm33b/+/seconds")
    proxy = start_proxy(config)
    started = time.monotonic()
    client = publisher(internal_broker.port, max_inflight=1000)
    publish_all(client, [("MQTT_RT_DATA", rt_data(f"33B{n:010d}")) for n in range(BURST)])
    wait_for(lambda: readings.count() == BURST, timeout=40)
    # Well before the minute's trim (due 60 s after the start), and long before discovery is done.
    assert time.monotonic() - started < 45
    wait_for(lambda: ("a burst of new meters forwarded", BURST) in trims(proxy.output()), timeout=10)
    assert proxy.terminate() == 0
    client.disconnect()
    readings.close()
