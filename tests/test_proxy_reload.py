"""The proxy takes configuration edits and SIGHUP without a restart, against real Mosquitto processes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import Collector, config_dict, publish_all, publisher, start_proxy, write_config
from payloads import eny_now, minute, rt_data

METER = "33B1225950027"
OTHER = "33B1225950028"
NAME_TOPIC = f"homeassistant/sensor/kpm33b_{METER}/active_energy/config"


def device_name(collector: Collector) -> str | None:
    configs = [payload for payload in collector.on(NAME_TOPIC) if payload]
    return json.loads(configs[-1])["device"]["name"] if configs else None


@pytest.fixture
def setup(tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto):
    document = config_dict(internal_broker.port, central_broker.port,
                           devices={METER: {"name": "Heat pump"}})
    config = write_config(tmp_path, document, atomic=True)  # saved as an editor does, like every edit here
    return config, document


def test_a_rename_exclusion_and_per_phase_take_effect_within_seconds_without_losing_a_reading(
        setup, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    config, document = setup
    everything = Collector(central_broker.port, "kpm33b/#", "homeassistant/#")
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(0), 100.0)),
                         ("MQTT_ENY_NOW", eny_now(OTHER, minute(0), 100.0))])
    wait_for(lambda: device_name(everything) == "Heat pump", timeout=15)

    document["meters"]["devices"] = {METER: {"name": "Boiler", "per_phase": ["voltage"]}}
    document["meters"]["exclude"] = [OTHER]
    write_config(config.parent, document, atomic=True)
    # Readings keep flowing while the configuration changes.
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(n), 100.0 + n / 100)) for n in range(1, 200)])

    wait_for(lambda: device_name(everything) == "Boiler", timeout=10)
    wait_for(lambda: everything.on(f"homeassistant/sensor/kpm33b_{OTHER}/active_energy/config")[-1:] == [b""],
             timeout=10)
    wait_for(lambda: everything.on(f"kpm33b/{OTHER}/minutes")[-1:] == [b""], timeout=10)
    wait_for(lambda: len(everything.on(f"kpm33b/{METER}/minutes")) == 200, timeout=15)
    publish_all(client, [("MQTT_RT_DATA", rt_data(METER, minute(300))),
                         ("MQTT_ENY_NOW", eny_now(OTHER, minute(300), 103.0))])
    wait_for(lambda: everything.on(f"kpm33b/{METER}/seconds"), timeout=10)
    assert json.loads(everything.on(f"kpm33b/{METER}/seconds")[-1])["voltage_l1"] == 230.1
    assert [payload for payload in everything.on(f"kpm33b/{OTHER}/minutes") if payload] == [
        json.dumps({"id": OTHER, "time": "2026-01-12T17:00:00", "active_energy": 100.0}).encode()]
    assert proxy.terminate() == 0
    assert "configuration reloaded" in proxy.output()
    assert "Traceback" not in proxy.output()
    client.disconnect()
    everything.close()


def test_a_broker_change_is_a_warning_that_it_takes_effect_at_the_next_start(
        setup, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    config, document = setup
    proxy = start_proxy(config)

    document["central_broker"]["port"] = central_broker.port + 1
    write_config(config.parent, document, atomic=True)

    wait_for(lambda: "takes effect when the proxy is next started" in proxy.output(), timeout=10)
    line = next(line for line in proxy.output().splitlines() if "next started" in line)
    assert " WARNING " in line and "central_broker" in line
    assert proxy.alive()
    assert proxy.terminate() == 0


def test_sighup_reloads_and_the_proxy_goes_on(setup, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    config, _document = setup
    collector = Collector(central_broker.port, "homeassistant/#", f"kpm33b/{METER}/minutes")
    proxy = start_proxy(config)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(0), 100.0))])
    wait_for(lambda: device_name(collector) == "Heat pump", timeout=15)

    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP" in proxy.output(), timeout=10)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(1), 100.01))])
    wait_for(lambda: len(collector.on(f"kpm33b/{METER}/minutes")) == 2, timeout=10)
    assert proxy.alive()
    # An invalid file: an ERROR, and the last good configuration goes on.
    config.write_text("meters: [not, a, mapping]\n")
    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the last good configuration" in proxy.output(), timeout=10)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(2), 100.02))])
    wait_for(lambda: len(collector.on(f"kpm33b/{METER}/minutes")) == 3, timeout=10)
    assert proxy.alive()
    assert proxy.terminate() == 0
    client.disconnect()
    collector.close()


@pytest.mark.parametrize("how", ["edit the target", "re-point the link"])
def test_a_symlinked_configuration_is_reloaded(
        tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto, how: str) -> None:
    document = config_dict(internal_broker.port, central_broker.port, devices={METER: {"name": "Heat pump"}})
    write_config(tmp_path / "a", document, atomic=True)
    link = tmp_path / "config.yaml"
    link.symlink_to(tmp_path / "a" / "config.yaml")
    collector = Collector(central_broker.port, "homeassistant/#")
    proxy = start_proxy(link)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(0), 100.0))])
    wait_for(lambda: device_name(collector) == "Heat pump", timeout=15)

    document["meters"]["devices"] = {METER: {"name": "Boiler"}}
    if how == "edit the target":
        write_config(tmp_path / "a", document, atomic=True)
    else:
        write_config(tmp_path / "b", document, atomic=True)
        new_link = tmp_path / "config.yaml.new"
        new_link.symlink_to(tmp_path / "b" / "config.yaml")
        os.replace(new_link, link)  # what `ln -sfn` amounts to

    wait_for(lambda: device_name(collector) == "Boiler", timeout=10)
    assert proxy.terminate() == 0
    client.disconnect()
    collector.close()
