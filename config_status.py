"""The retained configuration status per meter: its payload, and when to publish it. Pure: no I/O.

The config sender publishes ``<main>/<id>/config_status`` on the central
broker, retained, so that Home Assistant, ``kpm33b_status`` and an operator
see whether a meter took its intervals without reading the journal, across
restarts of everything::

    {"id": "33B1225950027", "upload_frequency_seconds": 30, "upload_frequency_minutes": 1,
     "state": "applied", "updated": "2026-01-12T16:39:00Z", "clock_offset_seconds": -1}

Which state a meter is in is decided from its commands by
``command_tracking.CommandTracker.config_state``; this module holds the
vocabulary, the builder and ``StatusBook``, which decides what is worth a
message. The rules (doc/configuration_flow.md explains them to operators):

- A status is published when its state or intervals change, never once per
  reading. ``updated`` is when that last happened.
- The clock offset (the meter's clock minus ours at its last live reading) is
  kept to whole seconds: the meters' clocks tick in seconds and the reading's
  transit adds a fraction, so finer figures would be noise. It alone causes a
  new message only when it moved by ``OFFSET_STEP`` (2 s: more than that
  jitter) since the one last published, and then at most once per
  ``OFFSET_INTERVAL`` (a minute) per meter; the first offset known after a
  status without one is published at once (once per meter and run). So a
  thousand meters reading every second cost nothing, and a clock that was
  just set shows within a minute.
- A meter that is excluded has its status cleared (an empty retained
  message), once per run: also at start-up, for a meter excluded while the
  sender was not running.
- Statuses wait in a set keyed by meter, so a meter whose state changes
  faster than the broker takes them costs one message, the latest: the set
  never holds more than one entry per meter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum

# The clock offset alone must move this far (seconds) to be published again …
OFFSET_STEP = 2.0
# … and no more often than this (seconds, per meter).
OFFSET_INTERVAL = 60.0


class ConfigState(Enum):
    """Where the last configuration push to a meter stands, as the status says it."""

    APPLIED = "applied"    # the meter acknowledged both intervals now configured
    PENDING = "pending"    # sent (or queued), its replies awaited
    NO_REPLY = "no_reply"  # an ALERT was raised: no reply within the timeout (retries may follow)
    REFUSED = "refused"    # the meter answered code 02, or the internal broker would not take the command


# The states in the order Home Assistant's enum sensor lists them.
CONFIG_STATES: tuple[str, ...] = tuple(state.value for state in ConfigState)


def iso_utc(wall_seconds: float) -> str:
    """Seconds since the epoch → ``2026-01-12T16:39:00Z``, as ``fleet.iso_utc`` writes ``last_seen``.

    Not imported from ``fleet``, which imports ``ha_discovery``: so that
    ``ha_discovery`` can import this module (``CONFIG_STATES``) without a cycle.
    """
    return datetime.fromtimestamp(round(wall_seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def round_offset(offset_seconds: float) -> int:
    """A clock offset as published: whole seconds (see the module's docstring)."""
    return round(offset_seconds)


def status_document(meter_id: str, state: ConfigState, seconds: int, minutes: int, updated: float,
                    clock_offset: int | None) -> dict[str, object]:
    """The status of one meter; ``updated`` is wall-clock seconds, ``clock_offset`` None when unknown."""
    return {
        "id": meter_id,
        "upload_frequency_seconds": seconds,
        "upload_frequency_minutes": minutes,
        "state": state.value,
        "updated": iso_utc(updated),
        "clock_offset_seconds": clock_offset,
    }


def encode_status(document: dict[str, object]) -> bytes:
    """The status as published: compact JSON."""
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(slots=True)
class _Status:
    """What was last decided for one meter, and the offset its last message carried."""

    state: ConfigState
    seconds: int
    minutes: int
    updated: float                       # wall clock, when the state or the intervals last changed
    published_offset: int | None = None  # the offset the last message carried
    published_at: float | None = None    # monotonic, when the last message was taken for publishing


@dataclass
class StatusBook:
    """The statuses of all meters, and which of them wait to be published.

    Owned by one thread (the config sender's worker). ``update`` and
    ``observe_offset`` record what happened; ``take`` hands out the messages
    due, built at that moment, so each carries the latest of everything.
    """

    offset_step: float = OFFSET_STEP
    offset_interval: float = OFFSET_INTERVAL
    _statuses: dict[str, _Status] = field(default_factory=dict, init=False)
    _offsets: dict[str, int] = field(default_factory=dict, init=False)  # the latest known, status or not
    _cleared: set[str] = field(default_factory=set, init=False)
    _due: dict[str, None] = field(default_factory=dict, init=False)     # an ordered set

    def update(self, meter_id: str, state: ConfigState | None, seconds: int, minutes: int, wall: float,
               excluded: bool = False) -> bool:
        """The meter's commands changed: record its state (None: no opinion, the last status stands).

        An excluded meter's status is cleared instead. Whether a message is
        now due for it.
        """
        if excluded:
            return self.clear(meter_id)
        if state is None:
            return False
        status = self._statuses.get(meter_id)
        if status is not None and (status.state, status.seconds, status.minutes) == (state, seconds, minutes):
            return False
        if status is None:
            self._statuses[meter_id] = _Status(state, seconds, minutes, wall)
        else:
            status.state, status.seconds, status.minutes, status.updated = state, seconds, minutes, wall
        self._cleared.discard(meter_id)
        self._due[meter_id] = None
        return True

    def observe_offset(self, meter_id: str, offset_seconds: float, now: float) -> bool:
        """A live reading showed the meter's clock ``offset_seconds`` from ours at ``now`` (monotonic).

        Whether a message is now due for it (see the module's docstring).
        """
        offset = round_offset(offset_seconds)
        self._offsets[meter_id] = offset
        status = self._statuses.get(meter_id)
        if status is None or meter_id in self._due:
            return False  # nothing to say it in yet, or the message due will carry it
        if status.published_offset is not None:
            if abs(offset - status.published_offset) < self.offset_step:
                return False
            if status.published_at is not None and now - status.published_at < self.offset_interval:
                return False
        self._due[meter_id] = None
        return True

    def clear(self, meter_id: str) -> bool:
        """Forget the meter's status and publish an empty one, unless already cleared in this run."""
        if meter_id in self._cleared:
            return False
        self._statuses.pop(meter_id, None)
        self._cleared.add(meter_id)
        self._due[meter_id] = None
        return True

    def again(self, meter_id: str) -> None:
        """Publish the meter's latest status (or clearing) again: the broker never answered the last one."""
        if meter_id in self._statuses or meter_id in self._cleared:
            self._due[meter_id] = None

    def due(self) -> int:
        """How many meters have a message waiting."""
        return len(self._due)

    def take(self, limit: int, now: float) -> list[tuple[str, bytes]]:
        """Up to ``limit`` messages due, oldest first: ``(meter id, payload)``; an empty payload clears."""
        taken: list[tuple[str, bytes]] = []
        while self._due and len(taken) < limit:
            meter_id = next(iter(self._due))
            del self._due[meter_id]
            status = self._statuses.get(meter_id)
            if status is None:
                taken.append((meter_id, b""))
                continue
            offset = self._offsets.get(meter_id)
            status.published_offset = offset
            status.published_at = now
            taken.append((meter_id, encode_status(status_document(meter_id, status.state, status.seconds,
                                                                  status.minutes, status.updated, offset))))
        return taken

    def state(self, meter_id: str) -> ConfigState | None:
        """The state last decided for a meter (None: none, or cleared)."""
        status = self._statuses.get(meter_id)
        return status.state if status else None
