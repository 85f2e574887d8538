"""Pure logic of the configuration flow: which commands to send, and what their replies mean.

``config_sender.py`` is thin wiring around this module: it feeds in what it
sees (meters appearing on the central broker, their readings, the meters'
replies, the clock) and carries out what comes back (publish these commands,
log these events). Nothing here imports paho or touches a socket, a file or
the clock: every function takes ``now`` (a monotonic time in seconds) and, for
the meters' clocks, ``local_now`` (a naive local datetime), so that the whole
state machine is tested with exact expected outputs and a fake clock.

The rules it implements:

- A meter id not seen before is a *discovery*: it gets both upload-interval
  commands (``Cmd`` 0000 and 0001), unless it is excluded or known to be offline.
- Every command carries a fresh 32-character ``oprid``; replies, which all
  meters send to one global topic, are matched by it.
- A reply ``"code":"01"`` within ``ack_timeout_seconds`` of the send is an ack;
  ``"02"`` a failure. No reply in time is an alert; the command is then retried
  after growing delays (10 s, 60 s, 300 s) and, after the last one, left alone
  until the meter comes back after being offline or the configuration changes.
- A new command for the same meter and ``Cmd`` supersedes an older pending one.
- A command the broker refuses (its ACL; PUBACK reason ≥ 0x80) never reached
  the meter: it is not counted as sent, and neither awaited, alerted nor retried.
- Clock commands go to a meter whose live readings carry a time further than
  ``max_clock_drift_seconds`` from the local clock, at most once an hour; they
  are not retried (the hourly check is their retry).
- A meter is *online now* unless its availability says ``offline`` or the
  sender itself has not heard a live reading from it for longer than its
  silence limit (``availability.silence_limit`` of the intervals it may be
  using). The proxy's availability may be late, or stale after a proxy
  restart; the sender's own clock is not. A configuration change goes to the
  meters online now; a meter away is sent nothing (no command, no retry, so
  no alert) and gets the current settings as soon as it is heard from again.
- Deadlines live in a heap, so a thousand commands in flight cost one timer,
  not a thousand.
- A meter's configuration status (``applied``, ``pending``, ``no_reply``,
  ``refused``: ``config_state_of``) follows from its latest interval
  commands; ``take_touched`` names the meters whose commands changed, so the
  daemon looks again at those only (``config_status`` decides what to publish).
"""

from __future__ import annotations

import heapq
import json
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import Enum
from typing import NamedTuple

from availability import silence_limit
from config_loader import InternalTopics, MeterSettings
from config_status import ConfigState
from topics import AVAILABILITY, command_topic, is_valid_meter_id

OPRID_LENGTH = 32
# 10 s, 1 min, 5 min: a meter that missed a command because it was busy gets it
# again soon; one that is really gone costs three commands, not a stream.
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (10.0, 60.0, 300.0)
# A meter whose clock will not stay set must not be sent a command per reading.
CLOCK_COMMAND_MIN_INTERVAL = 3600.0
# Meters' replies are well under 200 bytes; anything much larger is not a reply.
MAX_REPLY_BYTES = 4096
MAX_READING_BYTES = 65536
# How many finished commands are remembered to recognise late and duplicate replies.
RECENT_COMMANDS_LIMIT = 20000
METER_TIME_FORMAT = "%Y%m%d%H%M%S"



class CommandKind(Enum):
    """What a command sets; the value of the interval kinds is the protocol's ``Cmd``."""

    SECONDS_INTERVAL = "0000"
    MINUTES_INTERVAL = "0001"
    CLOCK = "clock"

    @property
    def label(self) -> str:
        """How log lines name the command."""
        return _KIND_LABELS[self]


_KIND_LABELS = {
    CommandKind.SECONDS_INTERVAL: "seconds interval (Cmd 0000)",
    CommandKind.MINUTES_INTERVAL: "minutes interval (Cmd 0001)",
    CommandKind.CLOCK: "clock",
}
INTERVAL_KINDS = (CommandKind.SECONDS_INTERVAL, CommandKind.MINUTES_INTERVAL)


class SlotStatus(Enum):
    """Where the latest command of one meter and kind stands."""

    QUEUED = "queued"              # waiting to be handed to the broker
    WAITING = "waiting"            # sent, reply not yet due
    RETRY_SCHEDULED = "retry scheduled"
    ACKED = "acked"
    FAILED = "failed"              # the meter answered code 02
    GAVE_UP = "gave up"            # no reply after the last retry: left alerted
    CANCELLED = "cancelled"        # meter excluded or gone offline
    REFUSED = "refused by the broker"  # the internal broker would not take it (ACL): the meter never got it


class CommandOutcome(Enum):
    """How a finished command ended; remembered to classify replies that come later."""

    ACKED = "acked"
    FAILED = "failed"
    TIMED_OUT = "timed out"
    LATE = "late"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"
    REFUSED = "refused by the broker"


# --- commands -----------------------------------------------------------------


def new_oprid() -> str:
    """A fresh operation id: the meters answer only ids of exactly 32 characters."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Command:
    """One command to one meter. ``value`` is the interval, or the time sent to the clock."""

    meter_id: str
    kind: CommandKind
    value: str
    oprid: str
    attempt: int = 0  # 0 for the first send, n for the n-th retry

    def topic(self, topics: InternalTopics) -> str:
        """The meter's own command topic: a fixed prefix plus the last 8 characters of its id."""
        return command_topic(topics.meter_time if self.kind is CommandKind.CLOCK else topics.meter_config,
                             self.meter_id)

    def payload(self) -> str:
        """The JSON the meter expects (protocol V1.9)."""
        if self.kind is CommandKind.CLOCK:
            return json.dumps({"oprid": self.oprid, "time": self.value})
        return json.dumps({"oprid": self.oprid, "Cmd": self.kind.value, "value": self.value, "types": "1"})

    def describe(self) -> str:
        """``meter 33B1225950027 seconds interval (Cmd 0000) = 60 (oprid …)`` for log lines."""
        return f"meter {self.meter_id} {self.kind.label} = {self.value} (oprid {self.oprid})"


def meter_time_text(local_now: datetime) -> str:
    """The meters' clock format, ``YYYYMMDDhhmmss``, local time."""
    return local_now.strftime(METER_TIME_FORMAT)


def interval_value(settings: MeterSettings, meter_id: str, kind: CommandKind) -> str:
    """The interval a meter should have for ``kind``: its override, else the default."""
    if kind is CommandKind.SECONDS_INTERVAL:
        return str(settings.seconds_interval(meter_id))
    if kind is CommandKind.MINUTES_INTERVAL:
        return str(settings.minutes_interval(meter_id))
    raise ValueError(f"{kind} is not an interval")


# --- what arrives: replies, central topics, readings ----------------------------


@dataclass(frozen=True)
class Reply:
    """A meter's validated reply to a command."""

    oprid: str
    code: str                 # "01" success, "02" failure
    meter_id: str | None      # the echoed id, when the meter sent one
    msg: str | None           # the meter's reason, mostly with "02"


class InvalidReply(ValueError):
    """A reply that cannot be used; ``reason`` is a short, fixed phrase for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _preview(payload: bytes, limit: int = 80) -> str:
    """A short, printable excerpt of hostile input for a log line."""
    text = repr(payload[:limit])
    return text + ("…" if len(payload) > limit else "")


def parse_reply(payload: bytes) -> Reply:
    """Validate a reply from the meters' broker; raise InvalidReply saying why not.

    Replies are hostile input: anyone on the internal broker can publish there,
    and firmware varies. Only the shapes the protocol describes are accepted.
    """
    if len(payload) > MAX_REPLY_BYTES:
        raise InvalidReply("too large", f"{len(payload)} bytes")
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        raise InvalidReply("malformed JSON", _preview(payload)) from None
    if not isinstance(document, dict):
        raise InvalidReply("not a JSON object", _preview(payload))
    oprid = document.get("oprid")
    if not isinstance(oprid, str) or len(oprid) != OPRID_LENGTH:
        raise InvalidReply("bad oprid", _preview(payload))
    code = document.get("code")
    if code not in ("01", "02"):
        raise InvalidReply("bad code", _preview(payload))
    meter_id = document.get("id")
    if meter_id is not None and not is_valid_meter_id(meter_id):
        raise InvalidReply("bad meter id", _preview(payload))
    msg = document.get("msg")
    if msg is not None and not isinstance(msg, str):
        msg = json.dumps(msg)[:200]
    return Reply(oprid=oprid, code=code, meter_id=meter_id, msg=msg[:200] if msg else msg)


def parse_meter_time(value: object) -> datetime | None:
    """A meter's clock reading as a naive local datetime, or None when unusable.

    The clean topics carry ISO 8601 without a zone (the meter knows none); the
    raw ``YYYYMMDDhhmmss`` form is accepted too.
    """
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        if len(value) == 14 and value.isdigit():
            return datetime.strptime(value, METER_TIME_FORMAT)
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone().replace(tzinfo=None)
    return parsed


def parse_reading_time(payload: bytes) -> datetime | None:
    """The meter's clock from a clean reading ``{"id", "time", …}``; None when absent or bad."""
    if len(payload) > MAX_READING_BYTES:
        return None
    try:
        document = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(document, dict):
        return None
    return parse_meter_time(document.get("time"))


def clock_drift_seconds(meter_time: datetime, local_now: datetime) -> float:
    """How far the meter's clock is ahead of (positive) or behind (negative) ours."""
    return (meter_time - local_now).total_seconds()


def clock_needs_setting(meter_time: datetime, local_now: datetime, max_drift_seconds: float,
                        last_clock_command_at: float | None, now: float,
                        min_interval: float = CLOCK_COMMAND_MIN_INTERVAL) -> bool:
    """Whether to send a clock command: drift beyond the limit, and none sent within the hour."""
    if abs(clock_drift_seconds(meter_time, local_now)) <= max_drift_seconds:
        return False
    return last_clock_command_at is None or now - last_clock_command_at >= min_interval


def meters_to_configure(known: Iterable[str], offline: Iterable[str], settings: MeterSettings) -> list[str]:
    """The meters a configuration push goes to: known, not excluded, not known to be offline."""
    offline_set = set(offline)
    return sorted(m for m in known if m not in settings.exclude and m not in offline_set)


class SlotView(NamedTuple):
    """The latest command of one meter and kind, as the configuration status sees it."""

    status: SlotStatus
    value: str      # the interval it set
    attempt: int    # 0 for the first send, n for the n-th retry


# What a meter's command is doing, for its configuration status.
_SLOT_SENDING = frozenset({SlotStatus.QUEUED, SlotStatus.WAITING})
_SLOT_UNANSWERED = frozenset({SlotStatus.RETRY_SCHEDULED, SlotStatus.GAVE_UP})
_SLOT_REFUSED = frozenset({SlotStatus.FAILED, SlotStatus.REFUSED})


def config_state_of(slots: Sequence[SlotView | None], configured: Sequence[str]) -> ConfigState | None:
    """The configuration status of a meter from its latest interval commands (one per kind, in order).

    ``configured`` are the intervals the configuration gives the meter now.
    Most telling first:

    - ``refused``: a command was answered ``code 02``, or the internal broker
      refused it (its ACL: the meter never got it, an ERROR says so);
    - ``no_reply``: a command went unanswered (an ALERT), and no answer came
      since, retries in flight included;
    - ``pending``: a command is queued or awaits its reply;
    - ``applied``: the meter acknowledged both intervals configured now.

    None otherwise, and the last status stands: a meter never commanded
    (excluded, offline since it was discovered), commands dropped when it went
    away, or intervals it acknowledged that are no longer the configured ones
    (it was away at the save and gets the new ones when heard from again).
    """
    if not slots or any(slot is None for slot in slots):
        return None
    present = [slot for slot in slots if slot is not None]
    if any(slot.status in _SLOT_REFUSED for slot in present):
        return ConfigState.REFUSED
    if any(slot.status in _SLOT_UNANSWERED or (slot.status in _SLOT_SENDING and slot.attempt > 0)
           for slot in present):
        return ConfigState.NO_REPLY
    if any(slot.status in _SLOT_SENDING for slot in present):
        return ConfigState.PENDING
    if all(slot.status is SlotStatus.ACKED for slot in present) and [
            slot.value for slot in present] == list(configured):
        return ConfigState.APPLIED
    return None


# --- events: what the daemon logs ------------------------------------------------


@dataclass(frozen=True)
class Discovered:
    """A meter id seen for the first time."""

    meter_id: str
    source: str       # availability, seconds or minutes
    excluded: bool
    offline: bool


@dataclass(frozen=True)
class WentOffline:
    """A known meter's availability turned ``offline``."""

    meter_id: str


@dataclass(frozen=True)
class BackOnline:
    """A meter seen again after being offline: it is configured again."""

    meter_id: str


@dataclass(frozen=True)
class ClockDrift:
    """A live reading whose time is too far from ours: a clock command follows."""

    meter_id: str
    meter_time: datetime
    drift_seconds: float


@dataclass(frozen=True)
class Acked:
    """``code 01`` within the timeout."""

    command: Command
    latency: float


@dataclass(frozen=True)
class Failed:
    """``code 02``: the meter refused. Not retried: it would refuse again."""

    command: Command
    msg: str | None
    latency: float


@dataclass(frozen=True)
class NoReply:
    """No reply within the timeout: an ALERT. ``retry_in`` is None after the last retry."""

    command: Command
    timeout: float
    retry_in: float | None
    retries: int      # how many retries the policy allows


@dataclass(frozen=True)
class LateReply:
    """A reply to a command that had already timed out (and been alerted)."""

    command: Command
    code: str
    msg: str | None
    latency: float
    stopped_retries: bool


@dataclass(frozen=True)
class Retrying:
    """A retry of a command that got no reply has been queued."""

    command: Command
    retries: int


@dataclass(frozen=True)
class Superseded:
    """A newer command for the same meter and kind replaced a pending one."""

    command: Command


@dataclass(frozen=True)
class Cancelled:
    """A pending command or retry dropped: its meter is now excluded or offline."""

    command: Command
    reason: str


@dataclass(frozen=True)
class Deferred:
    """Nothing sent to a meter that is away (silent beyond its limit); it is configured when heard again."""

    meter_id: str
    what: str            # "the new settings" or "the retries"
    silent_for: float    # seconds since the sender last heard from it
    limit: float         # the silence limit it was judged by


@dataclass(frozen=True)
class RejectedReply:
    """A reply that could not be used; counted and logged rate-limited."""

    reason: str
    detail: str


@dataclass(frozen=True)
class IgnoredReply:
    """A valid reply nobody waits for any more: a duplicate, or to a superseded command."""

    command: Command
    outcome: CommandOutcome


Event = (Discovered | WentOffline | BackOnline | ClockDrift | Acked | Failed | NoReply | LateReply
         | Retrying | Superseded | Cancelled | Deferred | RejectedReply | IgnoredReply)


# --- the tracker -------------------------------------------------------------------


@dataclass
class _Pending:
    """A command not yet answered: queued (``deadline`` None) or sent and awaiting its reply."""

    command: Command
    sent_at: float | None = None
    deadline: float | None = None
    timeout: float = 0.0


@dataclass
class _Finished:
    """A command no longer pending, remembered to classify late or duplicate replies."""

    command: Command
    outcome: CommandOutcome
    sent_at: float | None
    deadline: float | None


@dataclass
class _Slot:
    """The latest command for one meter and kind, and where it stands."""

    status: SlotStatus
    oprid: str
    value: str
    attempt: int
    retry_token: int = 0


@dataclass
class _Meter:
    """What the tracker knows about one meter."""

    last_heard: float                 # when the sender last heard from it (or started listening again)
    offline: bool = False             # its availability says so
    needs_settings: bool = False      # settings were held back while it was away
    last_clock_command_at: float | None = None
    # The intervals it acknowledged last: its cadence may be that, not yet the configured one.
    acked_seconds: int | None = None
    acked_minutes: int | None = None


COUNTER_NAMES = (
    "sent",               # commands handed to the broker, retries and re-sends included, refused ones not
    "refused_by_broker",  # commands the broker refused (PUBACK reason ≥ 0x80): never reached a meter
    "acked",              # code 01 within the timeout
    "alerted",            # no reply within the timeout (each one an ALERT)
    "late",               # replies after the timeout
    "failed",             # code 02
    "retried",            # retries queued
    "rejected_replies",   # malformed, unknown oprid, wrong types, wrong meter
    "ignored_replies",    # duplicates and replies to superseded commands
    "superseded",
    "clock_commands",
    "discovered",
)


@dataclass
class CommandTracker:
    """The configuration flow's state: known meters, pending commands, deadlines, retries.

    Owned by one thread (the daemon's worker); every method takes the current
    monotonic time. Methods return the events to log; ``pop_outgoing`` hands
    out the commands to publish and ``mark_sent`` starts their reply deadline.
    ``silence_scale`` multiplies every silence limit (tests run meters faster
    than real time).
    """

    settings: MeterSettings
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    silence_scale: float = 1.0
    make_oprid: Callable[[], str] = new_oprid
    recent_limit: int = RECENT_COMMANDS_LIMIT
    _meters: dict[str, _Meter] = field(default_factory=dict, init=False)
    _slots: dict[tuple[str, CommandKind], _Slot] = field(default_factory=dict, init=False)
    _pending: dict[str, _Pending] = field(default_factory=dict, init=False)
    _recent: OrderedDict[str, _Finished] = field(default_factory=OrderedDict, init=False)
    _outbox: deque[str] = field(default_factory=deque, init=False)
    _deadlines: list[tuple[float, int, str]] = field(default_factory=list, init=False)
    _retries: list[tuple[float, int, str, CommandKind, int]] = field(default_factory=list, init=False)
    _sequence: int = field(default=0, init=False)
    _counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTER_NAMES, 0), init=False)
    # Meters whose commands changed since ``take_touched``: their configuration status may have.
    _touched: dict[str, None] = field(default_factory=dict, init=False)

    # -- what the daemon reads

    def counters(self) -> dict[str, int]:
        """A copy of the counters plus ``pending`` (commands queued or awaiting a reply).

        The key set never changes, so another thread may call this safely.
        """
        snapshot = dict(self._counts)
        snapshot["pending"] = len(self._pending)
        return snapshot

    def known_meters(self) -> frozenset[str]:
        """Every meter id seen, excluded ones included."""
        return frozenset(self._meters)

    def offline_meters(self) -> frozenset[str]:
        """The known meters whose availability is ``offline``."""
        return frozenset(m for m, state in self._meters.items() if state.offline)

    def silence_limit(self, meter_id: str) -> float:
        """How long this meter may be silent and still be online: 2.5 of its shortest interval.

        Per kind the longer of the configured interval and the one it last
        acknowledged: until it acknowledges a shorter one, it still uses the old.
        """
        meter = self._meters.get(meter_id)
        seconds = self.settings.seconds_interval(meter_id)
        minutes = self.settings.minutes_interval(meter_id)
        if meter is not None:
            seconds = max(seconds, meter.acked_seconds or 0)
            minutes = max(minutes, meter.acked_minutes or 0)
        return self.silence_scale * silence_limit(seconds, minutes)

    def is_away(self, meter_id: str, now: float) -> bool:
        """Whether a known meter is not online now: ``offline``, or silent for longer than its limit."""
        meter = self._meters[meter_id]
        return meter.offline or now - meter.last_heard > self.silence_limit(meter_id)

    def away_meters(self, now: float) -> frozenset[str]:
        """The known meters not online now."""
        return frozenset(m for m in self._meters if self.is_away(m, now))

    def slot_status(self, meter_id: str, kind: CommandKind) -> SlotStatus | None:
        """Where the latest command of this meter and kind stands; None if never sent."""
        slot = self._slots.get((meter_id, kind))
        return slot.status if slot else None

    def config_state(self, meter_id: str) -> ConfigState | None:
        """The meter's configuration status from its interval commands (``config_state_of``).

        None for an excluded meter: it has no status (it is cleared).
        """
        if meter_id in self.settings.exclude:
            return None
        slots = [self._slots.get((meter_id, kind)) for kind in INTERVAL_KINDS]
        return config_state_of([SlotView(s.status, s.value, s.attempt) if s else None for s in slots],
                               [interval_value(self.settings, meter_id, kind) for kind in INTERVAL_KINDS])

    def take_touched(self) -> list[str]:
        """The meters whose commands changed (or that were discovered or excluded) since the last call.

        Their configuration status may have changed: the daemon looks again
        at these only, so a status costs nothing while nothing happens.
        """
        touched = list(self._touched)
        self._touched.clear()
        return touched

    def next_wakeup(self) -> float | None:
        """When ``tick`` next has something to do (a deadline or a retry), or None."""
        self._prune_heaps()
        times = [heap[0][0] for heap in (self._deadlines, self._retries) if heap]
        return min(times) if times else None

    # -- what the daemon feeds in

    def observe_availability(self, meter_id: str, state: str, now: float, retained: bool = False) -> list[Event]:
        """A meter's ``online``/``offline`` state from the central broker.

        A live ``online`` means the proxy just heard the meter: it counts as
        hearing from it. A retained one (delivered on subscribing) may be old:
        it discovers a meter, and ends an ``offline``, but does not refresh
        the time the meter was last heard.
        """
        meter = self._meters.get(meter_id)
        if meter is None:
            offline = state == "offline"
            self._meters[meter_id] = _Meter(last_heard=now, offline=offline)
            return self._discover(meter_id, AVAILABILITY, offline, now)
        if state == "offline" and not meter.offline:
            meter.offline = True
            return [WentOffline(meter_id), *self._cancel_meter(meter_id, "meter went offline", unsent_only=True)]
        if state == "online" and (meter.offline or not retained):
            return self._heard(meter_id, now)
        return []

    def observe_reading(self, meter_id: str, leaf: str, meter_time: datetime | None, retained: bool,
                        now: float, local_now: datetime) -> list[Event]:
        """A clean reading from the central broker.

        A retained reading may be hours old: it discovers its meter but neither
        brings an offline meter back nor says anything about its clock now.
        """
        events: list[Event] = []
        meter = self._meters.get(meter_id)
        if meter is None:
            meter = self._meters[meter_id] = _Meter(last_heard=now)
            events += self._discover(meter_id, leaf, False, now)
        elif not retained:
            events += self._heard(meter_id, now)
        if retained or meter_time is None or not self.settings.clock_sync or meter_id in self.settings.exclude:
            return events
        if clock_needs_setting(meter_time, local_now, self.settings.max_clock_drift_seconds,
                               meter.last_clock_command_at, now):
            meter.last_clock_command_at = now
            self._counts["clock_commands"] += 1
            events.append(ClockDrift(meter_id, meter_time, clock_drift_seconds(meter_time, local_now)))
            events += self._issue(meter_id, CommandKind.CLOCK, meter_time_text(local_now), 0)[1]
        return events

    def apply_settings(self, settings: MeterSettings, now: float) -> list[Event]:
        """A new, valid configuration (or a reload): every meter online now is configured again.

        A meter away gets nothing now (a ``Deferred`` each), and the current
        settings when it is next heard from.
        """
        events: list[Event] = []
        # Who is away is judged with the old settings: the cadences the meters have now.
        away = {m: self.silence_limit(m) for m in self.away_meters(now)}
        self.settings = settings
        for meter_id in sorted(self._meters.keys() & settings.exclude):
            self._touch(meter_id)
            events += self._cancel_meter(meter_id, "meter is now excluded", unsent_only=False)
        for meter_id in meters_to_configure(self._meters, self.offline_meters(), settings):
            if meter_id in away:
                events += self._defer(meter_id, "the new settings", now, away[meter_id])
            else:
                events += self._configure(meter_id, now)
        return events

    def resume_listening(self, now: float) -> None:
        """The sender (re)subscribed on the central broker: silence while it was deaf says nothing.

        Without this, every meter would look away after an outage of our own
        central connection, and be configured again at its next reading.
        """
        for meter in self._meters.values():
            meter.last_heard = max(meter.last_heard, now)

    def observe_reply(self, payload: bytes, now: float) -> list[Event]:
        """A message on a reply topic, received at ``now``: ack, failure, late, or rejected."""
        try:
            reply = parse_reply(payload)
        except InvalidReply as invalid:
            return [self._reject(invalid.reason, invalid.detail)]
        pending = self._pending.get(reply.oprid)
        if pending is not None:
            if reply.meter_id is not None and reply.meter_id != pending.command.meter_id:
                return [self._reject("meter id does not match", f"{reply.meter_id} answered {reply.oprid}")]
            if pending.deadline is not None and now > pending.deadline:
                # Due but not yet ticked: the timeout comes first, then this is late.
                events = self._time_out(reply.oprid, pending, now)
                return events + self._late(reply, now)
            return self._answer(reply, pending, now)
        finished = self._recent.get(reply.oprid)
        if finished is None:
            return [self._reject("unknown oprid", reply.oprid)]
        if reply.meter_id is not None and reply.meter_id != finished.command.meter_id:
            return [self._reject("meter id does not match", f"{reply.meter_id} answered {reply.oprid}")]
        if finished.outcome is CommandOutcome.TIMED_OUT:
            return self._late(reply, now)
        self._counts["ignored_replies"] += 1
        return [IgnoredReply(finished.command, finished.outcome)]

    def pop_outgoing(self, local_now: datetime) -> Command | None:
        """The next queued command to publish, or None. Call ``mark_sent`` once it is handed over.

        The daemon calls this only while connected to the internal broker, so a
        command never times out for being stuck in our own queue. A clock
        command gets the time of the moment it actually goes out.
        """
        while self._outbox:
            oprid = self._outbox.popleft()
            pending = self._pending.get(oprid)
            if pending is None or pending.deadline is not None:
                continue  # superseded or cancelled meanwhile
            if pending.command.kind is CommandKind.CLOCK:
                pending.command = replace(pending.command, value=meter_time_text(local_now))
            return pending.command
        return None

    def mark_sent(self, command: Command, now: float) -> None:
        """``command`` was handed to the broker at ``now``: its reply deadline starts."""
        pending = self._pending.get(command.oprid)
        if pending is None:
            return
        pending.sent_at = now
        pending.timeout = self.settings.ack_timeout_seconds
        pending.deadline = now + pending.timeout
        heapq.heappush(self._deadlines, (pending.deadline, self._next(), command.oprid))
        slot = self._slots.get((command.meter_id, command.kind))
        if slot is not None and slot.oprid == command.oprid:
            slot.status = SlotStatus.WAITING
            slot.value = command.value
            self._touch(command.meter_id)
        self._counts["sent"] += 1

    def refused_by_broker(self, command: Command) -> None:
        """The broker refused ``command`` (its ACL): it never reached the meter.

        So it was not sent after all: no reply is awaited and no alert can
        follow. It is not retried either (the broker would refuse it again);
        the meter coming back online or a new configuration issue new commands.
        Called once per refused hand-over, which ``mark_sent`` had counted.
        """
        self._counts["sent"] -= 1
        self._counts["refused_by_broker"] += 1
        pending = self._pending.pop(command.oprid, None)
        if pending is None:
            return  # superseded, answered or timed out meanwhile: that outcome stands
        self._remember(pending, CommandOutcome.REFUSED)
        slot = self._slots.get((command.meter_id, command.kind))
        if slot is not None and slot.oprid == command.oprid:
            slot.status = SlotStatus.REFUSED
            self._touch(command.meter_id)

    def connection_lost(self) -> int:
        """The internal broker went away: commands awaiting replies go back to the front of the queue.

        Their replies may have been lost with the connection, so they are sent
        again, with the same oprid, when it comes back, and their deadlines start
        then: an outage of our own broker never raises an alert. Returns how many.
        """
        awaiting = sorted((p for p in self._pending.values() if p.deadline is not None),
                          key=lambda p: p.sent_at or 0.0)
        for pending in awaiting:
            pending.deadline = None
            slot = self._slots.get((pending.command.meter_id, pending.command.kind))
            if slot is not None and slot.oprid == pending.command.oprid:
                slot.status = SlotStatus.QUEUED
                self._touch(pending.command.meter_id)
        self._outbox.extendleft(p.command.oprid for p in reversed(awaiting))
        return len(awaiting)

    def tick(self, now: float) -> list[Event]:
        """Time out the commands whose deadline has passed and queue the retries that are due."""
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, oprid = heapq.heappop(self._deadlines)
            pending = self._pending.get(oprid)
            if pending is not None and pending.deadline == deadline:
                events += self._time_out(oprid, pending, now)
        while self._retries and self._retries[0][0] <= now:
            _, _, meter_id, kind, token = heapq.heappop(self._retries)
            slot = self._slots.get((meter_id, kind))
            if slot is None or slot.retry_token != token or slot.status is not SlotStatus.RETRY_SCHEDULED:
                continue
            if self.is_away(meter_id, now):
                # Its other retries go too: one line per meter.
                slot.status = SlotStatus.CANCELLED
                self._touch(meter_id)
                events += self._defer(meter_id, "the retries", now, self.silence_limit(meter_id))
                continue
            self._counts["retried"] += 1
            retry, superseded = self._issue(meter_id, kind, interval_value(self.settings, meter_id, kind),
                                            slot.attempt + 1)
            events += [*superseded, Retrying(retry, len(self.retry_delays))]
        return events

    # -- internals

    def _next(self) -> int:
        self._sequence += 1
        return self._sequence

    def _touch(self, meter_id: str) -> None:
        self._touched[meter_id] = None

    def _discover(self, meter_id: str, source: str, offline: bool, now: float) -> list[Event]:
        self._counts["discovered"] += 1
        self._touch(meter_id)  # an excluded one: its status (from before the exclusion) is cleared
        events: list[Event] = [Discovered(meter_id, source, meter_id in self.settings.exclude, offline)]
        if not offline:
            events += self._configure(meter_id, now)
        return events

    def _heard(self, meter_id: str, now: float) -> list[Event]:
        """A live sign of a known meter: back after being away, or held-back settings, configure it."""
        meter = self._meters[meter_id]
        was_away = self.is_away(meter_id, now)
        meter.offline = False
        meter.last_heard = now
        if was_away:
            return [BackOnline(meter_id), *self._configure(meter_id, now)]
        if meter.needs_settings:
            return self._configure(meter_id, now)
        return []

    def _defer(self, meter_id: str, what: str, now: float, limit: float) -> list[Event]:
        """Send a meter away nothing now (queued commands and retries dropped); configure it when heard again."""
        meter = self._meters[meter_id]
        meter.needs_settings = meter_id not in self.settings.exclude
        events: list[Event] = [Deferred(meter_id, what, now - meter.last_heard, limit)]
        return events + self._cancel_meter(meter_id, "meter is away", unsent_only=True)

    def _configure(self, meter_id: str, now: float) -> list[Event]:
        """Queue both interval commands for a meter (nothing for an excluded one)."""
        if meter_id in self.settings.exclude:
            return []
        self._meters[meter_id].needs_settings = False
        events: list[Event] = []
        for kind in INTERVAL_KINDS:
            events += self._issue(meter_id, kind, interval_value(self.settings, meter_id, kind), 0)[1]
        return events

    def _issue(self, meter_id: str, kind: CommandKind, value: str, attempt: int) -> tuple[Command, list[Event]]:
        """Queue a command, superseding any pending one of the same meter and kind."""
        events: list[Event] = []
        key = (meter_id, kind)
        previous = self._slots.get(key)
        retry_token = 0
        if previous is not None:
            retry_token = previous.retry_token + 1  # invalidates a scheduled retry
            old = self._pending.pop(previous.oprid, None)
            if old is not None:
                self._remember(old, CommandOutcome.SUPERSEDED)
                self._counts["superseded"] += 1
                events.append(Superseded(old.command))
        oprid = self.make_oprid()
        command = Command(meter_id=meter_id, kind=kind, value=value, oprid=oprid, attempt=attempt)
        self._pending[oprid] = _Pending(command)
        self._outbox.append(oprid)
        self._slots[key] = _Slot(SlotStatus.QUEUED, oprid, value, attempt, retry_token)
        self._touch(meter_id)
        self._compact_outbox()
        return command, events

    def _answer(self, reply: Reply, pending: _Pending, now: float) -> list[Event]:
        del self._pending[reply.oprid]
        command = pending.command
        latency = now - pending.sent_at if pending.sent_at is not None else 0.0
        slot = self._slots.get((command.meter_id, command.kind))
        ok = reply.code == "01"
        if slot is not None and slot.oprid == reply.oprid:
            slot.status = SlotStatus.ACKED if ok else SlotStatus.FAILED
            self._touch(command.meter_id)
        self._remember(pending, CommandOutcome.ACKED if ok else CommandOutcome.FAILED)
        if ok:
            self._counts["acked"] += 1
            self._accepted(command)
            return [Acked(command, latency)]
        self._counts["failed"] += 1
        return [Failed(command, reply.msg, latency)]

    def _accepted(self, command: Command) -> None:
        """The meter now uses this interval: its silence limit follows."""
        meter = self._meters.get(command.meter_id)
        if meter is None:
            return
        if command.kind is CommandKind.SECONDS_INTERVAL:
            meter.acked_seconds = int(command.value)
        elif command.kind is CommandKind.MINUTES_INTERVAL:
            meter.acked_minutes = int(command.value)

    def _time_out(self, oprid: str, pending: _Pending, now: float) -> list[Event]:
        del self._pending[oprid]
        self._remember(pending, CommandOutcome.TIMED_OUT)
        self._counts["alerted"] += 1
        command = pending.command
        key = (command.meter_id, command.kind)
        slot = self._slots.get(key)
        retry_in: float | None = None
        if slot is not None and slot.oprid == oprid:
            self._touch(command.meter_id)
            if command.kind is not CommandKind.CLOCK and command.attempt < len(self.retry_delays):
                retry_in = self.retry_delays[command.attempt]
                slot.status = SlotStatus.RETRY_SCHEDULED
                slot.retry_token += 1
                heapq.heappush(self._retries, (now + retry_in, self._next(), command.meter_id, command.kind,
                                               slot.retry_token))
            else:
                slot.status = SlotStatus.GAVE_UP
        return [NoReply(command, pending.timeout, retry_in, len(self.retry_delays))]

    def _late(self, reply: Reply, now: float) -> list[Event]:
        finished = self._recent[reply.oprid]
        command = finished.command
        latency = now - finished.sent_at if finished.sent_at is not None else 0.0
        finished.outcome = CommandOutcome.LATE
        self._counts["late"] += 1
        ok = reply.code == "01"
        if ok:
            self._accepted(command)
        else:
            self._counts["failed"] += 1
        stopped = False
        slot = self._slots.get((command.meter_id, command.kind))
        # The meter did get this value after all: the retries for it are moot.
        if slot is not None and slot.value == command.value:
            retry_in_flight = slot.attempt > 0 and slot.oprid in self._pending
            if slot.status in (SlotStatus.RETRY_SCHEDULED, SlotStatus.GAVE_UP) or retry_in_flight:
                stopped = slot.status is SlotStatus.RETRY_SCHEDULED or retry_in_flight
                if retry_in_flight:
                    self._remember(self._pending.pop(slot.oprid), CommandOutcome.CANCELLED)
                slot.retry_token += 1
                slot.status = SlotStatus.ACKED if ok else SlotStatus.FAILED
                self._touch(command.meter_id)
        return [LateReply(command, reply.code, reply.msg, latency, stopped)]

    def _cancel_meter(self, meter_id: str, reason: str, unsent_only: bool) -> list[Event]:
        """Drop a meter's scheduled retries and queued commands (and, if not ``unsent_only``, sent ones)."""
        events: list[Event] = []
        for kind in CommandKind:
            slot = self._slots.get((meter_id, kind))
            if slot is None:
                continue
            if slot.status is SlotStatus.RETRY_SCHEDULED:
                slot.retry_token += 1
                slot.status = SlotStatus.CANCELLED
                self._touch(meter_id)
            pending = self._pending.get(slot.oprid)
            if pending is not None and (pending.deadline is None or not unsent_only):
                del self._pending[slot.oprid]
                self._remember(pending, CommandOutcome.CANCELLED)
                slot.status = SlotStatus.CANCELLED
                self._touch(meter_id)
                events.append(Cancelled(pending.command, reason))
        return events

    def _reject(self, reason: str, detail: str) -> RejectedReply:
        self._counts["rejected_replies"] += 1
        return RejectedReply(reason, detail)

    def _remember(self, pending: _Pending, outcome: CommandOutcome) -> None:
        self._recent[pending.command.oprid] = _Finished(pending.command, outcome, pending.sent_at, pending.deadline)
        self._recent.move_to_end(pending.command.oprid)
        while len(self._recent) > self.recent_limit:
            self._recent.popitem(last=False)

    def _prune_heaps(self) -> None:
        """Drop heap entries that no longer mean anything, so the next wake-up is exact."""
        while self._deadlines:
            deadline, _, oprid = self._deadlines[0]
            pending = self._pending.get(oprid)
            if pending is not None and pending.deadline == deadline:
                break
            heapq.heappop(self._deadlines)
        while self._retries:
            _, _, meter_id, kind, token = self._retries[0]
            slot = self._slots.get((meter_id, kind))
            if slot is not None and slot.retry_token == token and slot.status is SlotStatus.RETRY_SCHEDULED:
                break
            heapq.heappop(self._retries)

    def _compact_outbox(self) -> None:
        """Superseded commands leave stale ids in the queue; drop them before they pile up."""
        if len(self._outbox) > 2 * len(self._pending) + 1000:
            self._outbox = deque(o for o in self._outbox if o in self._pending
                                 and self._pending[o].deadline is None)

