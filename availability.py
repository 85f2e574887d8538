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
    """

    def __init__(self, limit_for: Callable[[str], float], max_meters: int = 200_000) -> None:
        self._limit_for = limit_for
        self._max_meters = max_meters
        self._last_seen: dict[str, float] = {}
        self._online: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, meter_id: str, now: float) -> bool:
        """Record a packet from ``meter_id``; True when it just came online."""
        with self._lock:
            self._last_seen.pop(meter_id, None)
            self._last_seen[meter_id] = now  # re-inserted: the dict stays ordered by last seen
            if len(self._last_seen) > self._max_meters:
                oldest = next(iter(self._last_seen))
                del self._last_seen[oldest]
                self._online.discard(oldest)
            if meter_id in self._online:
                return False
            self._online.add(meter_id)
            return True

    def went_offline(self, now: float) -> list[str]:
        """The meters silent for longer than their limit since the last call; now offline."""
        with self._lock:
            offline = [
                meter_id
                for meter_id in self._online
                if now - self._last_seen[meter_id] > self._limit_for(meter_id)
            ]
            self._online.difference_update(offline)
            return sorted(offline)

    def __len__(self) -> int:
        """How many meters are tracked (online or recently offline)."""
        return len(self._last_seen)

    def online(self) -> list[str]:
        """The meters online now."""
        with self._lock:
            return sorted(self._online)
