"""Home Assistant discovery without a broker: payloads key by key, topics, decisions, pacing.

The allowed keys, value types and units below are those of Home Assistant's
documentation (MQTT sensor configuration variables, the discovery ``origin``
block, and the units each sensor device class accepts), so that a payload
Home Assistant would reject or misread fails here first.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from types import MappingProxyType
from typing import Any

import payloads
import pytest
import yaml
from ha_templates import render
from payloads import ENY_NOW_CAPTURES, capture_payloads

import config_loader
import ha_discovery
import meter_table
from config_loader import DeviceSettings, MeterSettings
from data_mapping import MeterDataProcessor, clean_payload
from ha_discovery import (
    DiscoveryAnnouncer,
    bridge_configs,
    discovery_configs,
    every_config_topic,
    is_wanted,
)
from topics import (
    MINUTES,
    SECONDS,
    bridge_discovery_topic,
    bridge_identifier,
    bridge_node_id,
    discovery_subscription,
    ha_status_topic,
    node_id,
    parse_bridge_discovery_topic,
    parse_discovery_topic,
)
from version import __version__

METER = "33B1225950027"
# The one key a configuration must set; the documents here are about the others.
CENTRAL: dict[str, Any] = {"central_broker": {"host": "127.0.0.1"}}
OTHER = "33B1225950028"
RT_DATA = json.loads(payloads.RT_DATA)  # the captured reading, decoded
ALL_GROUPS = ("voltage", "current", "power", "power_factor")

# --- what Home Assistant's documentation allows --------------------------------

# MQTT sensor configuration variables → the documented type.
SENSOR_KEYS: dict[str, type | tuple[type, ...]] = {
    "availability": list, "availability_mode": str, "availability_template": str, "availability_topic": str,
    "device": dict, "device_class": str, "enabled_by_default": bool, "encoding": str, "entity_category": str,
    "entity_picture": str, "expire_after": int, "force_update": bool, "icon": str,
    "json_attributes_template": str, "json_attributes_topic": str, "last_reset_value_template": str,
    "name": str, "object_id": str, "options": list, "payload_available": str, "payload_not_available": str,
    "suggested_display_precision": int, "qos": int, "state_class": str, "state_topic": str, "unique_id": str,
    "unit_of_measurement": str, "value_template": str,
    "origin": dict,  # documented for every discovery payload
}
AVAILABILITY_KEYS = {"payload_available": str, "payload_not_available": str, "topic": str, "value_template": str}
BINARY_SENSOR_KEYS: dict[str, type | tuple[type, ...]] = {
    "availability": list, "availability_mode": str, "device": dict, "device_class": str, "enabled_by_default": bool,
    "encoding": str, "entity_category": str, "expire_after": int, "force_update": bool, "icon": str, "name": str,
    "object_id": str, "off_delay": int, "payload_off": str, "payload_on": str, "qos": int, "state_topic": str,
    "unique_id": str, "value_template": str, "origin": dict,
}
ENTITY_CATEGORIES = {"config", "diagnostic"}
DEVICE_KEYS: dict[str, type | tuple[type, ...]] = {
    "configuration_url": str, "connections": list, "hw_version": str, "identifiers": (str, list),
    "manufacturer": str, "model": str, "model_id": str, "name": str, "serial_number": str,
    "suggested_area": str, "sw_version": str, "via_device": str,
}
ORIGIN_KEYS = {"name": str, "sw_version": str, "support_url": str}
AVAILABILITY_MODES = {"all", "any", "latest"}
STATE_CLASSES = {"measurement", "total", "total_increasing"}
# The units Home Assistant accepts per sensor device class; None: no unit.
UNITS: dict[str, set[str | None]] = {
    "power": {"W", "kW", "MW", "GW", "TW", "mW", "BTU/h"},
    "energy": {"Wh", "kWh", "MWh", "GWh", "TWh", "mWh", "J", "kJ", "MJ", "GJ", "cal", "kcal", "Mcal", "Gcal"},
    "voltage": {"V", "mV", "µV", "kV", "MV"},
    "current": {"A", "mA"},
    "power_factor": {None, "%"},
    "duration": {"d", "h", "min", "s", "ms", "µs"},
    "enum": {None},
}
CONFIG_STATES = ["applied", "pending", "no_reply", "refused"]


def number_template(field: str) -> str:
    """A value template that reads a numeric field, written out."""
    return f"{{{{ value_json['{field}'] if value_json is mapping and value_json['{field}'] is number else None }}}}"



def meters(**devices: DeviceSettings) -> MeterSettings:
    """Meter settings with the given ``meters.devices``."""
    return MeterSettings(devices=MappingProxyType(devices))


def expected_config(field: str, name: str, kind: str, device_class: str, state_class: str, unit: str | None,
                    precision: int, device_name: str = f"KPM33B {METER}") -> dict[str, Any]:
    """The discovery payload of one sensor of METER, written out in full."""
    config: dict[str, Any] = {
        "name": name,
        "unique_id": f"kpm33b_{METER}_{field}",
        "state_topic": f"kpm33b/{METER}/{kind}",
        "value_template": number_template(field),
        "device_class": device_class,
        "state_class": state_class,
        "suggested_display_precision": precision,
        "qos": 1,
        "availability": [{"topic": "kpm33b/bridge/state"}, {"topic": f"kpm33b/{METER}/availability"}],
        "availability_mode": "all",
        "device": {
            "identifiers": [f"kpm33b_{METER}"],
            "name": device_name,
            "manufacturer": "Compere",
            "model": "KPM33B",
            "serial_number": METER,
            "via_device": "kpm33b_bridge",
        },
        "origin": {"name": "kpm33b-proxy", "sw_version": "0.1.0"},
    }
    if unit is not None:
        config["unit_of_measurement"] = unit
    return config


def assert_same_keys_and_values(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key] == value, key


# --- payloads ------------------------------------------------------------------


def test_a_meter_gets_an_active_power_and_an_active_energy_config_key_by_key() -> None:
    configs = discovery_configs(METER, MeterSettings(), "kpm33b", "homeassistant")
    assert list(configs) == [
        f"homeassistant/sensor/kpm33b_{METER}/active_power/config",
        f"homeassistant/sensor/kpm33b_{METER}/active_energy/config",
        f"homeassistant/sensor/kpm33b_{METER}/configuration/config",
        f"homeassistant/sensor/kpm33b_{METER}/clock_offset/config",
    ]
    assert_same_keys_and_values(
        configs[f"homeassistant/sensor/kpm33b_{METER}/active_power/config"],
        expected_config("active_power", "Active power", "seconds", "power", "measurement", "kW", 3))
    assert_same_keys_and_values(
        configs[f"homeassistant/sensor/kpm33b_{METER}/active_energy/config"],
        expected_config("active_energy", "Active energy", "minutes", "energy", "total_increasing", "kWh", 3))


def test_per_phase_groups_add_one_sensor_per_field_key_by_key() -> None:
    configs = discovery_configs(METER, meters(**{METER: DeviceSettings(per_phase=ALL_GROUPS)}), "kpm33b",
                                "homeassistant")
    prefix = f"homeassistant/sensor/kpm33b_{METER}/"
    expected = {
        "active_power": ("Active power", "power", "kW", 3),
        "active_energy": ("Active energy", "energy", "kWh", 3),
        "voltage_l1": ("Voltage L1", "voltage", "V", 1),
        "voltage_l2": ("Voltage L2", "voltage", "V", 1),
        "voltage_l3": ("Voltage L3", "voltage", "V", 1),
        "current_l1": ("Current L1", "current", "A", 2),
        "current_l2": ("Current L2", "current", "A", 2),
        "current_l3": ("Current L3", "current", "A", 2),
        "active_power_l1": ("Active power L1", "power", "kW", 3),
        "active_power_l2": ("Active power L2", "power", "kW", 3),
        "active_power_l3": ("Active power L3", "power", "kW", 3),
        "power_factor_l1": ("Power factor L1", "power_factor", None, 3),
        "power_factor_l2": ("Power factor L2", "power_factor", None, 3),
        "power_factor_l3": ("Power factor L3", "power_factor", None, 3),
        "power_factor": ("Power factor", "power_factor", None, 3),
    }
    assert list(configs) == [f"{prefix}{field}/config" for field in (*expected, "configuration", "clock_offset")]
    for field, (name, device_class, unit, precision) in expected.items():
        kind = "minutes" if field == "active_energy" else "seconds"
        state_class = "total_increasing" if field == "active_energy" else "measurement"
        assert_same_keys_and_values(configs[f"{prefix}{field}/config"],
                                    expected_config(field, name, kind, device_class, state_class, unit, precision))


def test_export_energy_adds_an_exported_energy_sensor_key_by_key() -> None:
    settings = MeterSettings(export_energy=True)
    configs = discovery_configs(METER, settings, "kpm33b", "homeassistant")
    prefix = f"homeassistant/sensor/kpm33b_{METER}/"

    assert list(configs) == [f"{prefix}active_power/config", f"{prefix}active_energy/config",
                             f"{prefix}active_energy_export/config", f"{prefix}configuration/config",
                             f"{prefix}clock_offset/config"]
    assert_same_keys_and_values(
        configs[f"{prefix}active_energy_export/config"],
        expected_config("active_energy_export", "Exported energy", "minutes", "energy", "total_increasing",
                        "kWh", 3))
    assert configs[f"{prefix}active_energy_export/config"]["unique_id"] == f"kpm33b_{METER}_active_energy_export"


def test_exported_energy_sensor_follows_the_per_meter_setting_and_is_unwanted_without_it() -> None:
    settings = MeterSettings(export_energy=True, devices=MappingProxyType({OTHER: DeviceSettings(export_energy=False)}))

    assert [c["unique_id"] for c in discovery_configs(OTHER, settings, "kpm33b", "ha").values()] == [
        f"kpm33b_{OTHER}_active_power", f"kpm33b_{OTHER}_active_energy", f"kpm33b_{OTHER}_configuration",
        f"kpm33b_{OTHER}_clock_offset"]
    assert is_wanted(METER, "active_energy_export", settings)
    assert not is_wanted(OTHER, "active_energy_export", settings)
    assert not is_wanted(METER, "active_energy_export", MeterSettings())


def test_every_config_uses_only_keys_and_types_home_assistant_documents() -> None:
    settings = meters(**{METER: DeviceSettings(name="Heat pump", per_phase=ALL_GROUPS, export_energy=True)})
    configs = {**discovery_configs(METER, settings, "kpm33b", "homeassistant", origin_url="https://example.org/x"),
               **bridge_configs("kpm33b", "homeassistant", origin_url="https://example.org/x")}
    for topic, config in configs.items():
        allowed = BINARY_SENSOR_KEYS if "/binary_sensor/" in topic else SENSOR_KEYS
        for key, value in config.items():
            assert key in allowed, key
            assert isinstance(value, allowed[key]), key
            assert allowed[key] is not int or not isinstance(value, bool), key
        assert config.get("availability_mode", "all") in AVAILABILITY_MODES
        assert config.get("state_class", "measurement") in STATE_CLASSES
        assert config.get("entity_category", "diagnostic") in ENTITY_CATEGORIES
        assert config["qos"] in (0, 1, 2)
        for entry in config.get("availability", ()):
            assert entry.keys() <= AVAILABILITY_KEYS.keys() and "topic" in entry
            assert all(isinstance(entry[key], AVAILABILITY_KEYS[key]) for key in entry)
        assert config["device"].keys() <= DEVICE_KEYS.keys()
        assert all(isinstance(value, DEVICE_KEYS[key]) for key, value in config["device"].items())
        assert config["origin"].keys() <= ORIGIN_KEYS.keys() and "name" in config["origin"]
        assert all(isinstance(value, ORIGIN_KEYS[key]) for key, value in config["origin"].items())
        # Home Assistant links an entity to its device only with a unique id and an identifier.
        assert config["unique_id"] and config["device"]["identifiers"]
        # Home Assistant refuses options on anything but an enum, and with a state class or a unit.
        if "options" in config:
            assert config["device_class"] == "enum"
            assert "state_class" not in config and "unit_of_measurement" not in config


def test_the_configuration_status_gives_each_meter_two_diagnostic_sensors_key_by_key() -> None:
    configs = discovery_configs(METER, meters(**{METER: DeviceSettings(name="Heat pump")}), "kpm33b", "homeassistant")
    device = {"identifiers": [f"kpm33b_{METER}"], "name": "Heat pump", "manufacturer": "Compere", "model": "KPM33B",
              "serial_number": METER, "via_device": "kpm33b_bridge"}
    origin = {"name": "kpm33b-proxy", "sw_version": __version__}
    assert_same_keys_and_values(configs[f"homeassistant/sensor/kpm33b_{METER}/configuration/config"], {
        "name": "Configuration",
        "unique_id": f"kpm33b_{METER}_configuration",
        "state_topic": f"kpm33b/{METER}/config_status",
        "value_template": "{{ value_json['state'] if value_json is mapping and value_json['state'] in "
                          "['applied', 'pending', 'no_reply', 'refused'] else None }}",
        "device_class": "enum",
        "options": CONFIG_STATES,
        "entity_category": "diagnostic",
        "qos": 1,
        "device": device,
        "origin": origin,
    })
    assert_same_keys_and_values(configs[f"homeassistant/sensor/kpm33b_{METER}/clock_offset/config"], {
        "name": "Clock offset",
        "unique_id": f"kpm33b_{METER}_clock_offset",
        "state_topic": f"kpm33b/{METER}/config_status",
        "value_template": number_template("clock_offset_seconds"),
        "device_class": "duration",
        "state_class": "measurement",
        "unit_of_measurement": "s",
        "suggested_display_precision": 0,
        "entity_category": "diagnostic",
        "qos": 1,
        "device": device,
        "origin": origin,
    })


def test_the_bridge_device_has_a_connection_state_and_four_diagnostic_counters_key_by_key() -> None:
    configs = bridge_configs("kpm33b", "homeassistant")
    device = {"identifiers": ["kpm33b_bridge"], "name": "KPM33B bridge", "model": "kpm33b-proxy",
              "sw_version": __version__}
    origin = {"name": "kpm33b-proxy", "sw_version": __version__}
    prefix = "homeassistant/sensor/kpm33b_bridge"
    assert list(configs) == ["homeassistant/binary_sensor/kpm33b_bridge/connection_state/config",
                             f"{prefix}/readings_forwarded/config", f"{prefix}/readings_dropped/config",
                             f"{prefix}/queue_depth/config", f"{prefix}/meters_online/config"]
    assert_same_keys_and_values(configs["homeassistant/binary_sensor/kpm33b_bridge/connection_state/config"], {
        "name": "Connection state",
        "unique_id": "kpm33b_bridge_connection_state",
        "state_topic": "kpm33b/bridge/state",
        "payload_on": "online",
        "payload_off": "offline",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "qos": 1,
        "device": device,
        "origin": origin,
    })
    counters = {
        "readings_forwarded": ("Readings forwarded", number_template("forwarded"), "total_increasing", "readings"),
        "readings_dropped": ("Readings dropped",
                             "{{ value_json['dropped'].values() | select('number') | sum if value_json is mapping "
                             "and value_json['dropped'] is mapping else None }}", "total_increasing", "readings"),
        "queue_depth": ("Queue depth", number_template("queue_depth"), "measurement", "messages"),
        "meters_online": ("Meters online", number_template("online"), "measurement", "meters"),
    }
    for object_id, (name, template, state_class, unit) in counters.items():
        assert_same_keys_and_values(configs[f"{prefix}/{object_id}/config"], {
            "name": name,
            "unique_id": f"kpm33b_bridge_{object_id}",
            "state_topic": "kpm33b/bridge/stats",
            "value_template": template,
            "state_class": state_class,
            "unit_of_measurement": unit,
            "entity_category": "diagnostic",
            "qos": 1,
            "device": device,
            "origin": origin,
        })


def test_another_main_topic_is_another_bridge_device_named_in_its_meters_via_device() -> None:
    configs = bridge_configs("site/a", "ha", origin_url="https://example.org/kpm33b")
    assert next(iter(configs)) == "ha/binary_sensor/kpm33b_bridge_site_a/connection_state/config"
    for config in configs.values():
        assert config["device"]["identifiers"] == ["kpm33b_bridge_site/a"]
        assert config["unique_id"].startswith("kpm33b_bridge_site_a_")
        assert config["origin"]["support_url"] == "https://example.org/kpm33b"
    assert configs["ha/sensor/kpm33b_bridge_site_a/queue_depth/config"]["state_topic"] == "site/a/bridge/stats"
    for config in discovery_configs(METER, MeterSettings(), "site/a", "ha").values():
        assert config["device"]["via_device"] == "kpm33b_bridge_site/a"


def test_every_unit_is_one_home_assistant_accepts_for_its_device_class() -> None:
    configs = discovery_configs(METER, meters(**{METER: DeviceSettings(per_phase=ALL_GROUPS)}), "kpm33b", "ha")
    device_classes = set()
    for config in configs.values():
        if config.get("entity_category") == "diagnostic" and "device_class" not in config:
            continue
        device_classes.add(config["device_class"])
        assert config.get("unit_of_measurement") in UNITS[config["device_class"]], config["unique_id"]
        if config["device_class"] == "energy":  # the Energy dashboard needs a total
            assert config["state_class"] in ("total", "total_increasing")
    assert device_classes == set(UNITS)


def test_the_device_name_comes_from_meters_devices_and_the_unique_ids_never_change() -> None:
    default = discovery_configs(METER, MeterSettings(), "kpm33b", "homeassistant")
    renamed = discovery_configs(METER, meters(**{METER: DeviceSettings(name="Wärmepumpe")}), "kpm33b",
                                "homeassistant")
    assert list(renamed) == list(default)
    for topic in default:
        assert default[topic]["device"]["name"] == f"KPM33B {METER}"
        assert renamed[topic]["device"]["name"] == "Wärmepumpe"
        assert renamed[topic]["unique_id"] == default[topic]["unique_id"]
        assert renamed[topic]["device"]["identifiers"] == default[topic]["device"]["identifiers"]
    # Published as readable UTF-8 JSON.
    encoded = ha_discovery.encode_config(next(iter(renamed.values())))
    assert "Wärmepumpe".encode() in encoded and json.loads(encoded) == next(iter(renamed.values()))


def test_per_phase_sensors_belong_only_to_the_meter_that_asks_for_them() -> None:
    settings = meters(**{METER: DeviceSettings(per_phase=("voltage",)), OTHER: DeviceSettings(name="Garage")})
    assert [c["unique_id"] for c in discovery_configs(OTHER, settings, "kpm33b", "homeassistant").values()] == [
        f"kpm33b_{OTHER}_active_power", f"kpm33b_{OTHER}_active_energy", f"kpm33b_{OTHER}_configuration",
        f"kpm33b_{OTHER}_clock_offset"]
    assert len(discovery_configs(METER, settings, "kpm33b", "homeassistant")) == 2 + 3 + 2


def test_origin_names_the_project_and_links_support_only_when_configured() -> None:
    assert ha_discovery.origin() == {"name": "kpm33b-proxy", "sw_version": __version__}
    assert ha_discovery.origin("https://example.org/kpm33b") == {
        "name": "kpm33b-proxy", "sw_version": __version__, "support_url": "https://example.org/kpm33b"}


def test_prefix_and_main_topic_are_taken_from_the_configuration() -> None:
    configs = discovery_configs(METER, MeterSettings(), "site/a/meters", "ha/discovery")
    topic = f"ha/discovery/sensor/kpm33b_{METER}/active_energy/config"
    assert topic in configs
    assert configs[topic]["state_topic"] == f"site/a/meters/{METER}/minutes"
    assert configs[topic]["availability"] == [{"topic": "site/a/meters/bridge/state"},
                                              {"topic": f"site/a/meters/{METER}/availability"}]
    assert ha_status_topic("ha/discovery") == "ha/discovery/status"
    assert discovery_subscription("ha/discovery") == "ha/discovery/sensor/+/+/config"
    assert node_id(METER) == f"kpm33b_{METER}"


# --- the value templates, rendered as Home Assistant renders them -------------------

FULL_SECONDS = clean_payload(SECONDS, METER, "20260112163900",
                             {tag: value for tag, value in RT_DATA.items() if tag not in ("id", "time", "isend")},
                             ALL_GROUPS)
FULL_MINUTES = {"id": METER, "time": "2026-01-12T16:40:00", "active_energy": 163.486, "active_energy_export": 2.5}
# Payloads a sensor must survive without a log line: no field for it, cleared, not JSON, JSON but no object.
WITHOUT_FIELDS = json.dumps({"id": METER, "time": "2026-01-12T16:39:00"}).encode()
HOSTILE_PAYLOADS = (b"", b"garbage{", b"[1, 2]", b'"text"', b"42", b"null")


# The config sender's retained status, and the proxy's stats, as they are published.
CONFIG_STATUS = {"id": METER, "upload_frequency_seconds": 10, "upload_frequency_minutes": 1, "state": "no_reply",
                 "updated": "2026-12-05T23:10:00Z", "clock_offset_seconds": -4.2}
STATS = {"received": 120, "forwarded": 100, "dropped": {"duplicate": 3, "not_json": 2, "queue_full": 1},
         "queue_depth": 7, "meters": 5, "online": 4, "uptime_seconds": 3600}


def full_payloads() -> dict[str, bytes]:
    """State topic → a payload carrying every field a config of METER or of the bridge reads."""
    return {f"kpm33b/{METER}/seconds": json.dumps(FULL_SECONDS).encode(),
            f"kpm33b/{METER}/minutes": json.dumps(FULL_MINUTES).encode(),
            f"kpm33b/{METER}/config_status": json.dumps(CONFIG_STATUS).encode(),
            "kpm33b/bridge/stats": json.dumps(STATS).encode()}


def every_config() -> dict[str, dict[str, Any]]:
    """Every config of a meter with every per-phase group and exported energy, and the bridge's."""
    settings = meters(**{METER: DeviceSettings(per_phase=ALL_GROUPS, export_energy=True)})
    return {**discovery_configs(METER, settings, "kpm33b", "homeassistant"),
            **bridge_configs("kpm33b", "homeassistant")}


def test_every_value_template_reads_its_value_from_a_full_payload_without_a_log_line() -> None:
    payloads = full_payloads()
    expected = {**FULL_SECONDS, **FULL_MINUTES, "configuration": "no_reply", "clock_offset": -4.2,
                "readings_forwarded": 100, "readings_dropped": 6, "queue_depth": 7, "meters_online": 4}
    templated = [config for config in every_config().values() if "value_template" in config]
    assert len(templated) == 2 + 1 + 13 + 2 + 4  # every sensor; the connection state reads the payload as it is
    for config in templated:
        rendered = render(config["value_template"], payloads[config["state_topic"]])
        assert rendered.logged == [], config["unique_id"]
        field = config["unique_id"].removeprefix(f"kpm33b_{METER}_").removeprefix("kpm33b_bridge_")
        assert rendered.value == expected[field], config["unique_id"]


@pytest.mark.parametrize("state", ["applied", "pending", "no_reply", "refused"])
def test_the_configuration_sensor_shows_each_state_and_nothing_it_does_not_list(state: str) -> None:
    template = discovery_configs(METER, MeterSettings(), "kpm33b", "homeassistant")[
        f"homeassistant/sensor/kpm33b_{METER}/configuration/config"]["value_template"]
    assert render(template, json.dumps({**CONFIG_STATUS, "state": state})).text == state
    # Home Assistant logs a WARNING for a value its options do not list: unknown instead.
    for odd in ("sent", None, 3, ["applied"]):
        assert (render(template, json.dumps({**CONFIG_STATUS, "state": odd})).text,
                render(template, json.dumps({**CONFIG_STATUS, "state": odd})).logged) == ("None", [])


def test_an_unknown_clock_offset_and_no_drops_render_as_unknown_and_zero() -> None:
    configs = every_config()
    offset = configs[f"homeassistant/sensor/kpm33b_{METER}/clock_offset/config"]["value_template"]
    dropped = configs["homeassistant/sensor/kpm33b_bridge/readings_dropped/config"]["value_template"]
    assert render(offset, json.dumps({**CONFIG_STATUS, "clock_offset_seconds": None})).text == "None"
    assert render(offset, json.dumps({**CONFIG_STATUS, "clock_offset_seconds": 0})).text == "0"
    assert render(dropped, json.dumps({**STATS, "dropped": {}})).text == "0"
    assert render(dropped, json.dumps({**STATS, "dropped": {"duplicate": 2, "odd": "x"}})).text == "2"
    assert render(dropped, json.dumps({**STATS, "dropped": [1, 2]})).text == "None"


@pytest.mark.parametrize("payload", [WITHOUT_FIELDS, *HOSTILE_PAYLOADS])
def test_every_value_template_gives_unknown_without_a_log_line_when_its_field_is_missing(payload: bytes) -> None:
    """A reading from before ``per_phase`` was added, a payload cleared to empty, garbage: unknown, and silent.

    Home Assistant takes the rendered ``None`` as unknown; anything it logs
    (a WARNING for a missing key, an ERROR for an undefined ``value_json``)
    fails here.
    """
    for config in every_config().values():
        if "value_template" not in config:
            continue
        rendered = render(config["value_template"], payload)
        assert (rendered.text, rendered.logged) == ("None", []), config["unique_id"]


# --- which configs are ours, which are wanted ------------------------------------


@pytest.mark.parametrize(("topic", "parsed"), [
    (f"homeassistant/sensor/kpm33b_{METER}/active_power/config", (METER, "active_power")),
    (f"homeassistant/sensor/kpm33b_{METER}/voltage_l1/config", (METER, "voltage_l1")),
    (f"homeassistant/sensor/kpm33b_{METER}/active_power/state", None),
    (f"homeassistant/sensor/kpm33b_{METER}/config", None),
    (f"homeassistant/sensor/kpm33b_{METER}/a/b/config", None),
    (f"homeassistant/binary_sensor/kpm33b_{METER}/active_power/config", None),
    (f"other/sensor/kpm33b_{METER}/active_power/config", None),
    ("homeassistant/sensor/kpm33b_33B12259500/active_power/config", None),  # 11 characters
    ("homeassistant/sensor/kpm33b_33B12259500277/active_power/config", None),  # 14 characters
    ("homeassistant/sensor/0x00158d0001/temperature/config", None),  # another bridge's node
    (f"homeassistant/sensor/KPM33B_{METER}/active_power/config", None),
])
def test_only_config_topics_of_kpm33b_nodes_are_recognised(topic: str, parsed: tuple[str, str] | None) -> None:
    assert parse_discovery_topic(topic, "homeassistant") == parsed


@pytest.mark.parametrize(("main", "identifier", "node"), [
    ("kpm33b", "kpm33b_bridge", "kpm33b_bridge"),
    ("site", "kpm33b_bridge_site", "kpm33b_bridge_site"),
    ("site/a b", "kpm33b_bridge_site/a b", "kpm33b_bridge_site_a_b"),
    ("Zähler", "kpm33b_bridge_Zähler", "kpm33b_bridge_Z_hler"),
])
def test_the_bridge_identifier_names_the_main_topic_unless_it_is_the_default(main: str, identifier: str,
                                                                           node: str) -> None:
    assert bridge_identifier(main) == identifier
    assert bridge_node_id(main) == node
    assert bridge_discovery_topic("ha", main, "sensor", "queue_depth") == f"ha/sensor/{node}/queue_depth/config"


@pytest.mark.parametrize(("topic", "parsed"), [
    ("homeassistant/binary_sensor/kpm33b_bridge/connection_state/config", ("binary_sensor", "connection_state")),
    ("homeassistant/sensor/kpm33b_bridge/queue_depth/config", ("sensor", "queue_depth")),
    ("homeassistant/sensor/kpm33b_bridge/old_counter/config", ("sensor", "old_counter")),
    ("homeassistant/switch/kpm33b_bridge/queue_depth/config", None),
    ("homeassistant/sensor/kpm33b_bridge_site/queue_depth/config", None),  # another proxy's bridge
    ("homeassistant/sensor/kpm33b_bridge/queue_depth/state", None),
    ("homeassistant/sensor/kpm33b_bridge/a/b/config", None),
    ("other/sensor/kpm33b_bridge/queue_depth/config", None),
    (f"homeassistant/sensor/kpm33b_{METER}/active_power/config", None),
    ("homeassistant/binary_sensor/zigbee2mqtt_bridge_0x1/connection_state/config", None),
])
def test_only_this_main_topics_bridge_configs_are_recognised_as_the_bridges(topic: str,
                                                                           parsed: tuple[str, str] | None) -> None:
    assert parse_bridge_discovery_topic(topic, "homeassistant", "kpm33b") == parsed


@pytest.mark.parametrize("main", ["kpm33b", "site", "a/b", "x" * 13, "1234567890123"])
def test_a_bridge_config_is_never_taken_for_a_meters(main: str) -> None:
    for topic in bridge_configs(main, "homeassistant"):
        assert parse_discovery_topic(topic, "homeassistant") is None
        assert parse_bridge_discovery_topic(topic, "homeassistant", main) is not None


def test_a_prefix_of_several_levels_is_parsed() -> None:
    assert parse_discovery_topic(f"ha/disc/sensor/kpm33b_{METER}/active_power/config", "ha/disc") == (
        METER, "active_power")
    assert parse_discovery_topic(f"ha/sensor/kpm33b_{METER}/active_power/config", "ha/disc") is None


def test_excluded_meters_and_unconfigured_per_phase_entities_are_unwanted() -> None:
    settings = MeterSettings(exclude=frozenset({OTHER}),
                             devices=MappingProxyType({METER: DeviceSettings(per_phase=("current",))}))
    assert is_wanted(METER, "active_power", settings)
    assert is_wanted(METER, "active_energy", settings)
    assert is_wanted(METER, "current_l3", settings)
    assert not is_wanted(METER, "voltage_l1", settings)
    assert not is_wanted(METER, "power_factor", settings)
    assert not is_wanted(METER, "something_else", settings)
    assert not is_wanted(OTHER, "active_power", settings)
    assert is_wanted("33B0000000001", "active_energy", settings)  # unknown to the proxy, not excluded


# --- the announcer ------------------------------------------------------------------


class Published:
    """Records what the announcer hands to ``publish``."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.messages.append((topic, payload, retain))

    def topics(self) -> list[str]:
        return [topic for topic, _payload, _retain in self.messages]

    def meter_messages(self) -> list[tuple[str, bytes, bool]]:
        """The messages on meter config topics (the bridge's left out)."""
        return [message for message in self.messages if parse_discovery_topic(message[0], "homeassistant")]

    def bridge_topics(self) -> list[str]:
        return [topic for topic in self.topics() if parse_bridge_discovery_topic(topic, "homeassistant", "kpm33b")]

    def meters(self) -> list[str]:
        """Meter ids of the configs published, once per meter in order."""
        ids: list[str] = []
        for topic in self.topics():
            parsed = parse_discovery_topic(topic, "homeassistant")
            if parsed is not None and parsed[0] not in ids:
                ids.append(parsed[0])
        return ids


def announcer(settings: MeterSettings | None = None, **options: Any) -> tuple[DiscoveryAnnouncer, Published]:
    published = Published()
    return DiscoveryAnnouncer(settings or MeterSettings(), "kpm33b", "homeassistant", published, **options), published


def meter_ids(count: int) -> list[str]:
    return [f"33B{index:010d}" for index in range(count)]


def test_a_new_meter_is_announced_at_once_and_only_once_retained_after_the_bridge() -> None:
    """Its reading sensors at once, ahead of its reading; its diagnostics at the next tick."""
    subject, published = announcer()
    assert subject.meter_seen(METER)
    assert not subject.meter_seen(METER)
    configs = discovery_configs(METER, MeterSettings(), "kpm33b", "homeassistant")
    expected = {**bridge_configs("kpm33b", "homeassistant"), **configs}
    assert [(topic, json.loads(payload), retain) for topic, payload, retain in published.messages] == [
        (topic, config, True) for topic, config in list(expected.items())[:-2]]
    assert subject.tick(0.0) == 0
    assert [(topic, json.loads(payload), retain) for topic, payload, retain in published.messages] == [
        (topic, config, True) for topic, config in expected.items()]
    settle(subject, published)
    assert len(published.messages) == len(expected)
    assert subject.known() == [METER]


def test_a_burst_of_new_meters_gets_its_diagnostics_at_the_announcements_bounded_rate() -> None:
    """20,000 new meters at once must not double what the outgoing queue takes (4 messages each, not 6)."""
    subject, published = announcer()
    for meter_id in meter_ids(1000):
        subject.meter_seen(meter_id)
    assert len(published.meter_messages()) == 2 * 1000
    per_tick = []
    for tick in range(22):
        before = len(published.meter_messages())
        subject.tick(tick * 0.5)
        per_tick.append(len(published.meter_messages()) - before)
    assert per_tick == [2 * ha_discovery.DIAGNOSTICS_PER_TICK] * 20 + [0, 0]  # 50 meters a tick
    assert sorted(topic for topic, _p, _r in published.meter_messages()) == sorted(
        topic for meter_id in meter_ids(1000) for topic in discovery_configs(meter_id, MeterSettings(), "kpm33b",
                                                                             "homeassistant"))


class Discarded(Published):
    """Counts what the announcer hands to ``publish`` and keeps none of it (memory is measured)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.count += 1


# What the announcer keeps is allocated in its module or in the compact sets it keeps meters in.
KEPT_BY_DISCOVERY = [tracemalloc.Filter(True, ha_discovery.__file__), tracemalloc.Filter(True, meter_table.__file__)]


@pytest.mark.parametrize("waiting", ["diagnostics of new meters", "re-announcements"])
def test_once_a_burst_of_meters_is_announced_its_waiting_list_gives_its_memory_back(waiting: str) -> None:
    """A dict never shrinks: each waiting list kept the size of its largest burst for good.

    100,000 new meters (their diagnostics), or Home Assistant back online with
    100,000 known (every re-announcement), left 3.75 MB each in the proxy.
    What stays is the known meters alone.
    """
    published = Discarded()
    subject = DiscoveryAnnouncer(MeterSettings(), "kpm33b", "homeassistant", published)
    ids = meter_ids(20_000)
    tracemalloc.start()
    try:
        if waiting == "re-announcements":
            subject.announce_known(ids)
            known = tracemalloc.take_snapshot()
            subject.ha_online()
        else:
            for meter_id in ids:
                subject.meter_seen(meter_id)
            known = tracemalloc.take_snapshot()
        before = -1
        while before != published.count:  # until nothing more goes out
            before = published.count
            subject.tick(0.0)
        done = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    assert subject.pending() == 0 and len(subject.known()) == len(ids)

    def held(snapshot: tracemalloc.Snapshot) -> int:
        return sum(trace.size for trace in snapshot.filter_traces(KEPT_BY_DISCOVERY).traces)

    # When the burst arrived, the known meters and the waiting list; once announced, the known meters only.
    assert held(known) > 20 * len(ids)  # what was measured, once per meter at least
    assert held(done) < held(known) / 2 + 50_000, (held(known), held(done))


def test_a_fleet_heard_once_is_held_in_bytes_per_meter_not_dict_entries_and_their_ids() -> None:
    """20,000 meters announced by their readings, their diagnostics due: under 90 bytes per meter held.

    Each id comes in a reading of its own, as in the proxy. Measured: 78
    bytes with compact sets (13 bytes of id, index and links, per set); 104
    with dicts used as sets, which kept each meter's id string (64 bytes)
    besides their entries (at 100,000 meters: 73 and about 140).
    """
    subject = DiscoveryAnnouncer(MeterSettings(), "kpm33b", "homeassistant", Discarded())
    tracemalloc.start()
    try:
        for number in range(20_000):
            subject.meter_seen(f"33B{number:010d}")
        held = tracemalloc.get_traced_memory()[0]  # the ids included: kept or not, as in the proxy
    finally:
        tracemalloc.stop()
    assert len(subject.known()) == 20_000
    assert held / 20_000 < 90


def test_diagnostics_due_are_dropped_for_a_meter_excluded_or_discovery_switched_off() -> None:
    subject, published = announcer()
    subject.meter_seen(METER)
    subject.meter_seen(OTHER)
    published.messages.clear()
    subject.reconfigure(MeterSettings(exclude=frozenset({METER})), "homeassistant", enabled=True, origin_url=None)
    settle(subject, published)
    assert {topic.split("/")[2] for topic, _p, _r in published.meter_messages()} == {f"kpm33b_{OTHER}"}
    subject.meter_seen("33B0000000001")
    subject.reconfigure(MeterSettings(), "homeassistant", enabled=False, origin_url=None)
    published.messages.clear()
    settle(subject, published)
    assert published.messages == []


def test_the_bridge_is_announced_at_the_first_tick_again_when_home_assistant_is_online_and_never_when_off() -> None:
    subject, published = announcer()
    assert subject.tick(0.0) == 0  # no meter yet, but the bridge
    assert published.bridge_topics() == list(bridge_configs("kpm33b", "homeassistant"))
    subject.tick(0.5)
    assert len(published.messages) == 5  # once
    subject.on_central_message("homeassistant/status", b"online", False)
    subject.tick(1.0)
    assert published.bridge_topics() == 2 * list(bridge_configs("kpm33b", "homeassistant"))
    assert all(retain for _topic, _payload, retain in published.messages)
    off, nothing = announcer(enabled=False)
    off.tick(0.0)
    off.ha_online()
    off.tick(0.5)
    assert nothing.messages == []


def test_an_excluded_meter_is_never_announced() -> None:
    subject, published = announcer(MeterSettings(exclude=frozenset({METER})))
    assert not subject.meter_seen(METER)
    subject.announce_known([METER])
    subject.ha_online()
    subject.tick(0.0)
    assert published.meters() == []
    assert published.topics() == published.bridge_topics()


def test_with_discovery_off_nothing_is_published_or_subscribed() -> None:
    subject, published = announcer(MeterSettings(exclude=frozenset({OTHER})), enabled=False)
    assert subject.subscriptions == ()
    subject.meter_seen(METER)
    subject.announce_known([METER])
    subject.on_central_message("homeassistant/status", b"online", False)
    subject.on_central_message(f"homeassistant/sensor/kpm33b_{OTHER}/active_power/config", b"{}", True)
    subject.tick(0.0)
    assert published.messages == []


def test_subscriptions_are_the_status_every_sensor_config_and_the_bridges_binary_sensors() -> None:
    subject, _published = announcer()
    assert subject.subscriptions == ("homeassistant/status", "homeassistant/sensor/+/+/config",
                                     "homeassistant/binary_sensor/kpm33b_bridge/+/config")


def test_known_meters_at_start_are_announced_over_the_next_ticks() -> None:
    subject, published = announcer(MeterSettings(exclude=frozenset({OTHER})), meters_per_tick=2)
    subject.announce_known([METER, OTHER, "33B0000000001", "33B0000000002"])
    assert published.messages == []
    assert subject.tick(0.0) == 2
    assert published.meters() == [METER, "33B0000000001"]
    assert subject.tick(0.5) == 1
    assert subject.tick(1.0) == 0
    assert published.meters() == [METER, "33B0000000001", "33B0000000002"]


def settle(subject: DiscoveryAnnouncer, published: Published) -> None:
    """Tick until nothing more is published (the diagnostics of meters announced by a reading included)."""
    before = -1
    while before != len(published.messages):
        before = len(published.messages)
        subject.tick(0.0)


def test_home_assistant_online_reannounces_every_known_meter_at_a_bounded_rate() -> None:
    subject, published = announcer()
    for meter_id in meter_ids(1000):
        subject.meter_seen(meter_id)
    settle(subject, published)
    published.messages.clear()
    subject.on_central_message("homeassistant/status", b"offline", False)
    assert subject.pending() == 0
    subject.on_central_message("homeassistant/status", b"online", False)
    per_tick = []
    for tick in range(6):
        before = len(published.meters())
        subject.tick(tick * 0.5)
        per_tick.append(len(published.meters()) - before)
    assert per_tick == [250, 250, 250, 250, 0, 0]
    assert published.meters() == meter_ids(1000)
    assert all(retain for _topic, _payload, retain in published.messages)


def test_online_again_before_the_round_ends_does_not_announce_a_meter_twice() -> None:
    subject, published = announcer(meters_per_tick=3)
    for meter_id in meter_ids(5):
        subject.meter_seen(meter_id)
    settle(subject, published)
    published.messages.clear()
    subject.ha_online()
    subject.tick(0.0)
    subject.ha_online()
    while subject.tick(1.0):
        pass
    assert len(published.meter_messages()) == 4 * (3 + 5)  # the first three once more, all five once


def test_a_meter_seen_while_waiting_for_its_turn_is_announced_at_once() -> None:
    subject, published = announcer(meters_per_tick=1)
    subject.announce_known(["33B0000000001", METER])
    assert subject.meter_seen(METER)
    assert published.meters() == [METER]
    subject.tick(0.0)
    assert subject.tick(0.5) == 0
    assert published.meters() == [METER, "33B0000000001"]


def test_every_config_of_an_excluded_meter_is_cleared_before_its_retained_readings_and_once() -> None:
    """Home Assistant removes the entities first: no template of them ever meets an emptied reading."""
    subject, published = announcer(MeterSettings(exclude=frozenset({METER})))
    for object_id in ("active_power", "configuration", "active_energy", "voltage_l1", "from_an_old_version"):
        subject.on_central_message(f"homeassistant/sensor/kpm33b_{METER}/{object_id}/config", b"{}", True)
    prefix = f"homeassistant/sensor/kpm33b_{METER}"
    every_field = ["active_power", "active_energy", "active_energy_export",
                   "voltage_l1", "voltage_l2", "voltage_l3", "current_l1", "current_l2", "current_l3",
                   "active_power_l1", "active_power_l2", "active_power_l3",
                   "power_factor_l1", "power_factor_l2", "power_factor_l3", "power_factor",
                   "configuration", "clock_offset"]
    assert published.messages == [
        *((f"{prefix}/{field}/config", b"", True) for field in every_field),
        (f"kpm33b/{METER}/seconds", b"", True),
        (f"kpm33b/{METER}/minutes", b"", True),
        (f"kpm33b/{METER}/availability", b"", True),
        (f"{prefix}/from_an_old_version/config", b"", True),  # unknown here: cleared as the broker names it
    ]


def test_every_config_topic_covers_every_config_any_configuration_gives() -> None:
    settings = meters(**{METER: DeviceSettings(per_phase=ALL_GROUPS, export_energy=True)})
    assert set(discovery_configs(METER, settings, "kpm33b", "ha")) == set(every_config_topic(METER, "ha"))


def test_the_bridges_retained_configs_are_kept_a_leftover_of_its_node_removed_and_other_bridges_left_alone() -> None:
    subject, published = announcer()
    subject.tick(0.0)
    published.messages.clear()
    for topic in bridge_configs("kpm33b", "homeassistant"):
        subject.on_central_message(topic, b"{}", True)
    for foreign in ("homeassistant/sensor/kpm33b_bridge_site/queue_depth/config",
                    "homeassistant/binary_sensor/kpm33b_bridge_site/connection_state/config",
                    "homeassistant/binary_sensor/0x00158d0001/contact/config"):
        subject.on_central_message(foreign, b"{}", True)
    assert published.messages == []
    subject.on_central_message("homeassistant/sensor/kpm33b_bridge/old_counter/config", b"{}", True)
    subject.on_central_message("homeassistant/binary_sensor/kpm33b_bridge/old_state/config", b"{}", True)
    assert published.messages == [("homeassistant/sensor/kpm33b_bridge/old_counter/config", b"", True),
                                  ("homeassistant/binary_sensor/kpm33b_bridge/old_state/config", b"", True)]


def test_switching_discovery_off_or_moving_the_prefix_removes_the_bridge_device_only() -> None:
    subject, published = announcer()
    subject.meter_seen(METER)
    published.messages.clear()
    subject.reconfigure(MeterSettings(), "homeassistant", enabled=False, origin_url=None)
    assert published.messages == [(topic, b"", True) for topic in bridge_configs("kpm33b", "homeassistant")]
    assert subject.subscriptions == ()
    subject.reconfigure(MeterSettings(), "homeassistant", enabled=False, origin_url=None)
    subject.tick(0.0)
    assert len(published.messages) == 5  # nothing more while off
    published.messages.clear()
    subject.reconfigure(MeterSettings(), "homeassistant", enabled=True, origin_url=None)
    subject.tick(0.5)
    assert published.topics()[:5] == list(bridge_configs("kpm33b", "homeassistant"))
    assert all(payload for _topic, payload, _retain in published.messages)
    published.messages.clear()
    subject.reconfigure(MeterSettings(), "ha", enabled=True, origin_url=None)
    subject.tick(1.0)
    assert published.messages[:5] == [(topic, b"", True) for topic in bridge_configs("kpm33b", "homeassistant")]
    assert published.topics()[5:10] == list(bridge_configs("kpm33b", "ha"))


def test_a_per_phase_entity_no_longer_configured_is_removed_and_the_rest_kept() -> None:
    settings = meters(**{METER: DeviceSettings(per_phase=("voltage",))})
    subject, published = announcer(settings)
    subject.meter_seen(METER)
    published.messages.clear()
    for object_id in ("active_power", "voltage_l1", "current_l1", "power_factor"):
        subject.retained_config(f"homeassistant/sensor/kpm33b_{METER}/{object_id}/config", b"{}")
    assert published.messages == [
        (f"homeassistant/sensor/kpm33b_{METER}/current_l1/config", b"", True),
        (f"homeassistant/sensor/kpm33b_{METER}/power_factor/config", b"", True),
    ]


def test_configs_of_other_software_removals_and_live_echoes_are_left_alone() -> None:
    subject, published = announcer(MeterSettings(exclude=frozenset({METER})))
    subject.on_central_message("homeassistant/sensor/0x00158d0001/temperature/config", b"{}", True)
    subject.on_central_message(f"homeassistant/sensor/kpm33b_{METER}/active_power/config", b"", True)
    subject.on_central_message(f"homeassistant/sensor/kpm33b_{METER}/active_power/config", b"{}", False)
    assert published.messages == []


def test_a_meter_known_only_from_its_retained_config_is_reannounced_with_its_current_name() -> None:
    subject, published = announcer(meters(**{METER: DeviceSettings(name="Heat pump")}))
    subject.on_central_message(f"homeassistant/sensor/kpm33b_{METER}/active_power/config", b"{}", True)
    subject.on_central_message(f"homeassistant/sensor/kpm33b_{METER}/active_energy/config", b"{}", True)
    assert published.messages == []
    assert subject.tick(0.0) == 1
    assert {json.loads(payload)["device"]["name"] for _t, payload, _r in published.meter_messages()} == {"Heat pump"}
    assert subject.known() == [METER]


def test_known_meters_are_bounded_and_the_oldest_forgotten() -> None:
    subject, _published = announcer(max_meters=3)
    for meter_id in meter_ids(5):
        subject.meter_seen(meter_id)
    assert subject.known() == meter_ids(5)[2:]


def test_from_config_takes_prefix_main_topic_and_origin_url() -> None:
    config = config_loader.parse_config({
        **CENTRAL,
        "central_broker_topics": {"external_main_topic": "site"},
        "homeassistant": {"discovery_prefix": "ha", "origin_url": "https://example.org/kpm33b"},
    }, {})
    published = Published()
    subject = DiscoveryAnnouncer.from_config(config, published)
    subject.meter_seen(METER)
    topic, payload, _retain = published.messages[0]
    assert topic == "ha/binary_sensor/kpm33b_bridge_site/connection_state/config"
    assert json.loads(payload)["device"]["identifiers"] == ["kpm33b_bridge_site"]
    topic, payload, _retain = published.messages[5]
    assert topic == f"ha/sensor/kpm33b_{METER}/active_power/config"
    assert json.loads(payload)["state_topic"] == f"site/{METER}/seconds"
    assert json.loads(payload)["origin"]["support_url"] == "https://example.org/kpm33b"
    assert json.loads(payload)["device"]["via_device"] == "kpm33b_bridge_site"


# --- the per-phase values in the seconds payload ---------------------------------------


def test_per_phase_fields_come_from_the_phase_tags_of_the_real_capture() -> None:
    values = {tag: value for tag, value in RT_DATA.items() if tag not in ("id", "time", "isend")}
    assert clean_payload(SECONDS, METER, "20260112163900", values, ALL_GROUPS) == {
        "id": METER, "time": "2026-01-12T16:39:00", "active_power": 6.6905,
        "voltage_l1": 229.097, "voltage_l2": 231.567, "voltage_l3": 232.529,
        "current_l1": 9.735, "current_l2": 9.658, "current_l3": 9.655,
        "active_power_l1": 2.2229, "active_power_l2": 2.2293, "active_power_l3": 2.2382,
        "power_factor_l1": 0.996, "power_factor_l2": 0.996, "power_factor_l3": 0.996, "power_factor": 0.996,
    }


def test_a_missing_phase_tag_becomes_null_and_minutes_payloads_are_unchanged() -> None:
    assert clean_payload(SECONDS, METER, "20260112163900", {"zyggl": 1.5, "ua": 230.0}, ("voltage",)) == {
        "id": METER, "time": "2026-01-12T16:39:00", "active_power": 1.5,
        "voltage_l1": 230.0, "voltage_l2": None, "voltage_l3": None,
    }
    assert clean_payload(MINUTES, METER, "20260112163900", {"zygsz": 2.0, "ua": 230.0}, ALL_GROUPS) == {
        "id": METER, "time": "2026-01-12T16:39:00", "active_energy": 2.0}


def test_meters_without_per_phase_keep_exactly_the_minimal_payload() -> None:
    processor = MeterDataProcessor(per_phase={METER: ("voltage", "current")})
    other = dict(RT_DATA, id=OTHER)
    outcome = processor.process(SECONDS, json.dumps(other).encode(), 0.0)
    assert outcome.message is not None
    assert outcome.message.payload == {"id": OTHER, "time": "2026-01-12T16:39:00", "active_power": 6.6905}
    outcome = processor.process(SECONDS, json.dumps(RT_DATA).encode(), 0.0)
    assert outcome.message is not None
    assert list(outcome.message.payload) == ["id", "time", "active_power", "voltage_l1", "voltage_l2",
                                             "voltage_l3", "current_l1", "current_l2", "current_l3"]


# --- configuration ---------------------------------------------------------------------


def test_home_assistant_settings_default_to_discovery_on_the_standard_prefix() -> None:
    settings = config_loader.parse_config(CENTRAL, {}).homeassistant
    assert (settings.discovery, settings.discovery_prefix, settings.origin_url) == (True, "homeassistant", None)


def test_per_phase_is_stored_in_canonical_order() -> None:
    config = config_loader.parse_config(
        {**CENTRAL, "meters": {"devices": {METER: {"per_phase": ["power_factor", "voltage"]}}}}, {})
    assert config.meters.devices[METER].per_phase == ("voltage", "power_factor")
    assert ha_discovery.per_phase_by_meter(config.meters) == {METER: ("voltage", "power_factor")}


@pytest.mark.parametrize(("document", "problem"), [
    ({"meters": {"devices": {METER: {"per_phase": ["voltage", "voltage"]}}}},
     f"meters.devices.{METER}.per_phase: ['voltage', 'voltage'] is not allowed; expected a list without "
     "duplicates of voltage, current, power, power_factor"),
    ({"meters": {"devices": {METER: {"per_phase": ["frequency"]}}}},
     f"meters.devices.{METER}.per_phase: ['frequency'] is not allowed; expected a list without "
     "duplicates of voltage, current, power, power_factor"),
    ({"meters": {"devices": {METER: {"per_phase": "voltage"}}}},
     f"meters.devices.{METER}.per_phase: 'voltage' is not allowed; expected a list without "
     "duplicates of voltage, current, power, power_factor"),
    ({"homeassistant": {"discovery": "yes"}},
     "homeassistant.discovery: 'yes' is not allowed; expected true or false"),
    ({"homeassistant": {"discovery_prefix": "homeassistant/#"}},
     "homeassistant.discovery_prefix: 'homeassistant/#' is not allowed; expected a non-empty topic without "
     "'+', '#' or surrounding spaces"),
    ({"homeassistant": {"discovery_prefix": "homeassistant/"}},
     "homeassistant.discovery_prefix: 'homeassistant/' is not allowed; expected a topic without leading, "
     "trailing or doubled '/'"),
    ({"homeassistant": {"origin_url": "example.org"}},
     "homeassistant.origin_url: 'example.org' is not allowed; expected an http:// or https:// URL, or null"),
    ({"homeassistant": {"discovery_prefx": "ha"}},
     "homeassistant.discovery_prefx: unknown key; known keys here are discovery, discovery_prefix, origin_url"),
])
def test_home_assistant_configuration_problems_are_reported_by_key(document: dict[str, Any], problem: str) -> None:
    with pytest.raises(config_loader.ConfigError) as error:
        config_loader.parse_config({**CENTRAL, **document}, {})
    assert error.value.problems == (problem,)


def test_the_shipped_config_enables_discovery_on_the_standard_prefix() -> None:
    shipped = yaml.safe_load((Path(__file__).resolve().parent.parent / "config.yaml").read_text(encoding="utf-8"))
    shipped["central_broker"]["host"] = "192.0.2.10"  # left unset in the shipped file: the operator's to fill in
    config = config_loader.parse_config(shipped, {})
    assert config.homeassistant == config_loader.HomeAssistantSettings()


# --- the energy stream suits total_increasing -------------------------------------------


def test_the_energy_forwarded_from_the_real_captures_never_decreases() -> None:
    """``total_increasing``: Home Assistant books any decrease as a meter reset."""
    processor = MeterDataProcessor()
    last: dict[str, float] = {}
    forwarded = 0
    for name in ENY_NOW_CAPTURES:
        for payload in capture_payloads(name):
            outcome = processor.process(MINUTES, payload, 0.0)
            if outcome.message is None:
                continue
            energy = outcome.message.payload["active_energy"]
            assert isinstance(energy, float) and energy > 0
            assert energy >= last.get(outcome.message.meter_id, 0.0)
            last[outcome.message.meter_id] = energy
            forwarded += 1
    assert forwarded >= 624
