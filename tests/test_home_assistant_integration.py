"""Home Assistant discovery through the proxy between two real Mosquitto processes.

The proxy runs in-process (``Proxy`` with its timer thread, as ``main`` runs it)
or as a real process; the tests look at the central broker as Home Assistant
does: retained configs under ``homeassistant/``, the clean topics they point to,
and ``online`` on ``homeassistant/status``.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from broker import wait_for
from daemons import Collector, config_dict, publish_all, publisher, start_proxy, write_config
from ha_templates import render
from payloads import RT_DATA, capture, captured_rt_data, eny_now

import config_loader
from ha_discovery import bridge_configs, discovery_configs
from kpm33b_proxy import Proxy

METER = "33B1225950027"
OTHER = "33B1225950028"
PREFIX = "homeassistant"
BRIDGE_CONFIGS = 5  # the connection state and four counters
METER_CONFIGS = 4  # active power, active energy, configuration, clock offset


def config_topic(meter_id: str, object_id: str) -> str:
    return f"{PREFIX}/sensor/kpm33b_{meter_id}/{object_id}/config"


def meter_configs(configs: dict[str, Any]) -> dict[str, Any]:
    """The configs of meters only (the bridge's left out)."""
    return {topic: config for topic, config in configs.items() if "/kpm33b_bridge" not in topic}


@contextmanager
def running_proxy(config_document: dict[str, Any], state_dir: Path) -> Iterator[Proxy]:
    """The proxy in-process with its timers, as ``main`` runs it, until the block ends."""
    proxy = Proxy(config_loader.parse_config(config_document, {}), state_dir)
    stop = threading.Event()
    proxy.start()
    timers = threading.Thread(target=proxy.run, args=(stop,), daemon=True)
    timers.start()
    try:
        wait_for(lambda: proxy.forwarding)
        yield proxy
    finally:
        stop.set()
        timers.join(5)
        proxy.stop()


def retained_configs(port: int, count: int) -> dict[str, dict[str, Any]]:
    """What a late subscriber (Home Assistant starting) finds, once there are ``count`` retained configs."""
    snapshot: dict[str, bytes] = {}

    def enough() -> bool:
        snapshot.clear()
        snapshot.update(retained_store(port, f"{PREFIX}/#"))
        return len(snapshot) >= count

    wait_for(enough)
    return {topic: json.loads(payload) for topic, payload in snapshot.items()}


def retained_store(port: int, *filters: str) -> dict[str, bytes]:
    """Every retained message under ``filters`` now (waits until the broker has sent them)."""
    marker = "kpm33b-test/marker"
    setter = publisher(port)
    setter.publish(marker, b"1", qos=1, retain=True).wait_for_publish(10)
    setter.disconnect()
    late = Collector(port, *filters, marker)
    try:
        wait_for(lambda: late.on(marker))  # retained messages arrive in one go on subscribing
        return {topic: payload for topic, payload, _retained in late.messages if topic != marker}
    finally:
        late.close()


def test_a_meters_first_reading_creates_its_retained_discovery_configs(tmp_path, internal_broker, central_broker):
    config_document = config_dict(internal_broker.port, central_broker.port)
    live = Collector(central_broker.port, f"{PREFIX}/#", "kpm33b/+/seconds")
    with running_proxy(config_document, tmp_path / "state") as proxy:
        wait_for(lambda: live.count("/config") == BRIDGE_CONFIGS)  # the bridge, at once
        assert retained_configs(central_broker.port, BRIDGE_CONFIGS) == bridge_configs("kpm33b", PREFIX)
        client = publisher(internal_broker.port)
        publish_all(client, [("MQTT_RT_DATA", RT_DATA)])
        wait_for(lambda: live.count("/seconds") and live.count("/config") == BRIDGE_CONFIGS + METER_CONFIGS)
        topics = live.topics()
        # The configs travel ahead of the reading they describe.
        assert topics.index(config_topic(METER, "active_power")) < topics.index(f"kpm33b/{METER}/seconds")
        assert retained_configs(central_broker.port, BRIDGE_CONFIGS + METER_CONFIGS) == {
            **bridge_configs("kpm33b", PREFIX), **discovery_configs(METER, proxy.config.meters, "kpm33b", PREFIX)}
        client.disconnect()
    live.close()


def test_home_assistant_online_republishes_the_configs(tmp_path, internal_broker, central_broker):
    with running_proxy(config_dict(internal_broker.port, central_broker.port), tmp_path / "state"):
        client = publisher(internal_broker.port)
        publish_all(client, [("MQTT_RT_DATA", RT_DATA)])
        count = BRIDGE_CONFIGS + METER_CONFIGS
        expected = retained_configs(central_broker.port, count)
        live = Collector(central_broker.port, f"{PREFIX}/sensor/#", f"{PREFIX}/binary_sensor/#")
        wait_for(lambda: live.count("/config") == count)
        home_assistant = publisher(central_broker.port)
        home_assistant.publish(f"{PREFIX}/status", "online", qos=1).wait_for_publish(10)
        wait_for(lambda: live.count("/config") == 2 * count)
        again = [(topic, json.loads(payload)) for topic, payload, retained in live.messages[count:]]
        assert dict(again) == expected
        assert not any(retained for _topic, _payload, retained in live.messages[count:])  # sent anew
        home_assistant.publish(f"{PREFIX}/status", "offline", qos=1).wait_for_publish(10)
        client.disconnect()
        home_assistant.disconnect()
    assert live.count("/config") == 2 * count
    live.close()


def test_rename_and_restart_changes_the_device_name_and_keeps_the_unique_ids(tmp_path, internal_broker,
                                                                           central_broker):
    """As real processes; one meter only ever sent power, so only the broker remembers it."""
    path = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port))
    first = start_proxy(path)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER)),
                         ("MQTT_ENY_NOW", eny_now(OTHER, "20260117211500", 163.486))])
    before = meter_configs(retained_configs(central_broker.port, BRIDGE_CONFIGS + 2 * METER_CONFIGS))
    assert {config["device"]["name"] for config in before.values()} == {f"KPM33B {METER}", f"KPM33B {OTHER}"}
    assert first.terminate() == 0

    live = Collector(central_broker.port, f"{PREFIX}/#")
    path = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, devices={
        METER: {"name": "Heat pump"}, OTHER: {"name": "Garage"}}))
    second = start_proxy(path, wait_online=False)
    wait_for(lambda: sum(1 for _t, _p, retained in live.messages if not retained)
             >= BRIDGE_CONFIGS + 2 * METER_CONFIGS, timeout=15)
    after = meter_configs(retained_configs(central_broker.port, BRIDGE_CONFIGS + 2 * METER_CONFIGS))
    assert sorted(after) == sorted(before)
    for topic, config in after.items():
        name = "Heat pump" if METER in topic else "Garage"
        assert config["device"]["name"] == name
        assert config["unique_id"] == before[topic]["unique_id"]
        assert config["device"]["identifiers"] == before[topic]["device"]["identifiers"]
        assert {key: value for key, value in config.items() if key != "device"} == {
            key: value for key, value in before[topic].items() if key != "device"}
    assert second.terminate() == 0
    assert "Traceback" not in first.output() + second.output()
    client.disconnect()
    live.close()


def test_excluding_a_meter_across_a_restart_clears_its_configs_and_retained_readings(tmp_path, internal_broker,
                                                                                    central_broker):
    """Also removes the per-phase entities of a group no longer configured."""
    state = tmp_path / "state"
    client = publisher(internal_broker.port)
    with running_proxy(config_dict(internal_broker.port, central_broker.port,
                                   devices={OTHER: {"per_phase": ["voltage", "power_factor"]}}), state):
        publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER)),
                             ("MQTT_ENY_NOW", eny_now(METER, "20260117211500", 163.486)),
                             ("MQTT_RT_DATA", captured_rt_data(OTHER))])
        retained_configs(central_broker.port, BRIDGE_CONFIGS + METER_CONFIGS + METER_CONFIGS + 7)
        wait_for(lambda: f"kpm33b/{METER}/minutes" in retained_store(central_broker.port, "kpm33b/#"))

    with running_proxy(config_dict(internal_broker.port, central_broker.port, exclude=[METER],
                                   devices={OTHER: {"per_phase": ["voltage"]}}), state):
        removed = [config_topic(METER, "active_power"), config_topic(METER, "active_energy"),
                   f"kpm33b/{METER}/seconds", f"kpm33b/{METER}/minutes", f"kpm33b/{METER}/availability",
                   *(config_topic(OTHER, f"power_factor{phase}") for phase in ("_l1", "_l2", "_l3", ""))]
        wait_for(lambda: not set(removed) & set(retained_store(central_broker.port, f"{PREFIX}/#", "kpm33b/#")))
        store = retained_store(central_broker.port, f"{PREFIX}/#", "kpm33b/#")
        assert not [topic for topic in store if METER in topic]
        assert sorted(topic for topic in meter_configs(store) if topic.endswith("/config")) == sorted(
            config_topic(OTHER, object_id)
            for object_id in ("active_power", "active_energy", "voltage_l1", "voltage_l2", "voltage_l3",
                              "configuration", "clock_offset"))
        assert f"kpm33b/{OTHER}/seconds" in store
        # The excluded meter keeps speaking: nothing of it comes back.
        publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER)), ("MQTT_RT_DATA", captured_rt_data(OTHER))])
    assert not [topic for topic in retained_store(central_broker.port, "#") if METER in topic]
    client.disconnect()


def test_per_phase_fields_and_entities_appear_only_for_the_configured_meter(tmp_path, internal_broker,
                                                                          central_broker):
    config_document = config_dict(internal_broker.port, central_broker.port, devices={
        METER: {"per_phase": ["voltage", "current", "power", "power_factor"]}})
    with running_proxy(config_document, tmp_path / "state") as proxy:
        client = publisher(internal_broker.port)
        publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER)), ("MQTT_RT_DATA", captured_rt_data(OTHER))])
        configs = retained_configs(central_broker.port, BRIDGE_CONFIGS + 15 + 2 + 2 * 2)
        assert configs == {**bridge_configs("kpm33b", PREFIX),
                           **discovery_configs(METER, proxy.config.meters, "kpm33b", PREFIX),
                           **discovery_configs(OTHER, proxy.config.meters, "kpm33b", PREFIX)}
        assert len([topic for topic in configs if OTHER in topic]) == METER_CONFIGS
        store = retained_store(central_broker.port, "kpm33b/+/seconds")
        assert json.loads(store[f"kpm33b/{METER}/seconds"]) == {
            "id": METER, "time": "2026-01-12T16:39:00", "active_power": 6.6905,
            "voltage_l1": 229.097, "voltage_l2": 231.567, "voltage_l3": 232.529,
            "current_l1": 9.735, "current_l2": 9.658, "current_l3": 9.655,
            "active_power_l1": 2.2229, "active_power_l2": 2.2293, "active_power_l3": 2.2382,
            "power_factor_l1": 0.996, "power_factor_l2": 0.996, "power_factor_l3": 0.996, "power_factor": 0.996,
        }
        assert store[f"kpm33b/{OTHER}/seconds"] == (
            b'{"id": "33B1225950028", "time": "2026-01-12T16:39:00", "active_power": 6.6905}')
        client.disconnect()


def test_real_captures_give_each_forwarding_meter_its_configs_and_an_energy_that_never_decreases(
        tmp_path, internal_broker, central_broker):
    messages = capture("MQTT_ENY_NOW_2026-01-12.log")
    collector = Collector(central_broker.port, "kpm33b/+/minutes")
    with running_proxy(config_dict(internal_broker.port, central_broker.port), tmp_path / "state"):
        client = publisher(internal_broker.port)
        publish_all(client, messages)
        wait_for(lambda: collector.count("/minutes") >= 624, timeout=30)
        energies: dict[str, list[float]] = {}
        for _topic, payload, _retained in collector.messages:
            reading = json.loads(payload)
            energies.setdefault(reading["id"], []).append(reading["active_energy"])
        for meter_energies in energies.values():  # total_increasing: never a decrease
            assert all(later >= earlier for earlier, later in itertools.pairwise(meter_energies))
        configs = meter_configs(retained_configs(central_broker.port, BRIDGE_CONFIGS + METER_CONFIGS * len(energies)))
        assert sorted(configs) == sorted(config_topic(meter_id, object_id) for meter_id in energies
                                         for object_id in ("active_power", "active_energy", "configuration",
                                                           "clock_offset"))
        client.disconnect()
    collector.close()


def test_with_discovery_off_the_proxy_leaves_the_prefix_alone(tmp_path, internal_broker, central_broker):
    foreign = config_topic(METER, "active_power")
    seeder = publisher(central_broker.port)
    seeder.publish(foreign, b'{"name": "kept"}', qos=1, retain=True).wait_for_publish(10)
    seeder.disconnect()
    config_document = config_dict(internal_broker.port, central_broker.port, exclude=[METER],
                                  sections={"homeassistant": {"discovery": False}})
    live = Collector(central_broker.port, f"{PREFIX}/#")
    with running_proxy(config_document, tmp_path / "state"):
        client = publisher(internal_broker.port)
        readings = Collector(central_broker.port, "kpm33b/+/seconds")
        publish_all(client, [("MQTT_RT_DATA", captured_rt_data(OTHER))])
        wait_for(lambda: readings.count("/seconds"))
        readings.close()
        client.disconnect()
    assert live.messages == [(foreign, b'{"name": "kept"}', True)]
    live.close()


def test_the_bridge_device_is_retained_meters_name_it_and_its_counters_are_in_the_stats(tmp_path, internal_broker,
                                                                                        central_broker):
    config_document = config_dict(internal_broker.port, central_broker.port,
                                  sections={"health": {"stats_interval_seconds": 1}})
    stats = Collector(central_broker.port, "kpm33b/bridge/stats")
    with running_proxy(config_document, tmp_path / "state") as proxy:
        client = publisher(internal_broker.port)
        publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER)), ("MQTT_RT_DATA", captured_rt_data(OTHER))])
        configs = retained_configs(central_broker.port, BRIDGE_CONFIGS + 2 * METER_CONFIGS)
        assert configs == {**bridge_configs("kpm33b", PREFIX),
                           **discovery_configs(METER, proxy.config.meters, "kpm33b", PREFIX),
                           **discovery_configs(OTHER, proxy.config.meters, "kpm33b", PREFIX)}
        bridge = configs[f"{PREFIX}/binary_sensor/kpm33b_bridge/connection_state/config"]
        assert bridge["device"]["identifiers"] == ["kpm33b_bridge"]
        assert {config["device"]["via_device"] for config in meter_configs(configs).values()} == {"kpm33b_bridge"}
        # What the bridge's entities read is there, retained.
        store = retained_store(central_broker.port, "kpm33b/bridge/#")
        assert store["kpm33b/bridge/state"] == b"online"
        wait_for(lambda: stats.messages and json.loads(stats.messages[-1][1])["forwarded"] == 2)
        latest = json.loads(stats.messages[-1][1])
        assert (latest["meters"], latest["online"], latest["queue_depth"]) == (2, 2, 0)
        client.disconnect()
    stats.close()


def test_switching_discovery_off_by_a_reload_removes_the_bridge_device_and_leaves_the_meters(tmp_path,
                                                                                          internal_broker,
                                                                                          central_broker):
    document = config_dict(internal_broker.port, central_broker.port)
    path = write_config(tmp_path, document, atomic=True)
    proxy = start_proxy(path)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER))])
    before = retained_configs(central_broker.port, BRIDGE_CONFIGS + METER_CONFIGS)
    live = Collector(central_broker.port, f"{PREFIX}/#")

    document["homeassistant"] = {"discovery": False}
    write_config(tmp_path, document, atomic=True)
    bridge_topics = list(bridge_configs("kpm33b", PREFIX))
    wait_for(lambda: all(live.on(topic)[-1:] == [b""] for topic in bridge_topics), timeout=10)
    store = retained_store(central_broker.port, f"{PREFIX}/#")
    assert sorted(store) == sorted(meter_configs(before))  # the meters' configs left as they were
    # Off: nothing more under the prefix, also when Home Assistant comes online.
    home_assistant = publisher(central_broker.port)
    home_assistant.publish(f"{PREFIX}/status", "online", qos=1).wait_for_publish(10)
    publish_all(client, [("MQTT_RT_DATA", captured_rt_data(OTHER))])
    wait_for(lambda: f"kpm33b/{OTHER}/seconds" in retained_store(central_broker.port, "kpm33b/#"))
    assert [topic for topic, payload, _retained in live.messages if payload and topic.endswith("/config")
            and not _retained] == []
    assert proxy.terminate() == 0
    assert "Traceback" not in proxy.output()
    home_assistant.disconnect()
    client.disconnect()
    live.close()


def test_excluding_a_meter_by_a_reload_empties_every_config_of_it_before_any_of_its_retained_readings(
        tmp_path, internal_broker, central_broker):
    """Home Assistant must remove the entities first: a template never meets a reading emptied under it."""
    document = config_dict(internal_broker.port, central_broker.port, export_energy=True,
                           devices={METER: {"per_phase": ["voltage", "current", "power", "power_factor"]}})
    path = write_config(tmp_path, document, atomic=True)
    proxy = start_proxy(path)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER)),
                         ("MQTT_ENY_NOW", eny_now(METER, "20260117211500", 163.486)),
                         ("MQTT_RT_DATA", captured_rt_data(OTHER))])
    configs = meter_configs(retained_configs(central_broker.port, BRIDGE_CONFIGS + (2 + 1 + 13 + 2) + 5))
    meter_config_topics = sorted(topic for topic in configs if METER in topic)
    assert len(meter_config_topics) == 18
    readings = [f"kpm33b/{METER}/seconds", f"kpm33b/{METER}/minutes", f"kpm33b/{METER}/availability"]
    wait_for(lambda: set(readings) <= set(retained_store(central_broker.port, "kpm33b/#")))
    live = Collector(central_broker.port, "#")

    document["meters"]["exclude"] = [METER]
    write_config(tmp_path, document, atomic=True)
    wait_for(lambda: all(b"" in live.on(topic) for topic in (*meter_config_topics, *readings)), timeout=10)
    emptied = [topic for topic, payload, _retained in live.messages if not payload]
    first = {topic: emptied.index(topic) for topic in (*meter_config_topics, *readings)}
    print(f"\n[exclusion] emptied in this order: {emptied}")
    assert max(first[topic] for topic in meter_config_topics) < min(first[topic] for topic in readings)
    assert not [topic for topic in retained_store(central_broker.port, "#") if METER in topic]
    assert proxy.terminate() == 0
    client.disconnect()
    live.close()


def test_adding_per_phase_over_a_retained_reading_that_predates_it_renders_unknown_without_a_log_line(
        tmp_path, internal_broker, central_broker):
    """What Home Assistant does when the new sensors' configs arrive: render the retained reading (then 13 WARNINGs)."""
    document = config_dict(internal_broker.port, central_broker.port)
    path = write_config(tmp_path, document, atomic=True)
    proxy = start_proxy(path)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_RT_DATA", captured_rt_data(METER))])
    retained_configs(central_broker.port, BRIDGE_CONFIGS + METER_CONFIGS)

    document["meters"]["devices"] = {METER: {"per_phase": ["voltage", "current", "power", "power_factor"]}}
    write_config(tmp_path, document, atomic=True)
    configs = meter_configs(retained_configs(central_broker.port, BRIDGE_CONFIGS + METER_CONFIGS + 13))
    reading = retained_store(central_broker.port, f"kpm33b/{METER}/seconds")[f"kpm33b/{METER}/seconds"]
    assert set(json.loads(reading)) == {"id", "time", "active_power"}  # from before per_phase
    on_seconds = [config for config in configs.values() if config["state_topic"] == f"kpm33b/{METER}/seconds"]
    assert len(on_seconds) == 1 + 13
    for config in on_seconds:
        rendered = render(config["value_template"], reading)
        assert rendered.logged == [], config["unique_id"]
        expected = "6.6905" if config["unique_id"].endswith("_active_power") else "None"
        assert rendered.text == expected, config["unique_id"]
    # Cleared (excluded, or by hand): every sensor renders unknown, no ERROR.
    for config in configs.values():
        if "value_template" in config:
            assert (render(config["value_template"], b"").text, render(config["value_template"], b"").logged) == (
                "None", []), config["unique_id"]
    assert proxy.terminate() == 0
    client.disconnect()
