"""kpm33b_proxy: raw meter traffic on the internal broker → clean per-meter topics on the central one.

Thin wiring around the pure ``data_mapping`` module:

- the internal client (fixed client id, persistent MQTT 5 session, a large
  receive window) subscribes to the meters' data topics at QoS 1;
- ``on_message`` maps each packet (microseconds of pure work, no waiting) and
  publishes the clean message at once when nothing is queued ahead of it, or
  appends it to a bounded outgoing queue;
- the forwarding engine (``outgoing.Forwarder``) hands the queue to the
  central client within its window (paho loses messages silently beyond
  65,535 outstanding ones), so a central outage is absorbed by our own
  bounded queue and drained in order when it returns;
- a raw reading is acknowledged to the internal broker only once the central
  broker has its clean message, so readings a killed proxy had in hand come
  again from its persistent session; a clean message the central broker
  refuses (PUBACK reason ≥ 0x80, e.g. its ACL) is not delivered: it is
  counted as ``refused_by_central`` and logged, never counted as forwarded;
- a message larger than the central broker's announced Maximum Packet Size
  is never handed to paho (the broker would drop the connection for it): it
  is counted as ``too_large``, logged, and the queue moves on;
- the main thread runs the timers: meters going offline, the energy journal,
  stats, the retained device list (``<main>/bridge/devices``: when a meter
  appears, goes or changes, at most once a second, and with the stats), and
  the systemd watchdog's heartbeat.

``<main>/bridge/state`` is ``online`` only while the proxy is subscribed on
the internal broker and connected to the central one, and ``offline`` (the
last will) otherwise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt

import config_loader
import daemon
from availability import MeterAvailability, silence_limit
from config_loader import Config, MeterSettings
from config_watch import ConfigWatcher
from daemon import Counters, RateLimitedLog
from data_mapping import (
    DROP_ENERGY_DECREASE,
    DROP_EXCLUDED,
    EVENT_RESET,
    REJECTIONS,
    RESET_READINGS,
    CleanMessage,
    GuardEvent,
    MeterDataProcessor,
    MeterMemory,
    encode_payload,
)
from fleet import device_list, encode_device_list
from ha_discovery import DiscoveryAnnouncer, per_phase_by_meter
from meter_table import MeterIds
from mqtt_client import (
    ConnectionReporter,
    connect_in_background,
    make_client,
    network_thread_alive,
    publish_packet_size,
    reason_text,
)
from outgoing import EXPIRED, Forwarder
from sd_notify import SystemdNotifier
from state_store import EnergyJournal, LastSeenFile, StateLocked, StateUnusable
from topics import (
    AVAILABILITY,
    MINUTES,
    OFFLINE,
    ONLINE,
    SECONDS,
    availability_topic,
    bridge_devices_topic,
    bridge_state_topic,
    bridge_stats_topic,
    meter_subscription,
    parse_meter_topic,
    parse_state,
    reading_topic,
    retained_meter_topics,
)

log = logging.getLogger("kpm33b_proxy")

INTERNAL_CLIENT_ID = "kpm33b-proxy"
# The persistent session on the internal broker outlives a restart or an
# upgrade of the proxy by a wide margin; the broker bounds what it queues.
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
RECEIVE_MAXIMUM = 65_535  # MQTT 5 maximum: the broker may send this many QoS 1 messages unacknowledged
SHUTDOWN_DRAIN_SECONDS = 5.0
TICK_SECONDS = 0.5
EXIT_STATE_LOCKED = 3
EXIT_STATE_UNUSABLE = 3  # as for a locked one: the internal broker keeps the readings meanwhile
TRIM_INTERVAL_SECONDS = 60.0
TRIM_AFTER_NEW_METERS = 1_000
LAST_SEEN_SAVE_SECONDS = 60.0  # a restarted proxy reports a silent meter offline at most this late
GUARD_WARNING_INTERVAL = 3600.0  # a meter's dropped energy glitches are logged at most this often
DEVICE_LIST_MIN_INTERVAL = 1.0  # the device list is republished for a change at most this often
# What each connection loses when the broker speaks only MQTT 3.1.1 (logged once).
CENTRAL_MQTT311_LOSES = ("cannot report refused publishes (an MQTT 3.1.1 PUBACK carries no reason): a reading its "
                         "ACL refuses counts as forwarded; nor does it announce its limits: a message larger than "
                         "its maximum packet size makes it close the connection")
INTERNAL_MQTT311_LOSES = ("cannot take a receive window (MQTT 5's Receive Maximum): the broker's own in-flight "
                          "limit paces the readings (Mosquitto: max_inflight_messages); the session is kept as "
                          "before (clean_session false)")


def _heap_trimmer() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, where there is one.

    The freed memory of a burst (thousands of new meters, each announced to
    Home Assistant) otherwise stays with the process: the resident size would
    keep the burst's peak for good. ctypes releases the GIL during the call.
    """
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _heap_trimmer()


def resident_mb() -> float | None:
    """The process's resident size in MB (VmRSS), where ``/proc`` tells it."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except (OSError, ValueError, IndexError):
        pass
    return None


def state_directory(config_path: Path, environ: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY`` (set by systemd's StateDirectory=), else ``state/`` beside the config."""
    from_systemd = environ.get("STATE_DIRECTORY")
    if from_systemd:
        return Path(from_systemd.split(":")[0])
    return config_path.resolve().parent / "state"


def silence_limits(meters: MeterSettings) -> tuple[Callable[[str], float], float]:
    """Each meter's silence limit, and the shortest of them (for ``MeterAvailability``)."""
    shortest = min(silence_limit(meters.seconds_interval(meter_id), meters.minutes_interval(meter_id))
                   for meter_id in ("", *meters.devices))  # "" stands for every meter without overrides
    return (lambda meter_id: silence_limit(meters.seconds_interval(meter_id), meters.minutes_interval(meter_id)),
            shortest)


def max_power_by_meter(meters: MeterSettings) -> dict[str, float]:
    """The energy guard's per-meter power limits, for the meters that override the default."""
    return {meter_id: device.max_power_kw for meter_id, device in meters.devices.items()
            if device.max_power_kw is not None}


def export_by_meter(meters: MeterSettings) -> dict[str, bool]:
    """The meters whose ``export_energy`` overrides the default (``meters.export_energy``)."""
    return {meter_id: device.export_energy for meter_id, device in meters.devices.items()
            if device.export_energy is not None}


def stats_payload(counters: Mapping[str, int], drops: Mapping[str, int], queue_depth: int, meters: int,
                  uptime_seconds: float, online: int = 0) -> dict[str, object]:
    """The retained ``<main>/bridge/stats`` document; ``online`` of the ``meters`` known report now."""
    return {
        "received": counters.get("received", 0),
        "forwarded": counters.get("forwarded", 0),
        "dropped": dict(sorted(drops.items())),
        "queue_depth": queue_depth,
        "meters": meters,
        "online": online,
        "uptime_seconds": round(uptime_seconds),
    }


class Outgoing(NamedTuple):
    """One message for the central broker, and what to do once it is delivered."""

    topic: str
    payload: bytes
    retain: bool
    source_mid: int = 0  # the internal broker's message id, acknowledged once delivered (0: none)
    reading: bool = False  # a clean reading (counted as forwarded when delivered)
    energy: tuple[str, float, str] | None = None  # (meter id, kWh, meter time) for the energy journal, once delivered


# A queued message, packed: the lengths of its topic, payload and meter id, its source mid, flags, kWh.
_PACKED = struct.Struct("<HIHBBd")
_RETAIN, _READING, _ENERGY = 1, 2, 4


def pack_outgoing(item: Outgoing) -> bytes:
    """An outgoing message as one bytes object, the way it waits in the queue (``unpack_outgoing`` undoes it).

    Why: a burst of new meters queues four messages each (two Home Assistant
    configs, its availability, its reading) until the central broker takes
    them. As the objects they were made of (a tuple, a topic string, the
    payload, the energy's tuple, id, float and time) they were 14 small
    objects per meter, about 1.1 KB; a burst of 10,000 spread them over
    arenas of Python's allocator, which the few objects that outlive the
    burst then kept from being given back. One bytes object per message
    leaves far fewer behind (``make bench``, 100,000 meters in service: 63.5
    MB before, 55.6 after). Packing costs about a microsecond, unpacking a
    little more; a message handed over at once is never packed.
    """
    topic, payload = item.topic.encode(), item.payload
    flags = (_RETAIN if item.retain else 0) | (_READING if item.reading else 0)
    if item.energy is None:
        return b"".join((_PACKED.pack(len(topic), len(payload), item.source_mid, flags, 0, 0.0), topic, payload))
    meter_id, energy, meter_time = item.energy
    return b"".join((_PACKED.pack(len(topic), len(payload), item.source_mid, flags | _ENERGY, len(meter_id), energy),
                     topic, payload, meter_id.encode(), meter_time.encode()))


def unpack_outgoing(packed: bytes) -> Outgoing:
    """The message ``pack_outgoing`` packed."""
    topic_length, payload_length, source_mid, flags, id_length, energy = _PACKED.unpack_from(packed)
    payload_start = _PACKED.size + topic_length
    payload_end = payload_start + payload_length
    return Outgoing(packed[_PACKED.size:payload_start].decode(), packed[payload_start:payload_end],
                    bool(flags & _RETAIN), source_mid, bool(flags & _READING),
                    (packed[payload_end:payload_end + id_length].decode(), energy,
                     packed[payload_end + id_length:].decode()) if flags & _ENERGY else None)


class Proxy:
    """The data flow: one instance per process. ``start()``, then ``stop()``."""

    def __init__(self, config: Config, state_dir: Path, notifier: SystemdNotifier | None = None, *,
                 config_path: Path | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.config = config
        # Reloading: the file is watched (symlinks followed) and SIGHUP asks for a reload; the main
        # thread's tick does it, so no reload ever races another one.
        self.config_path = config_path
        self.environ = environ if environ is not None else {}
        self._watcher = (ConfigWatcher(config_path, self._reload_requested_by_file, log=log)
                         if config_path is not None else None)
        self._reload_requested = threading.Event()
        self._reload_forced = False
        self.notifier = notifier if notifier is not None else SystemdNotifier({})
        self._ready_sent = False
        self.main_topic = config.central_broker_topics.external_main_topic
        topics = config.internal_broker_topics
        self.kinds = {topics.meter_seconds_data: SECONDS, topics.meter_minutes_data: MINUTES}
        self.counters = Counters()
        self.rejections = RateLimitedLog(log)
        # Its own budget: a refusing central broker must not silence the rejections, nor the reverse.
        self.refusals = RateLimitedLog(log, what="refused publishes")
        self.oversized = RateLimitedLog(log, what="messages too large for the central broker")
        # Every table of the fleet (filters, energy journal, availability, discovery) keeps the same
        # meters: their ids and hash index are kept once (see meter_table), not once per table.
        meter_ids = MeterIds()
        self.memory = MeterMemory(ids=meter_ids)
        self.processor = MeterDataProcessor(
            excluded=config.meters.exclude, memory=self.memory, per_phase=per_phase_by_meter(config.meters),
            max_power_kw=config.meters.max_power_kw, max_power_by_meter=max_power_by_meter(config.meters),
            export_energy=config.meters.export_energy, export_by_meter=export_by_meter(config.meters))
        self._guard_warned: dict[str, float] = {}  # meter id → when its last energy warning was logged
        self.availability = MeterAvailability(*silence_limits(config.meters), ids=meter_ids)
        self.journal = EnergyJournal(state_dir, ids=meter_ids)
        self.last_seen = LastSeenFile(state_dir)
        self.discovery = DiscoveryAnnouncer.from_config(config, self.queue_publish, meter_ids)  # Home Assistant
        self._closing = False  # disconnections from now on are deliberate
        self.started_at = time.monotonic()
        self.heartbeat = time.monotonic()
        self._internal_subscribed = False
        self._central_connected = False
        self._bridge_online: bool | None = None
        self._state_lock = threading.Lock()
        self.bridge_topic = bridge_state_topic(self.main_topic)
        self.internal = make_client(config.internal_broker, INTERNAL_CLIENT_ID)
        # A reading is acknowledged to the internal broker only once the central
        # broker has it (or it was dropped on purpose): killed at any moment, the
        # proxy gets every reading it had not delivered again at its next start.
        self.internal.manual_ack_set(True)
        self.central = make_client(
            config.central_broker,
            f"kpm33b-proxy-{socket.gethostname()}",
            will_topic=self.bridge_topic,
            will_payload=OFFLINE,
        )
        self.outgoing: Forwarder[Outgoing] = Forwarder(
            self.central, self._settled, capacity=config.central_broker.max_queued_messages,
            dropped=self._queue_full, skip=self._too_large, name="central-publisher",
            pack=pack_outgoing, unpack=unpack_outgoing)
        self.internal_reporter = ConnectionReporter(self.internal, "internal", config.internal_broker, log,
                                                    mqtt311_loses=INTERNAL_MQTT311_LOSES)
        self.central_reporter = ConnectionReporter(self.central, "central", config.central_broker, log,
                                                   mqtt311_loses=CENTRAL_MQTT311_LOSES)
        self.stats_topic = bridge_stats_topic(self.main_topic)
        self.devices_topic = bridge_devices_topic(self.main_topic)
        # Set from any thread when a meter appears, goes or changes; the main thread's tick publishes.
        self._devices_changed = True
        self._next_device_list = 0.0
        self._device_list_too_large = False
        self.availability_subscription = meter_subscription(self.main_topic, AVAILABILITY)
        self._next_stats = self.started_at + config.health.stats_interval_seconds
        self._next_trim = self.started_at + TRIM_INTERVAL_SECONDS
        self._next_last_seen_save = self.started_at + LAST_SEEN_SAVE_SECONDS
        self._meters_at_trim = 0
        self._meters_at_last_tick = 0
        self.internal.on_connect = self._on_internal_connect
        self.internal.on_disconnect = self._on_internal_disconnect
        self.internal.on_subscribe = self._on_internal_subscribe
        self.internal.on_message = self._on_internal_message
        # The filters of each central subscription awaiting its SUBACK, by message id: the SUBACK's
        # reason codes come in the order of the filters, but name none of them.
        self._subscribing: dict[int, tuple[str, ...]] = {}
        self._subscribing_lock = threading.Lock()
        self.central.on_connect = self._on_central_connect
        self.central.on_disconnect = self._on_central_disconnect
        self.central.on_subscribe = self._on_central_subscribe
        self.central.on_publish = self._on_central_publish
        self.central.on_message = self._on_central_message

    # --- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Lock and load the state, then connect to both brokers in the background.

        Raises ``daemon.Refused`` before connecting to anything when the state
        directory is held by another proxy or cannot be used (exit code 3: the
        internal broker keeps the readings until the proxy can start).
        """
        try:
            floors = self.journal.open()
        except StateLocked as error:
            raise daemon.Refused(f"{error}; refusing to start a second proxy", EXIT_STATE_LOCKED) from None
        except StateUnusable as error:
            raise daemon.Refused(f"{error}; not starting (the internal broker keeps the readings until the proxy "
                                 "can start)", EXIT_STATE_UNUSABLE) from None
        for meter_id, floor in floors.items():
            self.memory.restore_energy(meter_id, floor.energy, floor.meter_time)
        damaged = self.journal.damaged_lines  # each also counted in the journal's own WARNING
        log.info("loaded the last energy of %d meters from %s%s", len(self.memory.energy_snapshot()),
                 self.journal.path, f" ({damaged} damaged lines skipped)" if damaged else "")
        self.discovery.announce_known(self.memory.energy_snapshot())
        self._restore_availability()
        self.outgoing.start()
        if self._watcher is not None:
            self._watcher.start()
        self.notifier.start_watchdog(self.is_healthy)
        connect_in_background(self.central, self.config.central_broker)
        connect_in_background(self.internal, self.config.internal_broker, clean_start=False,
                              session_expiry=SESSION_EXPIRY_SECONDS, receive_maximum=RECEIVE_MAXIMUM)

    def _restore_availability(self) -> None:
        """The meters known before this start: each goes offline once silent for its limit.

        Counted from its last reading where the state directory tells it,
        else from this start (meters of the energy journal, and later those
        the central broker's retained availability names).
        """
        excluded = self.config.meters.exclude
        wall_offset = time.time() - time.monotonic()
        last_seen = self.last_seen.load()
        for meter_id, (when, online) in last_seen.items():  # oldest first
            if meter_id not in excluded:
                self.availability.restore(meter_id, min(when - wall_offset, self.started_at), online)
        for meter_id in self.memory.energy_snapshot():
            if meter_id not in excluded and meter_id not in last_seen:
                self.availability.restore(meter_id, self.started_at, online=True)
        if last_seen:
            log.info("restored when %d meters were last heard from (%s)", len(last_seen), self.last_seen.path)

    def _save_last_seen(self, now: float) -> None:
        """Persist when each meter was last heard from (wall clock), for the next start."""
        self._next_last_seen_save = now + LAST_SEEN_SAVE_SECONDS
        wall_offset = time.time() - time.monotonic()
        self.last_seen.save((meter_id, seen + wall_offset, online)
                            for meter_id, seen, online in self.availability.entries())

    def run(self, stop: threading.Event) -> int:
        """The main thread's timers, until ``stop`` is set; the exit code (0)."""
        while not stop.wait(TICK_SECONDS):
            self.tick(time.monotonic())
        return 0

    def request_reload(self) -> None:
        """SIGHUP: re-read the configuration at the next tick, changed or not (only hands the work over)."""
        self._reload_forced = True
        self._reload_requested.set()

    def _reload_requested_by_file(self) -> None:
        self._reload_requested.set()

    def _reload(self) -> None:
        """Read the configuration file again and apply it; an invalid file keeps the last good configuration."""
        forced, self._reload_forced = self._reload_forced, False
        self._reload_requested.clear()
        if self.config_path is None:
            return
        log.info("%s: reading %s again", "SIGHUP received" if forced else "configuration file changed",
                 self.config_path)
        try:
            new = config_loader.load_config(self.config_path, self.environ)
        except config_loader.ConfigError as error:
            for problem in error.problems:
                log.error("invalid configuration %s: %s", self.config_path, problem)
            log.error("keeping the last good configuration")
            return
        self.apply_config(new)

    def tick(self, now: float) -> None:
        """Periodic work: readiness, reloads, meters gone silent, journal, heartbeat."""
        self.heartbeat = now
        self._trim_heap(now)
        if self._reload_requested.is_set():
            self._reload()
        if not self._ready_sent and self._bridge_online:
            self._ready_sent = True  # systemd: started means forwarding
            self.notifier.ready("forwarding")
        for meter_id in self.availability.went_offline(now):
            last_seen = self.availability.last_seen(meter_id)
            log.warning("meter %s is offline: silent for %.0f s (its limit is %.0f s)", meter_id,
                        now - (last_seen if last_seen is not None else self.started_at),
                        silence_limit(self.config.meters.seconds_interval(meter_id),
                                      self.config.meters.minutes_interval(meter_id)))
            self._publish_availability(meter_id, OFFLINE)
            self._devices_changed = True
        with self._state_lock:
            self.journal.flush()
            if self.journal.needs_compaction():
                self.journal.compact()  # what the central broker acknowledged, not the filters' memory
        if self._central_connected:  # spread (re-)announcements; none piled up while away
            self.discovery.tick(now)
        self.outgoing.expire()  # PUBACKs that are not coming free their place in the window
        if now >= self._next_last_seen_save:
            self._save_last_seen(now)
        if now >= self._next_stats:
            self._next_stats = now + self.config.health.stats_interval_seconds
            self.publish_stats(now)
            self.publish_device_list(now)  # last_seen refreshed with the stats
        elif self._devices_changed and now >= self._next_device_list:
            self.publish_device_list(now)

    def _trim_heap(self, now: float) -> None:
        """Give freed memory back once a burst of new meters has been forwarded, and every minute.

        Called first in a tick: what the tick queues itself (Home Assistant's
        diagnostic configs, 100 meters a tick for long after a burst) must not
        count as a burst still going on. A burst is over when no new meter
        arrived since the last tick and every reading has been forwarded.
        """
        meters = len(self.availability)
        arriving = meters != self._meters_at_last_tick
        self._meters_at_last_tick = meters
        burst_over = (meters - self._meters_at_trim >= TRIM_AFTER_NEW_METERS
                      and not arriving and not self.outgoing.pending())
        if MALLOC_TRIM is None or not (burst_over or now >= self._next_trim):
            return
        self._next_trim = now + TRIM_INTERVAL_SECONDS
        new_meters = meters - self._meters_at_trim
        self._meters_at_trim = meters
        before = resident_mb()
        MALLOC_TRIM(0)
        after = resident_mb()
        if before is not None and after is not None:
            log.debug("gave freed memory back to the system (%s): %d meters, %d new since the last time; "
                      "resident %.1f MB, before %.1f MB", "a burst of new meters forwarded" if burst_over
                      else "every minute", meters, new_meters, after, before)

    def apply_config(self, new: Config) -> None:
        """Take a reloaded configuration into use without a restart and without losing a reading.

        Names, exclusions, per-phase groups, exported energy, power limits, intervals (silence
        limits), the Home Assistant settings, the log level and the stats
        interval apply at once; broker connections and topic names only at
        the next start (a WARNING says so). Called from the main thread; the
        network threads see each setting swapped whole.
        """
        old = self.config
        later = config_loader.restart_only_changes(old, new)
        if later:
            log.warning("%s changed in the configuration: takes effect when the proxy is next started",
                        ", ".join(later))
        config = config_loader.keep_connection_settings(old, new)
        if config == old:
            log.info("configuration reloaded: nothing changed that applies while running")
            return
        self.config = config
        meters = config.meters
        newly_excluded = sorted(meters.exclude - old.meters.exclude)
        processor = self.processor
        processor.per_phase = per_phase_by_meter(meters)
        processor.max_power_kw = meters.max_power_kw
        processor.max_power_by_meter = max_power_by_meter(meters)
        processor.export_by_meter = export_by_meter(meters)
        processor.export_energy = meters.export_energy
        processor.excluded = meters.exclude
        self.availability.set_limits(*silence_limits(meters))
        for meter_id in newly_excluded:
            self.availability.forget(meter_id)
        self._devices_changed = True  # names, intervals, exclusions
        if config.logging.level != old.logging.level:
            logging.getLogger().setLevel(config.logging.level)
        if config.health.stats_interval_seconds != old.health.stats_interval_seconds:
            self._next_stats = min(self._next_stats, time.monotonic() + config.health.stats_interval_seconds)
        settings = config.homeassistant
        old_subscriptions = set(self.discovery.subscriptions)
        self.discovery.reconfigure(meters, settings.discovery_prefix, enabled=settings.discovery,
                                   origin_url=settings.origin_url)
        if not settings.discovery:
            for meter_id in newly_excluded:  # nothing to remove first in Home Assistant
                for topic in retained_meter_topics(self.main_topic, meter_id):
                    self.queue_publish(topic, b"", retain=True)
        if self._central_connected:
            stale = old_subscriptions - set(self.discovery.subscriptions)
            if stale:
                self.central.unsubscribe(sorted(stale))
            # Subscribing again makes the broker send the retained configs again: the announcer
            # removes those no longer wanted (a meter excluded, a group removed), configs first.
            if self.discovery.subscriptions:
                self._subscribe_central(self.discovery.subscriptions)
        log.info("configuration reloaded: %s%s", config_loader.describe(config),
                 f"; excluded now: {', '.join(newly_excluded)}" if newly_excluded else "")

    def stats(self, now: float) -> dict[str, object]:
        """The counters as published on ``<main>/bridge/stats``."""
        # dict() of a Counter is one atomic copy under the GIL: the paho thread may be counting.
        drops = dict(self.processor.drops)
        for reason in ("queue_full", "refused_by_central", "too_large"):
            count = self.counters.get(f"dropped.{reason}")
            if count:
                drops[reason] = count
        return stats_payload(self.counters.snapshot(), drops, self.outgoing.depth(), len(self.availability),
                             now - self.started_at, online=self.availability.online_count())

    def publish_device_list(self, now: float) -> None:
        """Publish ``<main>/bridge/devices`` (retained), unless there are more meters than it may hold.

        Above ``health.device_list_max_meters`` the list would cost the
        central broker and every subscriber too much (about 200 bytes per
        meter): one WARNING, the stale list cleared, and consumers use the
        per-meter topics instead.
        """
        if not self._central_connected:
            return  # published when connected: a list queued during an outage is stale by then
        self._devices_changed = False
        self._next_device_list = now + DEVICE_LIST_MIN_INTERVAL
        limit = self.config.health.device_list_max_meters
        if len(self.availability) > limit:
            if not self._device_list_too_large:
                self._device_list_too_large = True
                log.warning("%d meters, more than health.device_list_max_meters (%d): %s is not published "
                            "(consumers discover meters from their own topics)", len(self.availability), limit,
                            self.devices_topic)
                self.queue_publish(self.devices_topic, b"", retain=True)
            return
        if self._device_list_too_large:
            self._device_list_too_large = False
            log.info("%d meters, within health.device_list_max_meters (%d): publishing %s again",
                     len(self.availability), limit, self.devices_topic)
        wall_offset = time.time() - time.monotonic()
        known = [(meter_id, seen + wall_offset, online) for meter_id, seen, online in self.availability.snapshot()]
        self.queue_publish(self.devices_topic, encode_device_list(device_list(known, self.config.meters)),
                           retain=True)

    def publish_stats(self, now: float) -> None:
        """Publish the stats (retained) and log them on one line."""
        stats = self.stats(now)
        self.queue_publish(self.stats_topic, json.dumps(stats), retain=True)
        log.info("stats: %s", json.dumps(stats))
        self.notifier.status(f"{stats['forwarded']} readings forwarded, {stats['meters']} meters, "
                             f"{stats['queue_depth']} queued")

    @property
    def forwarding(self) -> bool:
        """Whether ``<main>/bridge/state`` is ``online``: subscribed on the internal broker, connected centrally."""
        return bool(self._bridge_online)

    def is_healthy(self) -> bool:
        """For the systemd watchdog: both network loops and the timers are alive."""
        return (
            network_thread_alive(self.internal)
            and network_thread_alive(self.central)
            and self.outgoing.alive()
            and time.monotonic() - self.heartbeat < 10 * TICK_SECONDS + 5
        )

    def stop(self) -> None:
        """Deliver what is in hand, stop reading, publish the stats and ``offline``, disconnect.

        Readings still queued once the internal connection is closed were never
        acknowledged: the internal broker keeps them in our session and hands
        them over again at the next start, so they are not published now (that
        would deliver them twice).
        """
        self._closing = True
        self.notifier.stopping()
        if self._watcher is not None:
            self._watcher.stop()
        self.outgoing.drain(SHUTDOWN_DRAIN_SECONDS)
        self.internal.disconnect()
        self.internal.loop_stop()
        self._internal_subscribed = False
        left_for_next_start = self.outgoing.discard(lambda item: bool(item.source_mid))
        self._update_bridge_state()  # offline
        self.publish_stats(time.monotonic())
        self.outgoing.drain(SHUTDOWN_DRAIN_SECONDS / 2)
        self.outgoing.stop()
        self.central.disconnect()
        self.central.loop_stop()
        self._save_last_seen(time.monotonic())
        with self._state_lock:
            self.journal.close()
        self.notifier.close()
        self.rejections.flush()
        self.refusals.flush()
        self.oversized.flush()
        lost = self.outgoing.pending()
        log.info("stopped%s%s",
                 f"; {left_for_next_start} readings left with the internal broker for the next start"
                 if left_for_next_start else "",
                 f"; {lost} messages could not be delivered" if lost else "")

    # --- internal broker (meters) ------------------------------------------------

    def _on_internal_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                             properties: Any) -> None:
        if not self.internal_reporter.connected(reason_code, properties):
            return
        log.info("connected to the internal broker %s:%d", self.config.internal_broker.host,
                 self.config.internal_broker.port)
        # Subscribing on every connect makes a reconnect invisible, session or not.
        client.subscribe([(topic, 1) for topic in self.kinds])

    def _on_internal_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reason_codes: Any,
                               _properties: Any) -> None:
        failed = [reason_text(code) for code in reason_codes if code.is_failure]
        if failed:
            log.error("the internal broker refused the subscription to %s: %s", ", ".join(self.kinds),
                      ", ".join(failed))
            return
        log.info("subscribed to %s", ", ".join(self.kinds))
        self._internal_subscribed = True
        self._update_bridge_state()

    def _on_internal_disconnect(self, _client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any,
                                _properties: Any) -> None:
        self._internal_subscribed = False
        self.internal_reporter.disconnected(reason_code, deliberate=self._closing, flags=flags)
        self._update_bridge_state()

    def _on_internal_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.handle_raw(message.topic, message.payload, message.mid if message.qos else 0, bool(message.dup))

    def handle_raw(self, topic: str, payload: bytes, mid: int = 0, redelivered: bool = False) -> None:
        """One raw message from the internal broker: map it, then queue what it gives; never blocks.

        The per-message path, with or without brokers (the tests and
        ``bench/profile_proxy.py`` call it directly). ``mid`` is the message's
        id on the internal broker, acknowledged once it is handled (0: QoS 0,
        nothing to acknowledge); ``redelivered`` is MQTT's DUP flag.
        """
        kind = self.kinds.get(topic)
        if kind is None:
            self._release(mid)
            return
        now = time.monotonic()
        self.counters.add("received")
        outcome = self.processor.process(kind, payload, now, redelivered=redelivered, token=mid)
        if outcome.meter_id is not None and outcome.reason != DROP_EXCLUDED \
                and self.availability.seen(outcome.meter_id, now):
            log.info("meter %s is online", outcome.meter_id)
            self._publish_availability(outcome.meter_id, ONLINE)
            self._devices_changed = True
        for event in outcome.events:
            self._log_guard_event(event, now)
        for settled in outcome.settled:  # readings the energy guard held back, now decided: oldest first
            if settled.message is not None:
                self._enqueue_reading(settled.message, settled.token)  # type: ignore[arg-type]
            else:
                self._release(settled.token)  # type: ignore[arg-type]
        if outcome.held:
            return  # acknowledged once the meter's next readings decide it
        if outcome.message is None:
            self._release(mid)  # nothing to deliver: done with it
            if outcome.reason in REJECTIONS:
                self.rejections.warning(outcome.reason, "rejected a message on %s: %s", topic, outcome.detail)
            elif outcome.reason == DROP_ENERGY_DECREASE:
                self._warn_guard(outcome.meter_id, now, "dropped an energy reading of meter %s older than, "
                                 "and lower than, the last one forwarded (%s kWh)", outcome.meter_id,
                                 self.memory.last_energy(outcome.meter_id or ""))
            elif outcome.reason is not None:
                log.debug("dropped a %s reading of meter %s: %s", kind, outcome.meter_id, outcome.reason)
            return
        self._enqueue_reading(outcome.message, mid)

    def _release(self, mid: int) -> None:
        """Acknowledge a raw message to the internal broker: it is handled (0: nothing to acknowledge)."""
        if mid:
            self.internal.ack(mid, 1)

    def _enqueue_reading(self, clean: CleanMessage, source_mid: int) -> None:
        """Queue a clean reading; its raw one (``source_mid``) is acknowledged once it is delivered."""
        self.discovery.meter_seen(clean.meter_id)  # its configs go before its first reading
        energy = clean.payload.get("active_energy")
        self._enqueue(Outgoing(
            reading_topic(self.main_topic, clean.meter_id, clean.kind), encode_payload(clean.payload), True,
            source_mid=source_mid, reading=True,
            energy=(clean.meter_id, energy, clean.time) if isinstance(energy, int | float) else None,
        ))

    def _log_guard_event(self, event: GuardEvent, now: float) -> None:
        """A counter reset accepted (always a WARNING), or a glitch dropped (a WARNING at most hourly per meter)."""
        if event.kind == EVENT_RESET:
            log.warning("meter %s: energy counter reset accepted, from %s kWh to %s kWh (%d readings rose "
                        "steadily from the new count)", event.meter_id, event.old, event.new, RESET_READINGS)
        else:
            self._warn_guard(event.meter_id, now, "meter %s: dropped an energy reading of %s kWh after %s kWh: "
                             "a rise faster than %s kW that the next reading did not confirm", event.meter_id,
                             event.new, event.old, self.config.meters.max_power(event.meter_id))

    def _warn_guard(self, meter_id: str | None, now: float, message: str, *args: object) -> None:
        """A WARNING about a meter's energy readings, at most once an hour per meter (the stats count them all)."""
        if meter_id is None or now < self._guard_warned.get(meter_id, -GUARD_WARNING_INTERVAL) \
                + GUARD_WARNING_INTERVAL:
            return
        if len(self._guard_warned) >= 10_000:  # bounded: forget the warnings older than the interval
            self._guard_warned = {m: t for m, t in self._guard_warned.items() if now - t < GUARD_WARNING_INTERVAL}
        self._guard_warned[meter_id] = now
        log.warning(message + " (logged at most hourly per meter)", *args)

    # --- central broker (consumers) ----------------------------------------------

    def queue_publish(self, topic: str, payload: bytes | str, retain: bool) -> None:
        """Queue a message of the proxy's own for the central broker (any thread)."""
        self._enqueue(Outgoing(topic, payload.encode() if isinstance(payload, str) else payload, retain))

    def _enqueue(self, item: Outgoing) -> None:
        self.outgoing.put(item)

    def _queue_full(self, dropped: Outgoing) -> None:
        """The outgoing queue was full: its oldest message made room for a new one."""
        self.counters.add("dropped.queue_full")
        self._release(dropped.source_mid)  # given up on: the broker may forget it
        self.rejections.warning("queue_full", "outgoing queue full (%d messages): dropped the oldest",
                                self.outgoing.capacity)

    def _publish_availability(self, meter_id: str, state: str) -> None:
        self.queue_publish(availability_topic(self.main_topic, meter_id), state, retain=True)

    def _too_large(self, item: Outgoing) -> bool:
        """Whether a message is larger than the central broker takes; then it is not sent.

        Such a message is never handed to paho: the broker would close the
        connection for it, and the proxy would send it again at once on the
        next. It is counted, logged (rate-limited), and its raw reading
        released; the window moves on.
        """
        limit = self.central_reporter.limits.maximum_packet_size
        if limit is None:
            return False
        size = publish_packet_size(item.topic, len(item.payload), 1, mqtt5=True)
        if size <= limit:
            return False
        self.counters.add("dropped.too_large")
        self.oversized.warning("too_large", "not sent: %s is %d bytes, more than the %d bytes the central broker "
                               "accepts (its maximum packet size)%s", item.topic, size, limit,
                               "; reading dropped" if item.reading else "")
        self._release(item.source_mid)
        return True

    def _on_central_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason_code: Any,
                            _properties: Any) -> None:
        self.outgoing.answered(mid, reason_code)

    def _settled(self, item: Outgoing, refused: str | None) -> None:
        """The central broker answered a publish: it took the message, or it refused it (or never answered)."""
        if refused is None:
            self._delivered(item)
        elif refused == EXPIRED:
            # Perhaps delivered, perhaps not: a reading stays with the internal broker, which
            # hands it over again at the next connection (at least once, as across a restart).
            self.refusals.warning(EXPIRED, "the central broker never acknowledged %s", item.topic)
        else:
            self._refused(item, refused)

    def _delivered(self, item: Outgoing) -> None:
        """The central broker has the message: count it, journal it, release the raw one."""
        if item.reading:
            self.counters.add("forwarded")
        if item.energy is not None:
            # Written out before the raw reading is released: a proxy killed right after the
            # acknowledgement must not restart with an older floor (a glitch could then pass).
            with self._state_lock:
                self.journal.record(*item.energy)
                self.journal.flush()
        self._release(item.source_mid)

    def _refused(self, item: Outgoing, reason: str) -> None:
        """The central broker refused the message (e.g. its ACL): nobody got it.

        A refused reading is counted as dropped and never journalled: the next
        start must not trust a counter no consumer has seen. Its raw reading is
        still acknowledged to the internal broker: it was handled, and sending
        it again would only be refused again.
        """
        if item.reading:
            self.counters.add("dropped.refused_by_central")
        self.refusals.error(reason, "the central broker refused %s (%s)%s", item.topic, reason,
                            "; reading dropped" if item.reading else "")
        self._release(item.source_mid)

    def _on_central_connect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                            properties: Any) -> None:
        if not self.central_reporter.connected(reason_code, properties):
            return
        log.info("connected to the central broker %s:%d", self.config.central_broker.host,
                 self.config.central_broker.port)
        self._central_connected = True
        self.outgoing.set_connected(True)
        self._bridge_online = None  # a new connection: publish the state whatever was retained
        self._devices_changed = True
        self._update_bridge_state()
        for meter_id in self.availability.online():
            self._publish_availability(meter_id, ONLINE)
        # The meters' retained availability (meters known before a restart that stay silent must still
        # go offline), then Home Assistant's status and the configs retained.
        self._subscribe_central((self.availability_subscription, *self.discovery.subscriptions))

    def _subscribe_central(self, filters: tuple[str, ...]) -> None:
        """Subscribe at QoS 1, remembering the filters for ``_on_central_subscribe``.

        Called from the central network thread (on connect) and the main
        thread (on reload); the lock keeps the SUBACK from being read before
        its message id is stored.
        """
        with self._subscribing_lock:
            result, mid = self.central.subscribe([(topic, 1) for topic in filters])
            if result == mqtt.MQTT_ERR_SUCCESS:
                self._subscribing[mid] = filters

    def _on_central_subscribe(self, _client: mqtt.Client, _userdata: Any, mid: int, reason_codes: Any,
                              _properties: Any) -> None:
        """Say which filters the central broker refused (an ACL, usually) and what the proxy goes without."""
        with self._subscribing_lock:
            filters = self._subscribing.pop(mid, ())
        granted = []
        for topic, code in zip(filters, reason_codes, strict=False):
            if code.is_failure:
                log.error("the central broker refused the subscription to %s (%s): %s", topic, reason_text(code),
                          self._without_subscription(topic))
            else:
                granted.append(topic)
        if granted:
            log.info("subscribed on the central broker to %s", ", ".join(granted))

    def _without_subscription(self, topic: str) -> str:
        """What the proxy cannot do without its subscription to ``topic``."""
        if topic == self.availability_subscription:
            return ("the meters' retained availability is not read back: a meter the broker holds as online that "
                    "the proxy's state does not know (a state directory lost) is never marked offline if it stays "
                    "silent")
        if topic == self.discovery.status_topic:
            return "Home Assistant's restarts go unnoticed: the discovery configs are not sent again when it is back"
        return ("the retained discovery configs are not read back: those no longer wanted (meters excluded, "
                "per-phase groups or bridge entities removed) stay in Home Assistant")

    def _on_central_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        """Retained availability, Home Assistant's status and the retained discovery configs: quick work only."""
        topic = parse_meter_topic(self.main_topic, message.topic)
        if topic is None or topic.leaf != AVAILABILITY:
            self.discovery.on_central_message(message.topic, message.payload, bool(message.retain))
            return
        state = parse_state(message.payload)
        # Live messages are our own publications coming back: only the broker's retained store tells
        # of meters from before this start.
        if message.retain and state is not None and topic.meter_id not in self.config.meters.exclude:
            self.availability.restore(topic.meter_id, self.started_at, online=state == ONLINE)
            self._devices_changed = True

    def _on_central_disconnect(self, _client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any,
                               _properties: Any) -> None:
        self._central_connected = False
        self.outgoing.set_connected(False)
        with self._subscribing_lock:
            self._subscribing.clear()  # no SUBACK comes for those any more
        self.central_reporter.disconnected(reason_code, deliberate=self._closing, flags=flags)
        if self.outgoing.depth() and not self._closing:
            log.warning("%d messages queued until the central broker is back", self.outgoing.depth())

    def _update_bridge_state(self) -> None:
        """``online`` means forwarding: subscribed on the internal side, connected centrally."""
        online = self._internal_subscribed and self._central_connected
        with self._state_lock:
            if online == self._bridge_online or not self._central_connected:
                return
            self._bridge_online = online
        self.queue_publish(self.bridge_topic, ONLINE if online else OFFLINE, retain=True)
        log.info("bridge state %s", ONLINE if online else OFFLINE)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT; the exit code (see ``daemon.main``)."""
    environ = os.environ if environ is None else environ

    def build(config: Config, command_line: daemon.CommandLine) -> Proxy:
        return Proxy(config, state_directory(command_line.config_path, environ), SystemdNotifier(environ),
                     config_path=command_line.config_path, environ=environ)

    return daemon.main("kpm33b_proxy", "Forward clean KPM33B meter readings from the internal broker to the "
                       "central broker.", Path(__file__).resolve().parent,
                       sys.argv[1:] if argv is None else argv, environ, build)


if __name__ == "__main__":
    sys.exit(main())
