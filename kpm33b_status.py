"""The fleet at a glance: the bridge and every meter, read from the central broker's retained topics.

    python kpm33b_status.py [--config PATH] [--json] [--meter ID]

Everything the proxy and the config sender know that an operator asks about
is retained on the central broker (the bridge's state and counters, the
device list, each meter's readings, availability and configuration status),
so this command needs neither daemon to be running, nor any state of its
own: it connects with the daemons' settings for the central broker
(``config.yaml``: TLS, credentials, MQTT version), reads, disconnects and
prints a table, or with ``--json`` one JSON document. It only reads: no last
will, no publish, a clean session the broker forgets at once.

MQTT marks no end of the retained messages. They come right after each
subscription, so the command subscribes in a few steps (the bridge's topics
with every meter's availability, then the readings of power, of energy, the
configuration statuses: each step gets the broker's whole per-client queue),
and a step ends once its SUBACK is in and no retained message came for
``QUIET_SECONDS``; live messages arriving meanwhile are kept (they are newer)
but do not hold the step open. All steps together end after
``READ_SECONDS`` at most.

Exit codes: 0 printed; 1 printed, but incomplete (the broker refused a
subscription, the time ran out, or ``--meter`` found nothing retained);
2 an invalid configuration or meter id, or a central broker that cannot be
reached (one line naming its host, port and why).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import secrets
import ssl
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from config_loader import BrokerSettings, ConfigError, load_config
from daemon import CONFIG_ENV_VAR, exit_with_problems
from mqtt_client import (
    ConnectionReporter,
    connect_in_background,
    describe_connect_failure,
    make_client,
    reason_text,
    tls_hint,
)
from status_report import collect, format_table, report_document
from topics import (
    AVAILABILITY,
    MINUTES,
    SECONDS,
    availability_topic,
    bridge_devices_topic,
    bridge_state_topic,
    bridge_stats_topic,
    config_status_topic,
    is_valid_meter_id,
    meter_subscription,
    reading_topic,
    sender_stats_topic,
)
from topics import CONFIG_STATUS as CONFIG_STATUS_LEAF

QUIET_SECONDS = 0.4  # no retained message for this long after a SUBACK: that step's retained messages are in
READ_SECONDS = 5.0  # all steps together, from the CONNACK
CONNECT_SECONDS = 5.0  # from the start to the CONNACK (auto's fall-back to MQTT 3.1.1 included)
EXIT_INCOMPLETE = 1
EXIT_FAILED = 2
NAME = "kpm33b_status"

# The reporter's words go nowhere: this command says what went wrong in one line of its own.
_silent = logging.getLogger(NAME)
_silent.addHandler(logging.NullHandler())
_silent.propagate = False


class Unreachable(Exception):
    """The central broker could not be read; the message says why, in a few words."""


@dataclass
class Retained:
    """What the broker sent: every message in order of arrival, and what it would not let us read."""

    messages: list[tuple[str, bytes]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # "<filter> (<reason>)"
    complete: bool = True  # False: READ_SECONDS ran out before the last step went quiet


def subscription_steps(main_topic: str, meter_id: str | None) -> list[list[str]]:
    """The topic filters, step by step: the device list first (it names every meter), the bridge, the meters.

    One meter (``meter_id``): its four topics only, in one step.
    """
    bridge = [bridge_devices_topic(main_topic), bridge_state_topic(main_topic), bridge_stats_topic(main_topic),
              sender_stats_topic(main_topic)]
    if meter_id is not None:
        return [[*bridge, availability_topic(main_topic, meter_id), reading_topic(main_topic, meter_id, SECONDS),
                 reading_topic(main_topic, meter_id, MINUTES), config_status_topic(main_topic, meter_id)]]
    return [[*bridge, meter_subscription(main_topic, AVAILABILITY)],
            *([meter_subscription(main_topic, leaf)] for leaf in (SECONDS, MINUTES, CONFIG_STATUS_LEAF))]


def _failure(error: BaseException | None, settings: BrokerSettings, connect_seconds: float) -> str:
    """Why a connection attempt failed, as the daemons word it, with the TLS hint when one fits."""
    if isinstance(error, TimeoutError):
        return _timed_out(connect_seconds)
    text = describe_connect_failure(error)
    # A plain port answers a TLS handshake with garbage or by hanging up.
    if settings.tls is not None and isinstance(error, ssl.SSLError | ConnectionResetError) \
            and not isinstance(error, ssl.SSLCertVerificationError):
        hint = tls_hint(settings.port, True, "central_broker") or (
            f"does port {settings.port} speak plain MQTT? check central_broker.port and .tls")
        text = f"TLS failed: {text} ({hint})" if isinstance(error, ConnectionResetError) else f"{text} ({hint})"
    return text


def _timed_out(seconds: float) -> str:
    return f"timed out: no answer within {seconds:g} s (a firewall, the wrong host, or not an MQTT broker?)"


class _Events:
    """paho's callbacks put what happened on a queue and return; the main thread takes it off."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self.stopping = False  # set before the deliberate disconnect

    def put(self, *event: Any) -> None:
        self.queue.put(event)

    def next(self, deadline: float) -> tuple[Any, ...] | None:
        """The next event, or None once ``deadline`` (time.monotonic) has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        try:
            return self.queue.get(timeout=remaining)
        except queue.Empty:
            return None


def _wire(client: mqtt.Client, settings: BrokerSettings, events: _Events, connect_seconds: float) -> None:
    """The callbacks: the daemons' ConnectionReporter runs the handshake (MQTT version, fall-back)."""
    reporter = ConnectionReporter(client, "central", settings, _silent)
    reporter_failed = client.on_connect_fail
    reporter_pre_connect = client.on_pre_connect

    def on_pre_connect(c: mqtt.Client, userdata: Any) -> None:
        reporter_pre_connect(c, userdata)
        events.put("attempt")

    def on_connect_fail(c: mqtt.Client, userdata: Any) -> None:
        error = sys.exc_info()[1]  # paho calls this inside its `except OSError` block
        reporter_failed(c, userdata)
        events.put("failed", _failure(error, settings, connect_seconds))

    def on_connect(_c: mqtt.Client, _userdata: Any, _flags: Any, reason_code: Any, properties: Any) -> None:
        before = reporter.protocol
        if reporter.connected(reason_code, properties):
            events.put("connected")
        else:
            events.put("refused", reason_text(reason_code), reporter.protocol != before)

    def on_disconnect(_c: mqtt.Client, _userdata: Any, flags: Any, reason_code: Any, _properties: Any) -> None:
        before = reporter.protocol
        reporter.disconnected(reason_code, deliberate=events.stopping, flags=flags)
        events.put("closed", reason_text(reason_code), reporter.protocol != before)

    def on_subscribe(_c: mqtt.Client, _userdata: Any, mid: int, reason_codes: list[Any], _properties: Any) -> None:
        events.put("suback", mid, [reason_text(code) if code.is_failure else None for code in reason_codes])

    def on_message(_c: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        events.put("message", message.topic, message.payload, bool(message.retain))

    client.on_pre_connect = on_pre_connect
    client.on_connect_fail = on_connect_fail
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_message = on_message


def _await_connack(events: _Events, settings: BrokerSettings, connect_seconds: float) -> None:
    """Until the broker accepted us; Unreachable at the first failure that no retry would mend."""
    deadline = time.monotonic() + connect_seconds
    refused = False  # this attempt was refused already: the connection's end that follows is no news
    while True:
        event = events.next(deadline)
        if event is None:
            raise Unreachable(_timed_out(connect_seconds))
        match event:
            case ("attempt",):
                refused = False
            case ("connected",):
                return
            case ("failed", reason):
                raise Unreachable(reason)
            case ("refused", reason, switched):
                if not switched:
                    raise Unreachable(f"refused the connection: {reason}")
                refused = True
            case ("closed", _reason, False) if not refused:
                hint = tls_hint(settings.port, settings.tls is not None, "central_broker")
                raise Unreachable("closed the connection before answering the CONNECT ("
                                  + (hint or "not an MQTT broker, or a TLS port spoken to in plain text") + ")")
            # Refused or closed with protocol auto: the other MQTT version is tried next.


def _read_steps(client: mqtt.Client, events: _Events, steps: list[list[str]], retained: Retained,
                quiet_seconds: float, read_seconds: float) -> None:
    """Subscribe step by step, each until its retained messages are in (see the module's docstring)."""
    end = time.monotonic() + read_seconds
    for step in steps:
        result, mid = client.subscribe([(topic, 1) for topic in step])
        if result != mqtt.MQTT_ERR_SUCCESS:
            raise Unreachable("the connection ended while subscribing")
        quiet_until: float | None = None  # set by the SUBACK
        while True:
            event = events.next(end if quiet_until is None else min(end, quiet_until))
            if event is None:
                if time.monotonic() >= end:
                    retained.complete = False
                    return
                break
            match event:
                case ("message", topic, payload, was_retained):
                    retained.messages.append((topic, payload))
                    if was_retained and quiet_until is not None:
                        quiet_until = time.monotonic() + quiet_seconds
                case ("suback", acked, reasons) if acked == mid:
                    retained.refused += [f"{topic} ({reason})" for topic, reason in zip(step, reasons, strict=False)
                                         if reason is not None]
                    quiet_until = time.monotonic() + quiet_seconds
                case ("closed", reason, _):
                    raise Unreachable(f"closed the connection while it was being read: {reason}")


def read_retained(settings: BrokerSettings, steps: list[list[str]], *, quiet_seconds: float = QUIET_SECONDS,
                  read_seconds: float = READ_SECONDS, connect_seconds: float = CONNECT_SECONDS) -> Retained:
    """Connect (clean session, no will), read the retained messages of ``steps``, disconnect.

    Raises Unreachable when the broker cannot be reached or read.
    """
    try:
        client = make_client(settings, f"{NAME}-{secrets.token_hex(4)}")
    except (OSError, ssl.SSLError, ValueError) as error:  # TLS files that cannot be loaded
        raise Unreachable(f"TLS cannot be set up: {error}") from None
    client.connect_timeout = connect_seconds
    events = _Events()
    _wire(client, settings, events, connect_seconds)
    retained = Retained()
    # A clean start and no session expiry: the broker forgets this client as soon as it leaves.
    connect_in_background(client, settings, clean_start=True, session_expiry=0)
    try:
        _await_connack(events, settings, connect_seconds)
        _read_steps(client, events, steps, retained, quiet_seconds, read_seconds)
    finally:
        events.stopping = True
        client.disconnect()
        client.loop_stop()
    return retained


def parse_arguments(argv: list[str], environ: Mapping[str, str], script_dir: Path) -> argparse.Namespace:
    """``--config`` (default ``$KPM33B_CONFIG``, else config.yaml beside the script, as for the daemons)."""
    default = environ.get(CONFIG_ENV_VAR) or str(script_dir / "config.yaml")
    parser = argparse.ArgumentParser(prog="kpm33b_status.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=default, help=f"configuration file (default: {default})")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument("--meter", metavar="ID", help="only this meter (13 letters and digits)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Read and print; the exit code (see the module's docstring)."""
    environ = dict(os.environ) if environ is None else environ
    args = parse_arguments(sys.argv[1:] if argv is None else argv, environ, Path(__file__).resolve().parent)
    if args.meter is not None and not is_valid_meter_id(args.meter):
        print(f"{NAME}: --meter {args.meter!r} is not a meter id (exactly 13 letters and digits)", file=sys.stderr)
        return EXIT_FAILED
    config_path = Path(args.config)
    try:
        config = load_config(config_path, environ)
    except ConfigError as error:
        exit_with_problems(config_path, error)
    settings = config.central_broker
    main_topic = config.central_broker_topics.external_main_topic
    broker = f"{settings.host}:{settings.port}"
    try:
        retained = read_retained(settings, subscription_steps(main_topic, args.meter))
    except Unreachable as reason:
        print(f"{NAME}: cannot read the central broker {broker}: {reason}", file=sys.stderr)
        return EXIT_FAILED
    fleet = collect(main_topic, retained.messages, only=args.meter)
    now = datetime.now().astimezone()
    if args.json:
        print(json.dumps(report_document(fleet, broker, now), ensure_ascii=False, indent=2))
    else:
        print(format_table(fleet, broker, now), end="")
    notes = [f"the broker refused to let this account read {topic}" for topic in retained.refused]
    if not retained.complete:
        notes.append(f"still receiving retained messages after {READ_SECONDS:g} s: the report may be incomplete")
    if args.meter is not None and not fleet.meters:
        notes.append(f"nothing retained about meter {args.meter} on {broker}")
    for note in notes:
        print(f"{NAME}: {note}", file=sys.stderr)
    return EXIT_INCOMPLETE if notes else 0


if __name__ == "__main__":
    sys.exit(main())
