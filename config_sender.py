"""Daemon: discovers meters on the central broker, pushes upload intervals and clock, times the replies.

    python config_sender.py [--config PATH] [--check-config]

The decisions (which command, which value, is this reply an ack, a failure,
late, garbage; when to retry; does this clock need setting) are made by the
pure ``command_tracking.CommandTracker``. This module is the imperative shell
around it:

- two MQTT clients: the central one discovers meters (the proxy's retained
  device list ``<main>/bridge/devices`` first, then ``<main>/+/availability``,
  ``…/seconds``, ``…/minutes``: the per-meter topics are the fall-back when
  the list is not published, and bring the live readings), the internal one
  publishes commands and receives the meters' replies;
- paho's callbacks never wait: they put an event on a queue and return. One
  worker thread owns the tracker, takes events off the queue, sleeps until the
  next reply deadline (one heap, not one timer per command) and publishes;
- a ``config_watch.ConfigWatcher`` on the configuration file (symlinks
  followed) and SIGHUP tell the worker, which reloads and pushes the new
  values to the meters online now, or keeps the last good configuration;
- the worker publishes each meter's retained configuration status
  (``<main>/<id>/config_status``, ``config_status.StatusBook`` decides when)
  on the central broker, within a window of unacknowledged publishes.

See doc/configuration_flow.md for what each log line means.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt

import daemon
from command_tracking import (
    DEFAULT_RETRY_DELAYS,
    Acked,
    BackOnline,
    Cancelled,
    ClockDrift,
    Command,
    CommandTracker,
    Deferred,
    Discovered,
    Event,
    Failed,
    IgnoredReply,
    LateReply,
    NoReply,
    RejectedReply,
    Retrying,
    Superseded,
    WentOffline,
    clock_drift_seconds,
    meters_to_configure,
    parse_reading_time,
)
from config_loader import Config, ConfigError, describe, keep_connection_settings, load_config, restart_only_changes
from config_status import StatusBook
from config_watch import ConfigWatcher, file_signature
from daemon import (
    ALERT,
    RateLimitedLog,
    log_lines_dropped,
)
from fleet import parse_device_list
from mqtt_client import ConnectionReporter, connect_in_background, make_client, network_thread_alive, refused_filters
from outgoing import EXPIRED, PublishWindow
from sd_notify import SystemdNotifier
from topics import (
    AVAILABILITY,
    bridge_devices_topic,
    config_status_topic,
    meter_subscriptions,
    parse_meter_topic,
    parse_state,
    sender_stats_topic,
)

logger = logging.getLogger("config_sender")

# The worker wakes at least this often, so the systemd watchdog can tell it lives.
HEARTBEAT_SECONDS = 1.0
# A worker that has not looped for this long is stuck: the watchdog lets systemd restart us.
HEALTHY_HEARTBEAT_AGE = 15.0
# Wake a hair after a deadline rather than a hair before it, so that an alert
# is never logged before the full timeout has passed by anyone's clock.
DEADLINE_MARGIN = 0.005
# On shutdown, how long to wait for the broker to acknowledge commands already handed over.
SHUTDOWN_GRACE_SECONDS = 2.0
# How often ``systemctl status`` gets a fresh one-line summary.
STATUS_INTERVAL_SECONDS = 30.0
# What each connection loses, or does instead, with a broker that cannot do all of MQTT 5 (logged once).
CENTRAL_MQTT311_LOSES = ("cannot report refused publishes of the stats and the configuration statuses (an MQTT "
                         "3.1.1 PUBACK carries no reason)")
INTERNAL_MQTT311_LOSES = ("cannot report refused commands (an MQTT 3.1.1 PUBACK carries no reason): a command its "
                          "ACL refuses counts as sent, and raises an alert when the meter does not reply")
CENTRAL_WITHOUT_RETAIN = ("the stats and the configuration statuses are published without retain, and a restarted "
                          "config sender rediscovers meters only from their live readings")
CENTRAL_QOS0_ONLY = ("the stats and the configuration statuses are published at QoS 0, and readings the broker does "
                     "not resend may be missed")
# Configuration statuses handed to the central client and not yet acknowledged, at most: the
# rest wait in the StatusBook (one per meter, the latest). The window's other places are the stats'.
STATUS_IN_FLIGHT = 500


# --- what the callbacks hand to the worker -------------------------------------------


@dataclass(frozen=True)
class _CentralSubscribed:
    refused: tuple[str, ...]  # "<filter> (<reason>)" for each filter the broker refused


@dataclass(frozen=True)
class _CentralMessage:
    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class _InternalSubscribed:
    refused: tuple[str, ...]


@dataclass(frozen=True)
class _Disconnected:
    broker: str  # "central" or "internal"


@dataclass(frozen=True)
class _MeterReply:
    topic: str
    payload: bytes
    received_at: float  # monotonic, taken in the callback: latency is not worker lag


@dataclass(frozen=True)
class _Published:
    mid: int
    reason_code: Any  # the broker's PUBACK reason (a refusal is 0x80 or more)


@dataclass(frozen=True)
class _StatusHanded:
    """A meter's configuration status (or its clearing) handed to the central client."""

    meter_id: str
    topic: str
    cleared: bool


@dataclass(frozen=True)
class _StatsHanded:
    """The stats handed to the central client."""

    topic: str


@dataclass(frozen=True)
class _StatusSettled:
    """The central broker took a status, refused it (its reason), or never answered (``EXPIRED``)."""

    status: _StatusHanded
    refused: str | None


@dataclass(frozen=True)
class _ConfigFileChanged:
    pass


@dataclass(frozen=True)
class _ReloadRequested:
    pass


@dataclass(frozen=True)
class _Stop:
    pass


_WorkItem = (_CentralSubscribed | _CentralMessage | _InternalSubscribed | _Disconnected | _MeterReply
             | _Published | _StatusSettled | _ConfigFileChanged | _ReloadRequested | _Stop)


class _Handed(NamedTuple):
    """A command handed to paho, until the broker's PUBACK (see outgoing.PublishWindow)."""

    command: Command
    topic: str


class ConfigSender:
    """The configuration-flow daemon, startable and stoppable in-process (tests) or from ``main``.

    ``config_path`` is watched for changes when given. ``retry_delays``,
    ``silence_scale`` (multiplies every meter's silence limit) and the client
    ids can be overridden so that tests run quickly and side by side.
    """

    def __init__(
        self,
        config: Config,
        config_path: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        notifier: SystemdNotifier | None = None,
        retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS,
        silence_scale: float = 1.0,
        client_id_prefix: str | None = None,
    ) -> None:
        self._config = config
        self._config_path = config_path
        self._environ: Mapping[str, str] = environ if environ is not None else {}
        self._notifier = notifier
        self._tracker = CommandTracker(config.meters, retry_delays=retry_delays, silence_scale=silence_scale)
        # Guards the tracker against readers on other threads; only the worker writes.
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[_WorkItem] = queue.SimpleQueue()
        prefix = client_id_prefix or f"kpm33b-config-sender-{socket.gethostname()}"
        self._central = make_client(config.central_broker, f"{prefix}-central")
        self._internal = make_client(config.internal_broker, f"{prefix}-internal")
        self._wire_callbacks()
        self._rejections = RateLimitedLog(logger)
        self._refusals = RateLimitedLog(logger, what="refused publishes")
        # Its own limit: a fleet's statuses refused at once must not hide a refused command or the stats.
        self._status_refusals = RateLimitedLog(logger, what="refused configuration statuses")
        # Commands handed to paho and not yet acknowledged by the broker; the rest wait in the
        # tracker's own queue (paho's is unbounded and its 16-bit message ids wrap: design.md).
        self._window: PublishWindow[_Handed] = PublishWindow(self._command_settled)
        self._internal_lost = False  # reconnected since: the window's waits start anew
        # The stats and the configuration statuses handed to the central client, until the broker's PUBACK.
        # Thread-safe: answered on paho's network thread (the stats are published once more after the worker).
        self._central_window: PublishWindow[_StatusHanded | _StatsHanded] = PublishWindow(self._central_settled)
        self._central_lost = False
        self._statuses = StatusBook()  # worker only
        self._status_counts = {"config_status_published": 0, "config_status_refused": 0}  # worker only
        self._central_ready = False
        self._internal_ready = False
        # What each broker was last asked to subscribe to, set on its network thread before its SUBACK.
        self._central_filters: tuple[str, ...] = ()
        self._internal_filters: tuple[str, ...] = ()
        self._ready = threading.Event()
        self._crashed = threading.Event()
        self._stopping = False
        self._stop_requested_at: float | None = None
        self._heartbeat = time.monotonic()
        self._status_due = 0.0
        self._started_at = time.monotonic()
        self._stats_due = self._started_at + config.health.stats_interval_seconds
        self._stats_topic = sender_stats_topic(config.central_broker_topics.external_main_topic)
        self._devices_topic = bridge_devices_topic(config.central_broker_topics.external_main_topic)
        self._device_list_rejected = 0  # entries of the device list that were not valid (worker only)
        # The signature of the file last loaded: a change notice for the same file is not a change.
        self._config_signature = file_signature(config_path) if config_path else None
        self._watcher = (ConfigWatcher(config_path, lambda: self._queue.put(_ConfigFileChanged()), log=logger)
                         if config_path else None)
        self._worker = threading.Thread(target=self._run, name="config-sender-worker", daemon=True)
        self._started = False

    # --- public API ---------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The configuration in force (the last good one)."""
        return self._config

    def start(self) -> None:
        """Connect both clients, start the worker and the file watcher; returns at once."""
        self._started = True
        self._worker.start()
        if self._watcher is not None:
            self._watcher.start()
        connect_in_background(self._internal, self._config.internal_broker)
        connect_in_background(self._central, self._config.central_broker)
        if self._notifier is not None:
            self._notifier.start_watchdog(self.is_healthy)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly: let the broker acknowledge commands already handed over, then disconnect."""
        if not self._started:
            return
        self._started = False
        if self._notifier is not None:
            self._notifier.stopping()
        if self._watcher is not None:
            self._watcher.stop(timeout)
        self._queue.put(_Stop())
        self._worker.join(timeout)
        with self._lock:
            stats = self._publish_stats(time.monotonic())
        if stats is not None:
            # Not connected after all: the retained stats of the last interval stay.
            with contextlib.suppress(RuntimeError, ValueError):
                stats.wait_for_publish(SHUTDOWN_GRACE_SECONDS)
        for client in (self._central, self._internal):
            client.disconnect()
            client.loop_stop()
        self._rejections.flush()
        self._refusals.flush()
        self._status_refusals.flush()
        logger.info("config_sender stopped")

    def run(self, stop: threading.Event) -> int:
        """Wait for ``stop`` (the worker does the work); the exit code: 1 if the worker died of a bug."""
        while not stop.wait(1.0) and not self.crashed:
            pass
        return 1 if self.crashed else 0

    @property
    def crashed(self) -> bool:
        """The worker died of a bug: the process should exit and be restarted."""
        return self._crashed.is_set()

    def request_reload(self) -> None:
        """Reload the configuration now, even if the file looks unchanged (SIGHUP, ``systemctl reload``).

        Called from the daemon's ``signals`` thread; it only puts an item on
        the worker's ``SimpleQueue``, and the worker does the reload.
        """
        self._queue.put(_ReloadRequested())

    def wait_ready(self, timeout: float) -> bool:
        """Whether both brokers were connected and subscribed within ``timeout`` seconds."""
        return self._ready.wait(timeout)

    @property
    def internal_ready(self) -> bool:
        """Connected and subscribed to the meters' reply topics: commands go out."""
        return self._internal_ready

    @property
    def central_ready(self) -> bool:
        """Connected and subscribed to the discovery topics."""
        return self._central_ready

    def counters(self) -> dict[str, int]:
        """sent, acked, alerted, late, failed, pending, retried, rejected_replies, … (for stats)."""
        with self._lock:
            return self._tracker.counters()

    def stats(self) -> dict[str, object]:
        """The retained ``<main>/bridge/config_sender/stats`` document: the counters, meters, uptime."""
        with self._lock:
            return self._stats(time.monotonic())

    def known_meters(self) -> frozenset[str]:
        """Every meter id discovered so far, excluded ones included."""
        with self._lock:
            return self._tracker.known_meters()

    def away_meters(self) -> frozenset[str]:
        """The known meters not online now: ``offline``, or not heard from for longer than their limit."""
        with self._lock:
            return self._tracker.away_meters(time.monotonic())

    def is_healthy(self) -> bool:
        """Both network threads alive and the worker looping: the systemd watchdog's question."""
        return (
            network_thread_alive(self._central)
            and network_thread_alive(self._internal)
            and self._worker.is_alive()
            and time.monotonic() - self._heartbeat < HEALTHY_HEARTBEAT_AGE
        )

    # --- paho callbacks: hand over and return -------------------------------------------

    def _wire_callbacks(self) -> None:
        self._reporters = {
            "central": ConnectionReporter(self._central, "central", self._config.central_broker, logger,
                                          mqtt311_loses=CENTRAL_MQTT311_LOSES, without_retain=CENTRAL_WITHOUT_RETAIN,
                                          qos0_only=CENTRAL_QOS0_ONLY),
            "internal": ConnectionReporter(self._internal, "internal", self._config.internal_broker, logger,
                                           mqtt311_loses=INTERNAL_MQTT311_LOSES),
        }
        self._central.on_connect = self._on_central_connect
        self._central.on_disconnect = self._on_disconnect
        self._central.on_subscribe = self._on_central_subscribe
        self._central.on_message = self._on_central_message
        self._central.on_publish = self._on_central_publish
        self._internal.on_connect = self._on_internal_connect
        self._internal.on_disconnect = self._on_disconnect
        self._internal.on_subscribe = self._on_internal_subscribe
        self._internal.on_message = self._on_internal_message
        self._internal.on_publish = self._on_internal_publish

    def _on_central_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                            properties: Any) -> None:
        if not self._reporters["central"].connected(reason_code, properties):
            return
        logger.info("connected to the central broker %s:%d", self._config.central_broker.host,
                    self._config.central_broker.port)
        # Subscribing on every connect makes a reconnect invisible. The device list first: the broker
        # sends retained messages in the order of the filters, so a per-client queue limit cuts short
        # the per-meter topics, never the one message that names every meter.
        main = self._config.central_broker_topics.external_main_topic
        self._central_filters = (self._devices_topic, *meter_subscriptions(main))
        client.subscribe([(topic, 1) for topic in self._central_filters])

    def _on_internal_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any,
                             properties: Any) -> None:
        if not self._reporters["internal"].connected(reason_code, properties):
            return
        logger.info("connected to the internal broker %s:%d", self._config.internal_broker.host,
                    self._config.internal_broker.port)
        topics = self._config.internal_broker_topics
        self._internal_filters = tuple(dict.fromkeys((topics.meter_config_ack, topics.meter_time_ack)))
        client.subscribe([(topic, 1) for topic in self._internal_filters])

    def _on_disconnect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any,
                       _properties: Any) -> None:
        broker = "central" if client is self._central else "internal"
        self._reporters[broker].disconnected(reason_code, deliberate=not self._started, flags=flags)
        # The ready flags belong to the worker: it sees connect and disconnect in order.
        self._queue.put(_Disconnected(broker))

    def _on_central_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reason_codes: list[Any],
                              _properties: Any) -> None:
        self._queue.put(_CentralSubscribed(refused_filters(self._central_filters, reason_codes)))

    def _on_internal_subscribe(self, _client: mqtt.Client, _userdata: Any, _mid: int, reason_codes: list[Any],
                               _properties: Any) -> None:
        self._queue.put(_InternalSubscribed(refused_filters(self._internal_filters, reason_codes)))

    def _on_central_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put(_CentralMessage(message.topic, message.payload, bool(message.retain)))

    def _on_internal_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._queue.put(_MeterReply(message.topic, message.payload, time.monotonic()))

    def _on_internal_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason_code: Any,
                             _properties: Any) -> None:
        self._queue.put(_Published(mid, reason_code))

    def _on_central_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, reason_code: Any,
                            _properties: Any) -> None:
        """The stats or a configuration status acknowledged: the window settles it (see ``_central_settled``)."""
        self._central_window.answered(mid, reason_code)

    def _central_settled(self, item: _StatusHanded | _StatsHanded, refused: str | None) -> None:
        """The central broker answered: the stats' refusal is logged here, a status's goes to the worker.

        Runs on paho's network thread or the worker: it only logs (thread-safe)
        or puts an item on the worker's queue, never waits.
        """
        if isinstance(item, _StatusHanded):
            self._queue.put(_StatusSettled(item, refused))
        elif refused is not None and refused != EXPIRED:
            self._refusals.error(refused, "the central broker refused %s: %s", item.topic, refused)

    # --- the worker -----------------------------------------------------------------------

    def _run(self) -> None:
        """Take events off the queue, sleep until the next deadline, publish what is due."""
        try:
            while True:
                now = time.monotonic()
                try:
                    items = [self._queue.get(timeout=self._wait_time(now))]
                except queue.Empty:
                    items = []
                # Deadlines are judged against the time before draining: a reply
                # drained now carries its own (earlier) arrival time.
                now = time.monotonic()
                while len(items) < 10000:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                with self._lock:
                    for item in items:
                        self._handle(item)
                    self._after_events(now)
                self._heartbeat = time.monotonic()
                if self._stopping and self._may_exit():
                    return
        except Exception:
            # A bug must not leave a zombie that looks alive: main exits non-zero
            # (systemd restarts it) and the watchdog stops pinging.
            logger.critical("config_sender worker crashed", exc_info=True)
            self._crashed.set()
            raise

    def _wait_time(self, now: float) -> float:
        wakeups = [now + HEARTBEAT_SECONDS]
        with self._lock:
            next_wakeup = self._tracker.next_wakeup()
        if next_wakeup is not None:
            wakeups.append(next_wakeup + DEADLINE_MARGIN)
        if self._stopping:
            wakeups.append(now + 0.05)
        return max(0.0, min(wakeups) - now)

    def _may_exit(self) -> bool:
        """Commands and statuses handed over are acknowledged (statuses due are handed over), or the grace is up."""
        assert self._stop_requested_at is not None
        statuses_out = self._central_ready and (self._statuses.due() or len(self._central_window))
        return (not len(self._window) and not statuses_out) or \
            time.monotonic() - self._stop_requested_at > SHUTDOWN_GRACE_SECONDS

    def _handle(self, item: _WorkItem) -> None:
        match item:
            case _CentralMessage():
                self._handle_central_message(item)
            case _MeterReply():
                for event in self._tracker.observe_reply(item.payload, item.received_at):
                    self._log_event(event, item.topic)
            case _Published(mid=mid, reason_code=reason_code):
                self._window.answered(mid, reason_code)
            case _StatusSettled():
                self._status_settled(item)
            case _InternalSubscribed(refused=refused):
                ok = not refused
                if refused:
                    logger.error("the internal broker refused the subscription to the meters' reply topics: %s",
                                 ", ".join(refused))
                self._internal_ready = ok
                self._check_ready()
            case _CentralSubscribed(refused=refused):
                ok = not refused
                if refused:
                    logger.error("the central broker refused the subscription to the meter topics: %s",
                                 ", ".join(refused))
                elif not self._central_ready:
                    # Deaf until now: the meters' silence meanwhile says nothing about them.
                    self._tracker.resume_listening(time.monotonic())
                self._central_ready = ok
                self._check_ready()
            case _Disconnected(broker="central"):
                self._central_ready = False
                self._central_lost = True
            case _Disconnected():
                self._internal_ready = False
                self._internal_lost = True
                resend = self._tracker.connection_lost()
                if resend:
                    logger.warning("%d commands awaiting replies will be sent again when the internal broker "
                                   "is back; their timeouts start then", resend)
            case _ConfigFileChanged():
                self._reload_config()
            case _ReloadRequested():
                if self._config_path is None:
                    logger.warning("SIGHUP received, but there is no configuration file to reload")
                else:
                    logger.info("SIGHUP received: reloading the configuration from %s", self._config_path)
                    self._reload_config(force=True)
            case _Stop():
                self._stopping = True
                self._stop_requested_at = time.monotonic()

    def _command_settled(self, handed: _Handed, refused: str | None) -> None:
        """The internal broker answered a command: taken (the meter's reply is awaited), or refused.

        Refused (its ACL): the meter never got it, so no ALERT follows. An
        answer that never came (``EXPIRED``) changes nothing: the reply's
        timeout alerts as for any lost command.
        """
        if refused is None or refused == EXPIRED:
            return
        reason = refused
        self._tracker.refused_by_broker(handed.command)
        self._refusals.error(reason, "the internal broker refused %s on %s: %s; not sent",
                             handed.command.describe(), handed.topic, reason)

    def _check_ready(self) -> None:
        if self._central_ready and self._internal_ready and not self._ready.is_set():
            self._ready.set()
            logger.info("ready: subscribed on both brokers")
            if self._notifier is not None:
                self._notifier.ready(status=self._status_text())

    def _handle_device_list(self, item: _CentralMessage) -> None:
        """The proxy's device list: every meter in it is discovered, as from its retained availability.

        A snapshot, never a sign of life: an ``online`` in it counts as
        retained (it discovers, and ends an ``offline``, but does not
        refresh when the meter was last heard).
        """
        if not item.payload:
            return  # cleared: too many meters for a list, or none published yet
        entries, bad = parse_device_list(item.payload)
        if bad:
            self._device_list_rejected += bad
            self._rejections.warning("bad_device_list", "rejected %d entries of the device list on %s (not a "
                                     "JSON array of meters with a valid id and availability)", bad, item.topic)
        now = time.monotonic()
        for meter_id, state in entries:
            for event in self._tracker.observe_availability(meter_id, state, now, retained=True):
                self._log_event(event)

    def _handle_central_message(self, item: _CentralMessage) -> None:
        if item.topic == self._devices_topic:
            self._handle_device_list(item)
            return
        main = self._config.central_broker_topics.external_main_topic
        topic = parse_meter_topic(main, item.topic)
        if topic is None:
            logger.debug("ignored %s: not a meter topic", item.topic)
            return
        now = time.monotonic()
        if topic.leaf == AVAILABILITY:
            state = parse_state(item.payload)
            if state is None:
                logger.debug("ignored availability %r on %s", item.payload[:40], item.topic)
                return
            events = self._tracker.observe_availability(topic.meter_id, state, now, retained=item.retained)
        else:
            meter_time = parse_reading_time(item.payload)
            local_now = datetime.now()
            events = self._tracker.observe_reading(topic.meter_id, topic.leaf, meter_time, item.retained,
                                                   now, local_now)
            # A retained reading may be hours old: it says nothing about the clock now.
            if meter_time is not None and not item.retained and topic.meter_id not in self._config.meters.exclude:
                self._statuses.observe_offset(topic.meter_id, clock_drift_seconds(meter_time, local_now), now)
        for event in events:
            self._log_event(event)

    def _after_events(self, now: float) -> None:
        for event in self._tracker.tick(now):
            self._log_event(event)
        self._publish_due()
        self._update_statuses()
        self._publish_statuses()
        if now >= self._stats_due:
            self._stats_due = now + self._config.health.stats_interval_seconds
            if self._central_ready:
                self._expire_central()
            self._publish_stats(now)
        if self._notifier is not None and self._ready.is_set() and now >= self._status_due:
            self._status_due = now + STATUS_INTERVAL_SECONDS
            self._notifier.status(self._status_text())

    def _publish_due(self) -> None:
        """Hand queued commands to paho while connected and within the window."""
        if not self._internal_ready or self._stopping:
            return
        window = self._window
        if self._internal_lost:
            self._internal_lost = False
            window.reconnected()
        window.expire()
        topics = self._config.internal_broker_topics
        while window.reserve(1):
            command = self._tracker.pop_outgoing(datetime.now())
            if command is None:
                window.release()
                return
            topic = command.topic(topics)
            try:
                window.hand_over(_Handed(command, topic),
                                 lambda topic=topic, command=command: self._internal.publish(topic, command.payload(),
                                                                                           qos=1))
            except (ValueError, RuntimeError) as error:
                # Still marked sent: it times out and is alerted like any lost command.
                logger.error("could not publish %s: %s", command.describe(), error)
            self._tracker.mark_sent(command, time.monotonic())
            logger.debug("sent %s to %s", command.describe(), topic)

    # --- configuration statuses ---------------------------------------------------------

    def _update_statuses(self) -> None:
        """Record the state of every meter whose commands changed (``CommandTracker.config_state``)."""
        wall = time.time()
        meters = self._config.meters
        for meter_id in self._tracker.take_touched():
            self._statuses.update(meter_id, self._tracker.config_state(meter_id), meters.seconds_interval(meter_id),
                                  meters.minutes_interval(meter_id), wall, excluded=meter_id in meters.exclude)

    def _publish_statuses(self) -> None:
        """Hand the statuses due to the central client while connected, at most STATUS_IN_FLIGHT unanswered.

        Those that do not fit wait in the StatusBook, one per meter (the latest),
        and go out as PUBACKs free places: a thousand meters configured at once
        cost a thousand messages or fewer, never a blocked worker.
        """
        if not self._central_ready or not self._statuses.due():
            return
        window = self._central_window
        self._expire_central()
        room = STATUS_IN_FLIGHT - len(window)
        if room <= 0:
            return
        limits = self._reporters["central"].limits
        main = self._config.central_broker_topics.external_main_topic
        for meter_id, payload in self._statuses.take(room, time.monotonic()):
            if not payload and not limits.retain_available:
                continue  # nothing retained to clear
            topic = config_status_topic(main, meter_id)
            if not window.reserve(1):
                self._statuses.again(meter_id)
                continue
            try:
                window.hand_over(_StatusHanded(meter_id, topic, not payload),
                                 lambda topic=topic, payload=payload: self._central.publish(
                                     topic, payload, qos=min(1, limits.maximum_qos), retain=limits.retain_available))
            except (ValueError, RuntimeError) as error:
                logger.error("could not publish %s: %s", topic, error)
                continue
            logger.debug("published %s %s", topic, payload.decode() or "(cleared)")

    def _expire_central(self) -> None:
        """Give up on central PUBACKs that are not coming (time disconnected does not count)."""
        if self._central_lost:
            self._central_lost = False
            self._central_window.reconnected()
        self._central_window.expire()

    def _status_settled(self, item: _StatusSettled) -> None:
        """The central broker answered a status: count it, log a refusal, publish again one never answered."""
        status, refused = item.status, item.refused
        if refused is None:
            self._status_counts["config_status_published"] += 1
        elif refused == EXPIRED:
            logger.debug("no acknowledgement for %s: publishing it again", status.topic)
            self._statuses.again(status.meter_id)
        else:
            self._status_counts["config_status_refused"] += 1
            self._status_refusals.error(refused, "the central broker refused %s: %s; the configuration status of "
                                        "meter %s is not %s", status.topic, refused, status.meter_id,
                                        "cleared" if status.cleared else "published")

    # --- configuration reload -----------------------------------------------------------

    def _reload_config(self, force: bool = False) -> None:
        """Reload after the file changed, or when asked (``force``); keep the last good configuration if invalid."""
        assert self._config_path is not None
        signature = file_signature(self._config_path)
        if signature == self._config_signature and not force:
            return
        self._config_signature = signature
        if signature is None:
            logger.warning("configuration %s is gone; keeping the last good configuration", self._config_path)
            return
        try:
            new = load_config(self._config_path, self._environ)
        except ConfigError as error:
            for problem in error.problems:
                logger.error("invalid configuration %s: %s", self._config_path, problem)
            logger.error("keeping the last good configuration; nothing sent")
            return
        old = self._config
        restart_only = restart_only_changes(old, new)
        if restart_only:
            logger.warning("%s changed in %s: broker connection settings take effect only when config_sender "
                           "restarts", ", ".join(restart_only), self._config_path)
        self._config = keep_connection_settings(old, new)
        if new.logging.level != old.logging.level:
            logging.getLogger().setLevel(new.logging.level)
        targets = meters_to_configure(self._tracker.known_meters(), self._tracker.offline_meters(),
                                      self._config.meters)
        events = self._tracker.apply_settings(self._config.meters, time.monotonic())
        away = sum(isinstance(event, Deferred) for event in events)
        logger.info("configuration reloaded from %s (%s); configuring the %d meters online now again%s",
                    self._config_path, describe(self._config), len(targets) - away,
                    f"; {away} away get it when heard from again" if away else "")
        for event in events:
            self._log_event(event)

    # --- log lines ------------------------------------------------------------------------

    def _log_event(self, event: Event, topic: str = "") -> None:
        """One log line per event; the wording is documented in doc/configuration_flow.md."""
        match event:
            case Acked(command=command, latency=latency):
                logger.info("meter %s acknowledged %s = %s in %.3f s (oprid %s)", command.meter_id,
                            command.kind.label, command.value, latency, command.oprid)
            case NoReply(command=command, timeout=timeout, retry_in=retry_in, retries=retries):
                if retry_in is not None:
                    then = f"retry {command.attempt + 1} of {retries} in {retry_in:g} s"
                else:
                    then = "no more retries until the meter comes back online or the configuration changes"
                logger.log(ALERT, "meter %s did not reply to %s = %s within %g s (oprid %s); %s",
                           command.meter_id, command.kind.label, command.value, timeout, command.oprid, then)
            case Failed(command=command, msg=msg, latency=latency):
                logger.log(ALERT, "meter %s refused %s = %s after %.3f s: %s (oprid %s)", command.meter_id,
                           command.kind.label, command.value, latency,
                           f"msg {msg!r}" if msg else "no reason given", command.oprid)
            case LateReply(command=command, code=code, msg=msg, latency=latency, stopped_retries=stopped):
                outcome = "accepted" if code == "01" else f"refused, msg {msg!r}"
                logger.warning("late reply from meter %s to %s = %s after %.3f s: %s%s (oprid %s)",
                               command.meter_id, command.kind.label, command.value, latency, outcome,
                               "; retries stopped" if stopped else "", command.oprid)
            case Retrying(command=command, retries=retries):
                logger.info("retrying %s (retry %d of %d)", command.describe(), command.attempt, retries)
            case Discovered(meter_id=meter_id, source=source, excluded=excluded, offline=offline):
                if excluded:
                    logger.info("discovered meter %s (from %s): excluded, no commands", meter_id, source)
                elif offline:
                    logger.info("discovered meter %s (from %s): offline, configured when it comes online",
                                meter_id, source)
                else:
                    logger.info("discovered meter %s (from %s): setting %d s / %d min", meter_id, source,
                                self._config.meters.seconds_interval(meter_id),
                                self._config.meters.minutes_interval(meter_id))
            case BackOnline(meter_id=meter_id):
                logger.info("meter %s is back online: configuring it again", meter_id)
            case WentOffline(meter_id=meter_id):
                logger.info("meter %s is offline", meter_id)
            case ClockDrift(meter_id=meter_id, meter_time=meter_time, drift_seconds=drift):
                logger.warning("meter %s clock reads %s, %.0f s %s local time: setting it", meter_id,
                               meter_time.isoformat(), abs(drift), "ahead of" if drift > 0 else "behind")
            case Superseded(command=command):
                logger.debug("superseded %s", command.describe())
            case Deferred(meter_id=meter_id, what=what, silent_for=silent_for, limit=limit):
                logger.info("meter %s is away (silent for %.0f s, limit %.0f s): %s held back until it is "
                            "heard from again", meter_id, silent_for, limit, what)
            case Cancelled(command=command, reason=reason):
                logger.info("dropped %s: %s", command.describe(), reason)
            case RejectedReply(reason=reason, detail=detail):
                self._rejections.warning(reason, "rejected reply on %s: %s: %s", topic, reason, detail)
            case IgnoredReply(command=command, outcome=outcome):
                logger.debug("ignored reply to %s: command already %s", command.describe(), outcome.value)

    def _status_text(self) -> str:
        counts = self._tracker.counters()
        return (f"{len(self._tracker.known_meters())} meters; {counts['pending']} commands pending, "
                f"{counts['acked']} acked, {counts['alerted']} unanswered, {counts['failed']} refused")

    def _stats(self, now: float) -> dict[str, object]:
        return {**self._tracker.counters(), "meters": len(self._tracker.known_meters()),
                "device_list_rejected": self._device_list_rejected, **self._status_counts,
                "log_lines_dropped": log_lines_dropped(), "uptime_seconds": round(now - self._started_at)}

    def _publish_stats(self, now: float) -> mqtt.MQTTMessageInfo | None:
        """Log the counters and publish them retained on the central broker, when connected.

        Only while connected: stats from an outage are stale by the time it ends,
        and paho would otherwise queue them without bound. Within what the
        broker announced it takes: it would close the connection otherwise.
        """
        document = json.dumps(self._stats(now))
        logger.info("stats: %s", document)
        if not self._central_ready:
            return None
        limits = self._reporters["central"].limits
        handed: list[mqtt.MQTTMessageInfo] = []

        def publish() -> mqtt.MQTTMessageInfo:
            handed.append(self._central.publish(self._stats_topic, document, qos=min(1, limits.maximum_qos),
                                                retain=limits.retain_available))
            return handed[0]

        # Statuses never take the window's last places (STATUS_IN_FLIGHT): there is room.
        if not self._central_window.reserve(1):
            logger.warning("stats not published: too many publishes to the central broker unacknowledged")
            return None
        try:
            self._central_window.hand_over(_StatsHanded(self._stats_topic), publish)
        except (ValueError, RuntimeError) as error:
            logger.error("could not publish %s: %s", self._stats_topic, error)
            return None
        return handed[0]


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run until SIGTERM/SIGINT (exit 0, or 1 if the worker failed); see ``daemon.main``.

    SIGHUP reloads the configuration and the daemon goes on running.
    """
    environ = dict(os.environ) if environ is None else environ

    def build(config: Config, command_line: daemon.CommandLine) -> ConfigSender:
        return ConfigSender(config, command_line.config_path, environ=environ, notifier=SystemdNotifier(environ))

    return daemon.main("config_sender", "Discover KPM33B meters and push their upload intervals and clock.",
                       Path(__file__).resolve().parent, sys.argv[1:] if argv is None else argv, environ, build)


if __name__ == "__main__":
    sys.exit(main())
