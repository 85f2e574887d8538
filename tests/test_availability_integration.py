"""Availability stays true across a restart of the proxy, against real Mosquitto processes.

With the shortest intervals the meters allow (30 s and 1 min) a meter's
silence limit is 75 s: these tests wait that long, polling.
"""

from __future__ import annotations

import time
from pathlib import Path

from broker import Mosquitto, wait_for
from daemons import Collector, config_dict, publish_all, publisher, start_proxy, write_config
from payloads import eny_now, minute

HEARD = "33B1225950027"  # heard by the proxy before its restart (known from its state directory)
RETAINED = "33B1225950028"  # known only from the central broker's retained availability
LIMIT = 75.0




def test_meters_silent_across_a_restart_go_offline_at_their_limit(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port,
                                                upload_frequency_seconds=30))
    seeder = publisher(central_broker.port)
    seeder.publish(f"kpm33b/{RETAINED}/availability", "online", qos=1, retain=True).wait_for_publish(10)
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(HEARD, minute(0), 10.0))])
    states = Collector(central_broker.port, "kpm33b/+/availability")
    wait_for(lambda: states.on(f"kpm33b/{HEARD}/availability")[-1:] == [b"online"], timeout=15)
    last_reading = time.monotonic()
    assert proxy.terminate() == 0

    proxy = start_proxy(config)
    restarted = time.monotonic()

    wait_for(lambda: states.on(f"kpm33b/{HEARD}/availability")[-1:] == [b"offline"]
             and states.on(f"kpm33b/{RETAINED}/availability")[-1:] == [b"offline"], timeout=LIMIT + 30)
    took = time.monotonic() - restarted
    assert took >= LIMIT - (restarted - last_reading) - 1.0
    assert proxy.terminate() == 0
    warnings = [line for line in proxy.output().splitlines() if " WARNING " in line and "is offline" in line]
    assert len(warnings) == 2
    assert any(HEARD in line and "silent for" in line for line in warnings)
    assert any(RETAINED in line for line in warnings)
    seeder.disconnect()
    client.disconnect()
    states.close()


def test_a_meter_coming_back_is_an_info_and_online_again(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port,
                                                upload_frequency_seconds=30))
    seeder = publisher(central_broker.port)
    seeder.publish(f"kpm33b/{RETAINED}/availability", "offline", qos=1, retain=True).wait_for_publish(10)
    proxy = start_proxy(config)
    states = Collector(central_broker.port, f"kpm33b/{RETAINED}/availability")
    wait_for(lambda: states.on(f"kpm33b/{RETAINED}/availability") == [b"offline"])
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_ENY_NOW", eny_now(RETAINED, minute(0), 10.0))])

    wait_for(lambda: states.on(f"kpm33b/{RETAINED}/availability")[-1:] == [b"online"], timeout=15)
    assert proxy.terminate() == 0
    assert any(" INFO " in line and f"meter {RETAINED} is online" in line for line in proxy.output().splitlines())
    seeder.disconnect()
    client.disconnect()
    states.close()


def test_silence_is_counted_from_the_last_reading_kept_in_the_state_directory(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    # Heard 60 s before this start (as the state directory tells): offline about 15 s after it, not 75 s.
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port,
                                                upload_frequency_seconds=30))
    state = tmp_path / "state"
    state.mkdir()
    (state / "last_seen").write_text(f"{HEARD} {time.time() - 60:.0f} online\n")
    states = Collector(central_broker.port, "kpm33b/+/availability")
    started = time.monotonic()
    proxy = start_proxy(config)

    wait_for(lambda: states.on(f"kpm33b/{HEARD}/availability")[-1:] == [b"offline"], timeout=40)

    took = time.monotonic() - started
    assert 13.0 <= took <= 25.0, f"offline after {took:.1f} s"
    assert proxy.terminate() == 0
    saved = (state / "last_seen").read_text().split()
    assert saved[0] == HEARD and saved[2] == "offline" and abs(float(saved[1]) - (time.time() - 60 - took)) < 5
    states.close()
