"""Pure bookkeeping of which meters are online, for ``<main>/<id>/availability``.

A meter is online from its first valid packet until it has been silent for
``OFFLINE_FACTOR`` times its most frequent upload interval: long enough that
one lost message does not flap the state, short enough that Home Assistant
shows a dead meter as unavailable within a few intervals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

OFFLINE_FACTOR = 2.5


def silence_limit(seconds_interval: int, minutes_interval: int) -> float:
    """Seconds of silence after which a meter with these intervals is offline."""
    return OFFLINE_FACTOR * min(seconds_interval, minutes_interval * 60)


class MeterAvailability:
    """Last-seen times and online states; thread-safe (paho thread + main loop).

    ``max_meters`` bounds the memory: beyond it the longest-silent meter is
    forgotten (it is reported offline by then in any installation that size).
    ``shortest_limit`` is the smallest silence limit of any meter: the meters
    are kept in the order they were last seen, so the check for silent ones
    stops at the first meter heard from more recently than that, instead of
    visiting every meter twice a second.

    The set kept is of the few offline meters, not of the many online ones:
    with 100,000 meters that is 4 MB less.
    """

    def __init__(self, limit_for: Callable[[str], float], shortest_limit: float,
                 max_meters: int = 200_000) -> None:
        self._limit_for = limit_for
        self._shortest_limit = shortest_limit
        self._max_meters = max_meters
        self._last_seen: dict[str, float] = {}  # oldest first
        self._offline: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, meter_id: str, now: float) -> bool:
        """Record a packet from ``meter_id``; True when it just came online."""
        with self._lock:
            known = self._last_seen.pop(meter_id, None) is not None
            self._last_seen[meter_id] = now  # re-inserted: the dict stays ordered by last seen
            if len(self._last_seen) > self._max_meters:
                oldest = next(iter(self._last_seen))
                del self._last_seen[oldest]
                self._offline.discard(oldest)
            if known and meter_id not in self._offline:
                return False
            self._offline.discard(meter_id)
            return True

    def restore(self, meter_id: str, last_seen: float, online: bool) -> None:
        """A meter known from before a restart: its last reading at ``last_seen``, its state then.

        Known meters are kept in the order they were last seen: restore them
        oldest first, before any reading arrives. A meter learnt later (from
        the central broker's retained topics) is restored with the proxy's
        start as its last-seen time; appended after meters heard since, it is
        checked at most the few seconds it took to learn of it late. A meter
        heard from since ``last_seen`` is left as it is; one known but not
        heard from since takes the state given (the broker's retained state
        is the truth about what consumers were last told).
        """
        with self._lock:
            known = self._last_seen.get(meter_id)
            if known is not None:
                if known <= last_seen:
                    if online:
                        self._offline.discard(meter_id)
                    else:
                        self._offline.add(meter_id)
                return
            self._last_seen[meter_id] = last_seen
            if not online:
                self._offline.add(meter_id)
            if len(self._last_seen) > self._max_meters:
                oldest = next(iter(self._last_seen))
                del self._last_seen[oldest]
                self._offline.discard(oldest)

    def forget(self, meter_id: str) -> None:
        """Stop tracking a meter (it was excluded): no state is published for it any more."""
        with self._lock:
            self._last_seen.pop(meter_id, None)
            self._offline.discard(meter_id)

    def set_limits(self, limit_for: Callable[[str], float], shortest_limit: float) -> None:
        """New silence limits (the configured intervals changed): they apply from the next check."""
        with self._lock:
            self._limit_for = limit_for
            self._shortest_limit = shortest_limit

    def last_seen(self, meter_id: str) -> float | None:
        """When a meter's last reading came (None: not known)."""
        with self._lock:
            return self._last_seen.get(meter_id)

    def snapshot(self) -> list[tuple[str, float, bool]]:
        """Every known meter with its last-seen time and whether it is online, oldest first (to persist)."""
        with self._lock:
            return [(meter_id, seen, meter_id not in self._offline) for meter_id, seen in self._last_seen.items()]

    def went_offline(self, now: float) -> list[str]:
        """The meters silent for longer than their limit since the last call; now offline."""
        offline = []
        with self._lock:
            for meter_id, last_seen in self._last_seen.items():
                silence = now - last_seen
                if silence <= self._shortest_limit:
                    break  # everyone after this one was heard from even more recently
                if meter_id not in self._offline and silence > self._limit_for(meter_id):
                    offline.append(meter_id)
            self._offline.update(offline)
        return sorted(offline)

    def __len__(self) -> int:
        """How many meters are tracked (online or recently offline)."""
        return len(self._last_seen)

    def online_count(self) -> int:
        """How many meters are online now, without listing them (the stats count them every interval)."""
        with self._lock:
            return len(self._last_seen) - len(self._offline)  # the offline ones are among those tracked

    def online(self) -> list[str]:
        """The meters online now."""
        with self._lock:
            return sorted(meter_id for meter_id in self._last_seen if meter_id not in self._offline)
