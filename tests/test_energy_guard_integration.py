"""The energy guard in the proxy daemon between two real Mosquitto processes.

What reaches the central broker is the meter's truth: a glitch never, a real
counter reset after it has shown itself, a negative energy never, and all of
it the same across a restart of the proxy at any point.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import Collector, config_dict, energies, logged_stats, publish_all, publisher, start_proxy, write_config
from payloads import eny_now, minute

METER = "33B1225950027"
MINUTES_TOPIC = f"kpm33b/{METER}/minutes"








@pytest.fixture
def config(tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> Path:
    return write_config(tmp_path, config_dict(internal_broker.port, central_broker.port))


@pytest.mark.parametrize("glitch", [1e9, 1e308])
def test_an_implausible_energy_is_never_forwarded_and_does_not_lock_the_meter_out(
        config: Path, internal_broker: Mosquitto, central_broker: Mosquitto, glitch: float) -> None:
    collector = Collector(central_broker.port, MINUTES_TOPIC)
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(n), value))
                         for n, value in enumerate([100.0, glitch, 101.0, 102.0, 103.0])])

    wait_for(lambda: energies(collector, METER) == [100.0, 101.0, 102.0, 103.0], timeout=15)
    assert proxy.terminate() == 0
    assert logged_stats(proxy.output())["dropped"] == {"implausible_rise": 1}
    warnings = [line for line in proxy.output().splitlines() if "WARNING" in line and "rise faster" in line]
    assert len(warnings) == 1 and METER in warnings[0] and repr(glitch) in warnings[0]
    client.disconnect()
    collector.close()


@pytest.mark.parametrize("restart_after", [1, 2, 3])
@pytest.mark.parametrize("how", ["terminate", "kill"])
def test_an_implausible_energy_is_never_forwarded_across_a_restart_at_any_point(
        config: Path, internal_broker: Mosquitto, central_broker: Mosquitto, restart_after: int, how: str) -> None:
    # The proxy is stopped after `restart_after` readings, and a new one goes on.
    collector = Collector(central_broker.port, MINUTES_TOPIC)
    readings = [eny_now(METER, minute(n), value) for n, value in enumerate([100.0, 1e9, 101.0, 102.0])]
    client = publisher(internal_broker.port)
    proxy = start_proxy(config)
    publish_all(client, [("MQTT_ENY_NOW", reading) for reading in readings[:restart_after]])
    wait_for(lambda: energies(collector, METER)[:1] == [100.0], timeout=15)
    if how == "kill":
        proxy.kill()
    else:
        assert proxy.terminate() == 0

    publish_all(client, [("MQTT_ENY_NOW", reading) for reading in readings[restart_after:]])
    proxy = start_proxy(config)

    wait_for(lambda: energies(collector, METER)[-1:] == [102.0], timeout=15)
    assert proxy.terminate() == 0
    assert 1e9 not in energies(collector, METER)
    assert sorted(set(energies(collector, METER))) == [100.0, 101.0, 102.0]
    client.disconnect()
    collector.close()


def test_a_counter_reset_is_accepted_after_three_readings_and_survives_a_restart(
        config: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    collector = Collector(central_broker.port, MINUTES_TOPIC)
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(n), value))
                         for n, value in enumerate([5000.0, 5000.1, 12.0, 12.1, 12.2])])

    wait_for(lambda: energies(collector, METER) == [5000.0, 5000.1, 12.0, 12.1, 12.2], timeout=15)
    assert proxy.terminate() == 0
    resets = [line for line in proxy.output().splitlines() if "WARNING" in line and "reset" in line]
    assert len(resets) == 1 and METER in resets[0] and "5000.1 kWh" in resets[0] and "12.0 kWh" in resets[0]
    # The new floor was kept: after a restart the new count goes on, the old one is a glitch.
    proxy = start_proxy(config)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(5), 12.3)),
                         ("MQTT_ENY_NOW", eny_now(METER, minute(6), 12.4))])
    wait_for(lambda: energies(collector, METER)[-2:] == [12.3, 12.4], timeout=15)
    assert proxy.terminate() == 0
    assert logged_stats(proxy.output())["dropped"] == {}
    client.disconnect()
    collector.close()


def test_a_single_low_value_between_normal_ones_is_dropped(
        config: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    collector = Collector(central_broker.port, MINUTES_TOPIC)
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(n), value))
                         for n, value in enumerate([5000.0, 12.0, 5000.1, 5000.2])])

    wait_for(lambda: energies(collector, METER) == [5000.0, 5000.1, 5000.2], timeout=15)
    assert proxy.terminate() == 0
    assert logged_stats(proxy.output())["dropped"] == {"energy_decrease": 1}
    client.disconnect()
    collector.close()


def test_negative_energy_is_rejected_and_an_extra_text_tag_is_ignored(
        config: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    collector = Collector(central_broker.port, MINUTES_TOPIC)
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(0), -5.0)),
                         ("MQTT_ENY_NOW", eny_now(METER, minute(1), 7.5, ver="V1.9"))])

    wait_for(lambda: energies(collector, METER) == [7.5], timeout=15)
    assert proxy.terminate() == 0
    assert logged_stats(proxy.output())["dropped"] == {"bad_value": 1}
    assert "energy -5.0 is negative" in proxy.output()
    client.disconnect()
    collector.close()


def test_exported_energy_reaches_the_central_broker_for_the_meters_that_ask_and_never_steps_back(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    other = "33B1225950028"
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, export_energy=True,
                                                devices={other: {"export_energy": False}}))
    collector = Collector(central_broker.port, MINUTES_TOPIC, f"kpm33b/{other}/minutes",
                          f"homeassistant/sensor/kpm33b_{METER}/active_energy_export/config")
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)

    publish_all(client, [("MQTT_ENY_NOW", json.dumps({"id": METER, "zygsz": 100.0 + n / 10, "fygsz": export,
                                                      "time": minute(n), "isend": "1"}))
                         for n, export in enumerate([20.0, 20.5, 0.0, 20.7])]
                + [("MQTT_ENY_NOW", json.dumps({"id": other, "zygsz": 7.0, "fygsz": 3.0, "time": minute(0),
                                                "isend": "1"}))])

    wait_for(lambda: len(collector.on(MINUTES_TOPIC)) == 4 and collector.on(f"kpm33b/{other}/minutes"),
             timeout=15)
    assert [json.loads(p)["active_energy_export"] for p in collector.on(MINUTES_TOPIC)] == [20.0, 20.5, None, 20.7]
    assert energies(collector, METER) == [100.0, 100.1, 100.2, 100.3]
    assert json.loads(collector.on(f"kpm33b/{other}/minutes")[0]) == {
        "id": other, "time": "2026-01-12T17:00:00", "active_energy": 7.0}
    config_payload = json.loads(collector.on(
        f"homeassistant/sensor/kpm33b_{METER}/active_energy_export/config")[0])
    assert (config_payload["name"], config_payload["device_class"], config_payload["state_class"],
            config_payload["unit_of_measurement"]) == ("Exported energy", "energy", "total_increasing", "kWh")
    assert proxy.terminate() == 0
    client.disconnect()
    collector.close()
