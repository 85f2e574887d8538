"""Home Assistant MQTT discovery for the meters: pure payload builders and a paho-free announcer.

A meter connected to the installation appears in Home Assistant as a device
with an ``Active power`` and an ``Active energy`` sensor (plus the per-phase
sensors its ``meters.devices.<id>.per_phase`` asks for) and two diagnostic
sensors on its configuration status (``Configuration``, ``Clock offset``),
without any YAML written by hand. Every meter device is connected via the
bridge device, the proxy itself (its connection state and counters, as
Zigbee2MQTT's bridge). The proxy publishes one retained config per entity on
``<prefix>/<component>/<node id>/<object id>/config`` (Home Assistant's
documented discovery protocol):

- when a meter's first reading is forwarded, at proxy start for every meter
  it knows, and again whenever Home Assistant announces ``online`` on
  ``<prefix>/status`` (spread over ticks, so that a restart of Home Assistant
  in a large installation does not meet a burst of thousands of messages);
- the unique ids derive from the meter id only, so renaming a meter changes
  the device name and keeps the entities and their history;
- every value template gives ``None`` (unknown) without a log line in Home
  Assistant when its field is missing or the payload is empty or no JSON
  object;
- the broker's retained configs tell the proxy which entities exist, also
  after a restart: those of excluded meters, and per-phase entities no longer
  configured, are removed with an empty retained payload (an excluded
  meter's every config first, then its retained readings); the bridge's
  configs are removed when discovery is switched off by a reload.

Everything that decides what to publish is a pure function of the meter id
and the configuration, tested key by key without a broker.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from config_loader import Config, MeterSettings
from config_status import CONFIG_STATES  # the states of <main>/<id>/config_status
from data_mapping import EXPORT_FIELD, PER_PHASE_FIELDS
from meter_table import MeterIds, MeterSet
from topics import (
    BINARY_SENSOR_COMPONENT,
    DISCOVERY_COMPONENT,
    MINUTES,
    OFFLINE,
    ONLINE,
    SECONDS,
    availability_topic,
    bridge_binary_sensor_subscription,
    bridge_discovery_topic,
    bridge_identifier,
    bridge_node_id,
    bridge_state_topic,
    bridge_stats_topic,
    config_status_topic,
    discovery_subscription,
    discovery_topic,
    ha_status_topic,
    node_id,
    parse_bridge_discovery_topic,
    parse_discovery_topic,
    reading_topic,
    retained_meter_topics,
)
from version import __version__

log = logging.getLogger(__name__)

ORIGIN_NAME = "kpm33b-proxy"
MANUFACTURER = "Compere"
MODEL = "KPM33B"
HA_ONLINE = b"online"

# A restart of Home Assistant re-announces every meter: at most this many
# meters per tick of the proxy (0.5 s), i.e. 500 meters per second.
METERS_PER_TICK = 250
# The diagnostic configs of meters announced by their first reading follow at this many meters per tick
# (200 messages a second), so that a burst of new meters costs the outgoing queue and the heap little more
# than without them. tests/test_reliability.py's 20,000 new meters at once, proxy's resident growth: +48 MiB
# at 50 a tick, +55 MiB with all of them at once (the outgoing queue overflowed), +44 MiB without them.
DIAGNOSTICS_PER_TICK = 50
MAX_KNOWN_METERS = 200_000

Publish = Callable[[str, bytes, bool], None]


@dataclass(frozen=True, slots=True)
class Sensor:
    """One Home Assistant sensor of a meter: one field of one of its clean payloads."""

    field: str  # the payload field, also the discovery object id
    name: str
    kind: str  # SECONDS or MINUTES: the clean topic whose payload carries the field
    device_class: str
    state_class: str
    unit: str | None  # None: no unit (Home Assistant's power_factor as a 0–1 ratio)
    precision: int


BASE_SENSORS = (
    Sensor("active_power", "Active power", SECONDS, "power", "measurement", "kW", 3),
    # total_increasing: what the Energy dashboard needs; the proxy's counter
    # guard keeps the stream from ever going backwards.
    Sensor("active_energy", "Active energy", MINUTES, "energy", "total_increasing", "kWh", 3),
)
# The Energy dashboard's "Return to grid", for the meters that publish it (meters.export_energy).
EXPORT_SENSOR = Sensor(EXPORT_FIELD, "Exported energy", MINUTES, "energy", "total_increasing", "kWh", 3)

# Per group: Home Assistant device class, unit and display precision.
_PER_PHASE_CLASSES: dict[str, tuple[str, str | None, int]] = {
    "voltage": ("voltage", "V", 1),
    "current": ("current", "A", 2),
    "power": ("power", "kW", 3),
    "power_factor": ("power_factor", None, 3),
}


CONFIGURATION_OBJECT = "configuration"
CLOCK_OFFSET_OBJECT = "clock_offset"
DIAGNOSTIC_OBJECTS = (CONFIGURATION_OBJECT, CLOCK_OFFSET_OBJECT)
DIAGNOSTIC = "diagnostic"

# The bridge device: the proxy itself.
BRIDGE_NAME = "KPM33B bridge"
BRIDGE_MODEL = "kpm33b-proxy"
CONNECTION_OBJECT = "connection_state"


@dataclass(frozen=True, slots=True)
class BridgeSensor:
    """One diagnostic sensor of the bridge, read from its retained stats."""

    object_id: str
    name: str
    value_template: str
    state_class: str
    unit: str


def _entity_name(field: str) -> str:
    """``active_power_l1`` → ``Active power L1``; ``power_factor`` → ``Power factor``."""
    words = field.replace("_", " ")
    return re.sub(r" l([123])$", r" L\1", words[:1].upper() + words[1:])


PER_PHASE_SENSORS: dict[str, tuple[Sensor, ...]] = {
    group: tuple(
        Sensor(field, _entity_name(field), SECONDS, _PER_PHASE_CLASSES[group][0], "measurement",
               _PER_PHASE_CLASSES[group][1], _PER_PHASE_CLASSES[group][2])
        for _tag, field in fields
    )
    for group, fields in PER_PHASE_FIELDS.items()
}


# --- value templates: a missing field or a payload that is no JSON object gives unknown, silently -------
#
# Home Assistant renders a value template with ``value_json`` defined only
# when the payload parses as JSON, under a "logging undefined": printing a
# missing key (``{{ value_json.voltage_l1 }}`` on a reading from before
# per_phase was set) logs a WARNING, and any use of an undefined
# ``value_json`` (an empty retained payload: a cleared topic) logs an ERROR.
# Tests (``is mapping``, ``is number``, ``in``) never log, and the MQTT sensor
# takes the rendered ``None`` as unknown. Subscripts, not attributes:
# ``value_json.values`` would be the dict's method.


def number_template(field: str) -> str:
    """The field when it is a number; else ``None`` (unknown) without a log line."""
    return (f"{{{{ value_json['{field}'] if value_json is mapping and value_json['{field}'] is number "
            "else None }}")


def option_template(field: str, options: Iterable[str]) -> str:
    """The field when it is one of ``options`` (an enum sensor logs anything else); else ``None``."""
    listed = ", ".join(f"'{option}'" for option in options)
    return f"{{{{ value_json['{field}'] if value_json is mapping and value_json['{field}'] in [{listed}] else None }}}}"


def sum_template(field: str) -> str:
    """The sum of the numbers of the object in ``field`` (the stats' ``dropped`` by reason); else ``None``."""
    return (f"{{{{ value_json['{field}'].values() | select('number') | sum "
            f"if value_json is mapping and value_json['{field}'] is mapping else None }}}}")


BRIDGE_SENSORS = (
    BridgeSensor("readings_forwarded", "Readings forwarded", number_template("forwarded"), "total_increasing",
                 "readings"),
    # Every reason of the stats' ``dropped`` together (rejected, duplicate, excluded, guard, refused …):
    # the breakdown is on <main>/bridge/stats.
    BridgeSensor("readings_dropped", "Readings dropped", sum_template("dropped"), "total_increasing", "readings"),
    BridgeSensor("queue_depth", "Queue depth", number_template("queue_depth"), "measurement", "messages"),
    BridgeSensor("meters_online", "Meters online", number_template("online"), "measurement", "meters"),
)


# --- pure functions -------------------------------------------------------------


def per_phase_by_meter(meters: MeterSettings) -> dict[str, tuple[str, ...]]:
    """The per-phase groups of every meter that has some, for the data mapping."""
    return {meter_id: device.per_phase for meter_id, device in meters.devices.items() if device.per_phase}


def sensors(meter_id: str, meters: MeterSettings) -> tuple[Sensor, ...]:
    """The sensors of one meter: the base two, its exported energy, then its configured per-phase groups."""
    device = meters.devices.get(meter_id)
    groups = device.per_phase if device is not None else ()
    export = (EXPORT_SENSOR,) if meters.exports_energy(meter_id) else ()
    return BASE_SENSORS + export + tuple(sensor for group in groups for sensor in PER_PHASE_SENSORS[group])


def origin(origin_url: str | None = None) -> dict[str, str]:
    """The ``origin`` block: which software published the config (shown and logged by Home Assistant)."""
    block = {"name": ORIGIN_NAME, "sw_version": __version__}
    if origin_url:
        block["support_url"] = origin_url
    return block


def meter_device(meter_id: str, meters: MeterSettings, main_topic: str) -> dict[str, Any]:
    """The ``device`` block of every entity of one meter; ``via_device`` links it to the bridge."""
    return {
        "identifiers": [node_id(meter_id)],
        "name": meters.device_name(meter_id),
        "manufacturer": MANUFACTURER,
        "model": MODEL,
        "serial_number": meter_id,
        "via_device": bridge_identifier(main_topic),
    }


def sensor_config(sensor: Sensor, meter_id: str, meters: MeterSettings, main_topic: str,
                  origin_url: str | None = None) -> dict[str, Any]:
    """The discovery payload of one sensor of one meter."""
    node = node_id(meter_id)
    config: dict[str, Any] = {
        "name": sensor.name,
        "unique_id": f"{node}_{sensor.field}",  # from the meter id only: stable across renames
        "state_topic": reading_topic(main_topic, meter_id, sensor.kind),
        "value_template": number_template(sensor.field),
        "device_class": sensor.device_class,
        "state_class": sensor.state_class,
    }
    if sensor.unit is not None:
        config["unit_of_measurement"] = sensor.unit
    config.update({
        "suggested_display_precision": sensor.precision,
        "qos": 1,  # the readings are published at QoS 1: keep them so up to Home Assistant
        # Available only while the proxy forwards and the meter reports.
        "availability": [{"topic": bridge_state_topic(main_topic)},
                         {"topic": availability_topic(main_topic, meter_id)}],
        "availability_mode": "all",
        "device": meter_device(meter_id, meters, main_topic),
        "origin": origin(origin_url),
    })
    return config


def diagnostic_configs(meter_id: str, meters: MeterSettings, main_topic: str,
                       origin_url: str | None = None) -> dict[str, dict[str, Any]]:
    """The meter's two diagnostic sensors on its configuration status: object id → payload.

    The config sender retains ``<main>/<id>/config_status``; these entities
    have no availability: the last result of a push stays true while the
    meter or the proxy is away (``no_reply`` is most useful exactly then).
    """
    node = node_id(meter_id)
    state_topic = config_status_topic(main_topic, meter_id)
    common = {"entity_category": DIAGNOSTIC, "qos": 1, "device": meter_device(meter_id, meters, main_topic),
              "origin": origin(origin_url)}
    return {
        CONFIGURATION_OBJECT: {
            "name": "Configuration",
            "unique_id": f"{node}_{CONFIGURATION_OBJECT}",
            "state_topic": state_topic,
            "value_template": option_template("state", CONFIG_STATES),
            "device_class": "enum",
            "options": list(CONFIG_STATES),
            **common,
        },
        CLOCK_OFFSET_OBJECT: {
            "name": "Clock offset",
            "unique_id": f"{node}_{CLOCK_OFFSET_OBJECT}",
            "state_topic": state_topic,
            "value_template": number_template("clock_offset_seconds"),
            "device_class": "duration",
            "state_class": "measurement",
            "unit_of_measurement": "s",
            "suggested_display_precision": 0,
            **common,
        },
    }


def reading_configs(meter_id: str, meters: MeterSettings, main_topic: str, prefix: str,
                    origin_url: str | None = None) -> dict[str, dict[str, Any]]:
    """The configs of the sensors on the meter's readings: config topic → payload."""
    return {
        discovery_topic(prefix, meter_id, sensor.field): sensor_config(sensor, meter_id, meters, main_topic, origin_url)
        for sensor in sensors(meter_id, meters)
    }


def discovery_configs(meter_id: str, meters: MeterSettings, main_topic: str, prefix: str,
                      origin_url: str | None = None) -> dict[str, dict[str, Any]]:
    """Every discovery config of one meter: config topic → payload (readings first, then diagnostics)."""
    configs = reading_configs(meter_id, meters, main_topic, prefix, origin_url)
    for object_id, config in diagnostic_configs(meter_id, meters, main_topic, origin_url).items():
        configs[discovery_topic(prefix, meter_id, object_id)] = config
    return configs


def every_config_topic(meter_id: str, prefix: str) -> list[str]:
    """Every config topic any configuration could give the meter: what excluding it clears first."""
    fields = [sensor.field for sensor in (*BASE_SENSORS, EXPORT_SENSOR)]
    fields += [sensor.field for group in PER_PHASE_SENSORS.values() for sensor in group]
    return [discovery_topic(prefix, meter_id, object_id) for object_id in (*fields, *DIAGNOSTIC_OBJECTS)]


def bridge_device(main_topic: str) -> dict[str, Any]:
    """The bridge device: the proxy, which every meter device names in ``via_device``."""
    return {"identifiers": [bridge_identifier(main_topic)], "name": BRIDGE_NAME, "model": BRIDGE_MODEL,
            "sw_version": __version__}


def bridge_configs(main_topic: str, prefix: str, origin_url: str | None = None) -> dict[str, dict[str, Any]]:
    """Every discovery config of the bridge device: config topic → payload.

    The connection state reads ``<main>/bridge/state`` as it is (no
    template); the counters read the retained ``<main>/bridge/stats`` and
    have no availability: the last stats published stay visible while the
    bridge is offline, which the connection state shows.
    """
    node = bridge_node_id(main_topic)
    device = bridge_device(main_topic)
    configs: dict[str, dict[str, Any]] = {
        bridge_discovery_topic(prefix, main_topic, BINARY_SENSOR_COMPONENT, CONNECTION_OBJECT): {
            "name": "Connection state",
            "unique_id": f"{node}_{CONNECTION_OBJECT}",
            "state_topic": bridge_state_topic(main_topic),
            "payload_on": ONLINE,
            "payload_off": OFFLINE,
            "device_class": "connectivity",
            "entity_category": DIAGNOSTIC,
            "qos": 1,
            "device": device,
            "origin": origin(origin_url),
        },
    }
    for sensor in BRIDGE_SENSORS:
        configs[bridge_discovery_topic(prefix, main_topic, DISCOVERY_COMPONENT, sensor.object_id)] = {
            "name": sensor.name,
            "unique_id": f"{node}_{sensor.object_id}",
            "state_topic": bridge_stats_topic(main_topic),
            "value_template": sensor.value_template,
            "state_class": sensor.state_class,
            "unit_of_measurement": sensor.unit,
            "entity_category": DIAGNOSTIC,
            "qos": 1,
            "device": device,
            "origin": origin(origin_url),
        }
    return configs


def encode_config(config: Mapping[str, Any]) -> bytes:
    """A discovery payload as published: JSON, UTF-8 names kept readable."""
    return json.dumps(config, ensure_ascii=False).encode()


def is_wanted(meter_id: str, object_id: str, meters: MeterSettings) -> bool:
    """Whether the configuration still asks for this entity of this meter."""
    if meter_id in meters.exclude:
        return False
    return object_id in DIAGNOSTIC_OBJECTS or any(sensor.field == object_id for sensor in sensors(meter_id, meters))


def is_bridge_entity(component: str, object_id: str) -> bool:
    """Whether the bridge device has this entity; a config of its node that it has not is a leftover."""
    if component == BINARY_SENSOR_COMPONENT:
        return object_id == CONNECTION_OBJECT
    return component == DISCOVERY_COMPONENT and any(sensor.object_id == object_id for sensor in BRIDGE_SENSORS)


# --- the announcer: when to publish -----------------------------------------------


class DiscoveryAnnouncer:
    """Decides when to publish or remove discovery configs; hands them to ``publish``.

    paho-free and thread-safe: the proxy calls ``meter_seen`` from the internal
    client's thread, ``on_central_message`` from the central client's thread and
    ``tick`` from its timer thread. Every call is quick: configs are built in
    microseconds and ``publish`` only queues.
    """

    def __init__(self, meters: MeterSettings, main_topic: str, prefix: str, publish: Publish, *,
                 enabled: bool = True, origin_url: str | None = None, meters_per_tick: int = METERS_PER_TICK,
                 max_meters: int = MAX_KNOWN_METERS, diagnostics_per_tick: int = DIAGNOSTICS_PER_TICK,
                 ids: MeterIds | None = None) -> None:
        self.meters = meters
        self.main_topic = main_topic
        self.prefix = prefix
        self.enabled = enabled
        self.origin_url = origin_url
        self.meters_per_tick = meters_per_tick
        self.diagnostics_per_tick = diagnostics_per_tick
        self.max_meters = max_meters
        self.status_topic = ha_status_topic(prefix)
        # What the proxy subscribes to on the central broker (nothing when off).
        self.subscriptions = self._subscriptions()
        self._publish = publish
        self._lock = threading.Lock()
        self._bridge_pending = enabled  # the bridge's configs go out before any meter's
        # Sets a whole fleet may be in, so compact (see meter_table): 40 bytes a meter, not 100, and 9
        # with the ids shared with the proxy's other tables (``ids``).
        self._known = MeterSet(ids)  # in the order they were learnt, bounded
        self._pending = MeterSet(ids)  # meters to announce at the next ticks, in order
        # Meters announced by their first reading whose diagnostic configs follow at the next ticks:
        # a burst of new meters then costs the outgoing queue what it did before the diagnostics.
        self._diagnostics = MeterSet(ids)
        self._cleared: set[str] = set()  # excluded meters whose retained readings were cleared
        self._round_started: float | None = None

    @classmethod
    def from_config(cls, config: Config, publish: Publish, ids: MeterIds | None = None) -> DiscoveryAnnouncer:
        """The announcer the configuration asks for (doing nothing when discovery is off)."""
        settings = config.homeassistant
        return cls(config.meters, config.central_broker_topics.external_main_topic, settings.discovery_prefix,
                   publish, enabled=settings.discovery, origin_url=settings.origin_url, ids=ids)

    def reconfigure(self, meters: MeterSettings, prefix: str, *, enabled: bool,
                    origin_url: str | None) -> None:
        """Apply a reloaded configuration: every known meter is announced again over the next ticks.

        New names and per-phase groups reach Home Assistant that way. What is
        no longer wanted (a meter now excluded, a per-phase group removed) is
        removed when the broker sends the retained configs again: the proxy
        subscribes to ``subscriptions`` once more after this call. A meter no
        longer excluded is announced again when it is next heard from.
        """
        with self._lock:
            if self.enabled and (not enabled or prefix != self.prefix):
                # Off now (or moved): the bridge device goes; the meters' configs stay (see the docs).
                log.info("removing the bridge device from Home Assistant under %s/ (discovery %s)", self.prefix,
                         "switched off" if not enabled else "prefix changed")
                for topic in bridge_configs(self.main_topic, self.prefix):
                    self._publish(topic, b"", True)
            self._bridge_pending = enabled
            self.meters = meters
            self.prefix = prefix
            self.enabled = enabled
            self.origin_url = origin_url
            self.status_topic = ha_status_topic(prefix)
            self.subscriptions = self._subscriptions()
            self._cleared &= meters.exclude
            for meter_id in [m for m in self._known if m in meters.exclude]:
                self._known.discard(meter_id)
                self._pending.discard(meter_id)
                self._diagnostics.discard(meter_id)
            if not enabled:  # nothing more goes out under the prefix
                self._pending.clear()
                self._diagnostics.clear()
                self._round_started = None
            if enabled:
                for meter_id in self._known:
                    self._pending.add(meter_id)

    def _subscriptions(self) -> tuple[str, ...]:
        """Home Assistant's status, every sensor config (meters' and bridge's), the bridge's binary sensors."""
        if not self.enabled:
            return ()
        return (self.status_topic, discovery_subscription(self.prefix),
                bridge_binary_sensor_subscription(self.prefix, self.main_topic))

    def known(self) -> list[str]:
        """The meters whose configs the proxy publishes, in the order it learnt them."""
        with self._lock:
            return list(self._known)

    def pending(self) -> int:
        """How many meters wait for their (re-)announcement."""
        with self._lock:
            return len(self._pending)

    def meter_seen(self, meter_id: str) -> bool:
        """A meter's reading is about to be forwarded: announce it now if it is new.

        Called before the reading is queued, so that its configs precede it.
        True when the configs were published. Its diagnostic configs (on the
        retained ``config_status``, which needs no such order) follow at the
        next ticks, at the announcements' bounded rate.
        """
        if not self.enabled or meter_id in self.meters.exclude:
            return False
        if self._bridge_pending:  # read without the lock (the per-reading path); taken below in any case,
            self._announce_bridge()  # so a meter's configs never overtake the bridge's being published
        with self._lock:
            if meter_id in self._known and meter_id not in self._pending:
                return False
            self._pending.discard(meter_id)
            new = meter_id not in self._known
            self._remember(meter_id)
            self._diagnostics.add(meter_id)
        if new:
            log.info("announcing meter %s to Home Assistant", meter_id)
        self._announce(meter_id, diagnostics=False)
        return True

    def announce_known(self, meter_ids: Iterable[str]) -> None:
        """At start: the meters the proxy already knows, announced over the next ticks."""
        if not self.enabled:
            return
        with self._lock:
            for meter_id in meter_ids:
                if meter_id not in self.meters.exclude:
                    self._remember(meter_id)
                    self._pending.add(meter_id)

    def ha_online(self) -> None:
        """Home Assistant (re)started: announce every known meter again, over the next ticks."""
        if not self.enabled:
            return
        with self._lock:
            self._bridge_pending = True
            for meter_id in self._known:
                self._pending.add(meter_id)
            count = len(self._pending)
        log.info("Home Assistant is online: announcing the bridge and %d meters", count)

    def tick(self, now: float) -> int:
        """Announce up to ``meters_per_tick`` pending meters; how many were announced.

        The caller's tick period bounds the rate: the proxy ticks every 0.5 s.
        The bridge's configs, when due, go first; then the pending meters;
        then the diagnostic configs of up to ``diagnostics_per_tick`` meters
        announced by a reading (neither counted).
        """
        self._announce_bridge()
        with self._lock:
            batch = self._take(self._pending)
            for meter_id in batch:
                self._diagnostics.discard(meter_id)  # a full announcement has them
            diagnostics = self._take(self._diagnostics, self.diagnostics_per_tick)
            finished = bool(batch) and not self._pending
            started = self._round_started if self._round_started is not None else now
            if batch and not finished and self._round_started is None:
                self._round_started = now
            if finished:
                self._round_started = None
        for meter_id in batch:
            self._announce(meter_id)
        for meter_id in diagnostics:
            self._announce_diagnostics(meter_id)
        if finished:
            log.info("announced the known meters to Home Assistant (%.1f s)", max(0.0, now - started))
        return len(batch)

    def _take(self, queue: MeterSet, limit: int | None = None) -> list[str]:
        """The first ``limit`` (``meters_per_tick``) meters of ``queue``, removed from it (caller holds the lock)."""
        batch = queue.first(self.meters_per_tick if limit is None else limit)
        for meter_id in batch:
            queue.discard(meter_id)  # an emptied set gives its memory back (see meter_table)
        return batch

    def on_central_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """A message on one of ``subscriptions``: Home Assistant's status or a config."""
        if not self.enabled:
            return
        if topic == self.status_topic:
            if payload == HA_ONLINE:
                self.ha_online()
            return
        # Live messages on config topics are our own publications coming back,
        # or a change by someone else: only the broker's retained store counts.
        if retained:
            self.retained_config(topic, payload)

    def retained_config(self, topic: str, payload: bytes) -> None:
        """A config retained on the broker: remove it if unwanted, else keep its meter known.

        An excluded meter's configs are all cleared at the first of them, then
        its retained readings: Home Assistant removes an entity before its
        state topic is emptied, so no template ever meets the empty payload.
        """
        if not payload:
            return
        bridge = parse_bridge_discovery_topic(topic, self.prefix, self.main_topic)
        if bridge is not None:
            if not is_bridge_entity(*bridge):
                log.info("removing the Home Assistant entity %s of the bridge (no longer one of its entities)",
                         bridge[1])
                self._publish(topic, b"", True)
            return
        parsed = parse_discovery_topic(topic, self.prefix)
        if parsed is None:
            return
        meter_id, object_id = parsed
        if is_wanted(meter_id, object_id, self.meters):
            # Known from the broker (e.g. a meter that only ever sent power and so
            # is not in the energy journal): re-announced at start with its current name.
            with self._lock:
                if meter_id not in self._known:
                    self._remember(meter_id)
                    self._pending.add(meter_id)
            return
        if meter_id not in self.meters.exclude:
            log.info("removing the Home Assistant entity %s of meter %s (no longer configured)", object_id, meter_id)
            self._publish(topic, b"", True)
            return
        with self._lock:
            first = meter_id not in self._cleared
            self._cleared.add(meter_id)
        every = every_config_topic(meter_id, self.prefix)
        if not first:
            if topic not in every:  # cleared with the others at the first
                self._publish(topic, b"", True)
            return
        log.info("removing the Home Assistant entities of meter %s (meter excluded), then its retained readings",
                 meter_id)
        for config_topic in (*every, *(() if topic in every else (topic,))):
            self._publish(config_topic, b"", True)
        for retained_topic in retained_meter_topics(self.main_topic, meter_id):
            self._publish(retained_topic, b"", True)

    def _remember(self, meter_id: str) -> None:
        """Add to the known meters (caller holds the lock); forget the oldest beyond the bound."""
        self._known.add(meter_id)
        if len(self._known) > self.max_meters:
            oldest = self._known.first(1)[0]
            self._known.discard(oldest)
            self._pending.discard(oldest)
            self._diagnostics.discard(oldest)

    def _announce_bridge(self) -> None:
        """Publish the bridge's configs if due; under the lock, so no meter's config can overtake them."""
        with self._lock:
            if not self._bridge_pending or not self.enabled:
                return
            self._bridge_pending = False
            for topic, config in bridge_configs(self.main_topic, self.prefix, self.origin_url).items():
                self._publish(topic, encode_config(config), True)

    def _announce(self, meter_id: str, *, diagnostics: bool = True) -> None:
        build = discovery_configs if diagnostics else reading_configs
        for topic, config in build(meter_id, self.meters, self.main_topic, self.prefix, self.origin_url).items():
            self._publish(topic, encode_config(config), True)

    def _announce_diagnostics(self, meter_id: str) -> None:
        if not self.enabled or meter_id in self.meters.exclude:
            return
        for object_id, config in diagnostic_configs(meter_id, self.meters, self.main_topic, self.origin_url).items():
            self._publish(discovery_topic(self.prefix, meter_id, object_id), encode_config(config), True)
