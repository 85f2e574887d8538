"""Home Assistant MQTT discovery for the meters: pure payload builders and a paho-free announcer.

A meter connected to the installation appears in Home Assistant as a device
with an ``Active power`` and an ``Active energy`` sensor (plus the per-phase
sensors its ``meters.devices.<id>.per_phase`` asks for), without any YAML
written by hand. The proxy publishes one retained config per sensor on
``<prefix>/sensor/kpm33b_<id>/<object id>/config`` (Home Assistant's
documented discovery protocol):

- when a meter's first reading is forwarded, at proxy start for every meter
  it knows, and again whenever Home Assistant announces ``online`` on
  ``<prefix>/status`` (spread over ticks, so that a restart of Home Assistant
  in a large installation does not meet a burst of thousands of messages);
- the unique ids derive from the meter id only, so renaming a meter changes
  the device name and keeps the entities and their history;
- the broker's retained configs tell the proxy which entities exist, also
  after a restart: those of excluded meters, and per-phase entities no longer
  configured, are removed with an empty retained payload (and an excluded
  meter's retained readings with them).

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
from data_mapping import EXPORT_FIELD, PER_PHASE_FIELDS
from topics import (
    MINUTES,
    SECONDS,
    availability_topic,
    bridge_state_topic,
    discovery_subscription,
    discovery_topic,
    ha_status_topic,
    node_id,
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


def sensor_config(sensor: Sensor, meter_id: str, meters: MeterSettings, main_topic: str,
                  origin_url: str | None = None) -> dict[str, Any]:
    """The discovery payload of one sensor of one meter."""
    node = node_id(meter_id)
    config: dict[str, Any] = {
        "name": sensor.name,
        "unique_id": f"{node}_{sensor.field}",  # from the meter id only: stable across renames
        "state_topic": reading_topic(main_topic, meter_id, sensor.kind),
        "value_template": f"{{{{ value_json.{sensor.field} }}}}",
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
        "device": {
            "identifiers": [node],
            "name": meters.device_name(meter_id),
            "manufacturer": MANUFACTURER,
            "model": MODEL,
            "serial_number": meter_id,
        },
        "origin": origin(origin_url),
    })
    return config


def discovery_configs(meter_id: str, meters: MeterSettings, main_topic: str, prefix: str,
                      origin_url: str | None = None) -> dict[str, dict[str, Any]]:
    """Every discovery config of one meter: config topic → payload."""
    return {
        discovery_topic(prefix, meter_id, sensor.field): sensor_config(sensor, meter_id, meters, main_topic, origin_url)
        for sensor in sensors(meter_id, meters)
    }


def encode_config(config: Mapping[str, Any]) -> bytes:
    """A discovery payload as published: JSON, UTF-8 names kept readable."""
    return json.dumps(config, ensure_ascii=False).encode()


def is_wanted(meter_id: str, object_id: str, meters: MeterSettings) -> bool:
    """Whether the configuration still asks for this entity of this meter."""
    if meter_id in meters.exclude:
        return False
    return any(sensor.field == object_id for sensor in sensors(meter_id, meters))


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
                 max_meters: int = MAX_KNOWN_METERS) -> None:
        self.meters = meters
        self.main_topic = main_topic
        self.prefix = prefix
        self.enabled = enabled
        self.origin_url = origin_url
        self.meters_per_tick = meters_per_tick
        self.max_meters = max_meters
        self.status_topic = ha_status_topic(prefix)
        # What the proxy subscribes to on the central broker (nothing when off).
        self.subscriptions: tuple[str, ...] = (
            (self.status_topic, discovery_subscription(prefix)) if enabled else ()
        )
        self._publish = publish
        self._lock = threading.Lock()
        self._known: dict[str, None] = {}  # insertion-ordered set, bounded
        self._pending: dict[str, None] = {}  # meters to announce at the next ticks, in order
        self._cleared: set[str] = set()  # excluded meters whose retained readings were cleared
        self._round_started: float | None = None

    @classmethod
    def from_config(cls, config: Config, publish: Publish) -> DiscoveryAnnouncer:
        """The announcer the configuration asks for (doing nothing when discovery is off)."""
        settings = config.homeassistant
        return cls(config.meters, config.central_broker_topics.external_main_topic, settings.discovery_prefix,
                   publish, enabled=settings.discovery, origin_url=settings.origin_url)

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
            self.meters = meters
            self.prefix = prefix
            self.enabled = enabled
            self.origin_url = origin_url
            self.status_topic = ha_status_topic(prefix)
            self.subscriptions = (self.status_topic, discovery_subscription(prefix)) if enabled else ()
            self._cleared &= meters.exclude
            for meter_id in [m for m in self._known if m in meters.exclude]:
                del self._known[meter_id]
                self._pending.pop(meter_id, None)
            if enabled:
                for meter_id in self._known:
                    self._pending[meter_id] = None

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
        True when the configs were published.
        """
        if not self.enabled or meter_id in self.meters.exclude:
            return False
        with self._lock:
            if meter_id in self._known and meter_id not in self._pending:
                return False
            self._pending.pop(meter_id, None)
            new = meter_id not in self._known
            self._remember(meter_id)
        if new:
            log.info("announcing meter %s to Home Assistant", meter_id)
        self._announce(meter_id)
        return True

    def announce_known(self, meter_ids: Iterable[str]) -> None:
        """At start: the meters the proxy already knows, announced over the next ticks."""
        if not self.enabled:
            return
        with self._lock:
            for meter_id in meter_ids:
                if meter_id not in self.meters.exclude:
                    self._remember(meter_id)
                    self._pending[meter_id] = None

    def ha_online(self) -> None:
        """Home Assistant (re)started: announce every known meter again, over the next ticks."""
        if not self.enabled:
            return
        with self._lock:
            for meter_id in self._known:
                self._pending[meter_id] = None
            count = len(self._pending)
        log.info("Home Assistant is online: announcing %d meters", count)

    def tick(self, now: float) -> int:
        """Announce up to ``meters_per_tick`` pending meters; how many were announced.

        The caller's tick period bounds the rate: the proxy ticks every 0.5 s.
        """
        with self._lock:
            if not self._pending:
                return 0
            if self._round_started is None:
                self._round_started = now
            batch = []
            for meter_id in self._pending:
                batch.append(meter_id)
                if len(batch) >= self.meters_per_tick:
                    break
            for meter_id in batch:
                del self._pending[meter_id]
            finished = not self._pending
            started = self._round_started
            if finished:
                self._round_started = None
        for meter_id in batch:
            self._announce(meter_id)
        if finished:
            log.info("announced the known meters to Home Assistant (%.1f s)", max(0.0, now - started))
        return len(batch)

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
        """A config retained on the broker: remove it if unwanted, else keep its meter known."""
        parsed = parse_discovery_topic(topic, self.prefix)
        if parsed is None or not payload:
            return
        meter_id, object_id = parsed
        if is_wanted(meter_id, object_id, self.meters):
            # Known from the broker (e.g. a meter that only ever sent power and so
            # is not in the energy journal): re-announced at start with its current name.
            with self._lock:
                if meter_id not in self._known:
                    self._remember(meter_id)
                    self._pending[meter_id] = None
            return
        excluded = meter_id in self.meters.exclude
        log.info("removing the Home Assistant entity %s of meter %s (%s)", object_id, meter_id,
                 "meter excluded" if excluded else "no longer configured")
        self._publish(topic, b"", True)
        if excluded:
            with self._lock:
                first = meter_id not in self._cleared
                self._cleared.add(meter_id)
            if first:
                for retained_topic in retained_meter_topics(self.main_topic, meter_id):
                    self._publish(retained_topic, b"", True)

    def _remember(self, meter_id: str) -> None:
        """Add to the known meters (caller holds the lock); forget the oldest beyond the bound."""
        self._known[meter_id] = None
        if len(self._known) > self.max_meters:
            oldest = next(iter(self._known))
            del self._known[oldest]
            self._pending.pop(oldest, None)

    def _announce(self, meter_id: str) -> None:
        for topic, config in discovery_configs(meter_id, self.meters, self.main_topic, self.prefix,
                                               self.origin_url).items():
            self._publish(topic, encode_config(config), True)
