"""The topic tree, built and parsed in one module: exact strings."""

from __future__ import annotations

import pytest

from topics import (
    STATUS_LEAVES,
    MeterTopic,
    availability_topic,
    bridge_devices_topic,
    bridge_state_topic,
    bridge_stats_topic,
    command_topic,
    config_status_topic,
    discovery_subscription,
    discovery_topic,
    ha_status_topic,
    meter_subscription,
    parse_discovery_topic,
    parse_meter_topic,
    reading_topic,
    retained_meter_topics,
    sender_stats_topic,
)

METER = "33B1225950027"


def test_the_central_tree() -> None:
    assert reading_topic("kpm33b", METER, "seconds") == "kpm33b/33B1225950027/seconds"
    assert reading_topic("home/energy", METER, "minutes") == "home/energy/33B1225950027/minutes"
    assert availability_topic("kpm33b", METER) == "kpm33b/33B1225950027/availability"
    assert bridge_state_topic("kpm33b") == "kpm33b/bridge/state"
    assert bridge_stats_topic("kpm33b") == "kpm33b/bridge/stats"
    assert bridge_devices_topic("kpm33b") == "kpm33b/bridge/devices"
    assert bridge_devices_topic("home/energy") == "home/energy/bridge/devices"
    assert sender_stats_topic("kpm33b") == "kpm33b/bridge/config_sender/stats"
    assert meter_subscription("kpm33b", "availability") == "kpm33b/+/availability"
    assert retained_meter_topics("kpm33b", METER) == (
        "kpm33b/33B1225950027/seconds", "kpm33b/33B1225950027/minutes", "kpm33b/33B1225950027/availability")


def test_a_command_topic_is_the_prefix_and_the_last_8_characters_of_the_id() -> None:
    assert command_topic("MQTT_COMMOD_SET_", METER) == "MQTT_COMMOD_SET_25950027"
    assert command_topic("MQTT_SETTIME_", METER) == "MQTT_SETTIME_25950027"


def test_the_discovery_tree() -> None:
    assert discovery_topic("homeassistant", METER, "active_energy") == (
        "homeassistant/sensor/kpm33b_33B1225950027/active_energy/config")
    assert discovery_subscription("homeassistant") == "homeassistant/sensor/+/+/config"
    assert ha_status_topic("homeassistant") == "homeassistant/status"


@pytest.mark.parametrize("kind", ["seconds", "minutes", "availability"])
def test_built_topics_parse_back(kind: str) -> None:
    topic = availability_topic("kpm33b", METER) if kind == "availability" else reading_topic("kpm33b", METER, kind)
    assert parse_meter_topic("kpm33b", topic) == MeterTopic(METER, kind)
    assert parse_discovery_topic(discovery_topic("ha", METER, "voltage_l1"), "ha") == (METER, "voltage_l1")


def test_the_configuration_status_parses_back_only_when_asked_for() -> None:
    topic = config_status_topic("kpm33b", METER)
    assert topic == "kpm33b/33B1225950027/config_status"
    assert parse_meter_topic("kpm33b", topic) is None  # not one of the leaves the config sender follows
    assert parse_meter_topic("kpm33b", topic, STATUS_LEAVES) == MeterTopic(METER, "config_status")
    assert parse_meter_topic("kpm33b", "kpm33b/bridge/config_status", STATUS_LEAVES) is None
    assert parse_meter_topic("kpm33b", "kpm33b/33B1225950027/other", STATUS_LEAVES) is None
