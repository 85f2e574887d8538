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
    forgotten, an offline one first (it is reported offline by then in any
    installation that size). ``shortest_limit`` is the smallest silence limit
    of any meter: the online meters are kept in the order they were last
    seen, so the check for silent ones stops at the first meter heard from
    more recently than that, instead of visiting every meter twice a second.
    Offline meters are kept apart, so the check never walks them: a large
    fleet gone silent (a site's network down) costs it nothing.
    """

    def __init__(self, limit_for: Callable[[str], float], shortest_limit: float,
                 max_meters: int = 200_000) -> None:
        self._limit_for = limit_for
        self._shortest_limit = shortest_limit
        self._max_meters = max_meters
        self._online: dict[str, float] = {}  # last seen, oldest first
        self._offline: dict[str, float] = {}  # last seen, in the order they went offline
        # Online meters out of their place in ``_online`` (restored online after they were offline,
        # appended with an older last-seen time than those before them): checked one by one.
        self._unordered: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, meter_id: str, now: float) -> bool:
        """Record a packet from ``meter_id``; True when it just came online."""
        with self._lock:
            came_back = self._offline.pop(meter_id, None) is not None
            if came_back and not self._offline:
                self._offline = {}  # the last one back: a dict emptied key by key keeps its largest table
            known = came_back or self._online.pop(meter_id, None) is not None
            self._online[meter_id] = now  # re-inserted: the dict stays ordered by last seen
            if self._unordered:
                self._unordered.discard(meter_id)
            if not known:
                self._bound()
            return not known or came_back

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
            known = self._online.get(meter_id, self._offline.get(meter_id))
            if known is not None:
                if known <= last_seen:
                    if online and meter_id in self._offline:
                        self._online[meter_id] = self._offline.pop(meter_id)
                        self._unordered.add(meter_id)
                    elif not online and meter_id in self._online:
                        self._offline[meter_id] = self._online.pop(meter_id)
                        self._unordered.discard(meter_id)
                return
            (self._online if online else self._offline)[meter_id] = last_seen
            self._bound()

    def _bound(self) -> None:
        """Forget the longest-silent meters beyond ``max_meters`` (caller holds the lock): offline ones first."""
        while len(self._online) + len(self._offline) > self._max_meters:
            if self._offline:
                del self._offline[next(iter(self._offline))]
            else:
                oldest = next(iter(self._online))
                del self._online[oldest]
                self._unordered.discard(oldest)

    def forget(self, meter_id: str) -> None:
        """Stop tracking a meter (it was excluded): no state is published for it any more."""
        with self._lock:
            self._online.pop(meter_id, None)
            self._offline.pop(meter_id, None)
            self._unordered.discard(meter_id)

    def set_limits(self, limit_for: Callable[[str], float], shortest_limit: float) -> None:
        """New silence limits (the configured intervals changed): they apply from the next check."""
        with self._lock:
            self._limit_for = limit_for
            self._shortest_limit = shortest_limit

    def last_seen(self, meter_id: str) -> float | None:
        """When a meter's last reading came (None: not known)."""
        with self._lock:
            return self._online.get(meter_id, self._offline.get(meter_id))

    def snapshot(self) -> list[tuple[str, float, bool]]:
        """Every known meter with its last-seen time and whether it is online (to persist and list).

        The online meters oldest first, then the offline ones in the order
        they went offline; the file keeps no order (its reader sorts).
        """
        with self._lock:
            return ([(meter_id, seen, True) for meter_id, seen in self._online.items()]
                    + [(meter_id, seen, False) for meter_id, seen in self._offline.items()])

    def went_offline(self, now: float) -> list[str]:
        """The meters silent for longer than their limit since the last call; now offline."""
        offline = []
        with self._lock:
            for meter_id, last_seen in self._online.items():
                silence = now - last_seen
                if silence <= self._shortest_limit:
                    break  # everyone after this one was heard from even more recently
                if silence > self._limit_for(meter_id):
                    offline.append(meter_id)
            if self._unordered:
                found = set(offline)
                offline += [meter_id for meter_id in self._unordered if meter_id not in found
                            and now - self._online[meter_id] > self._limit_for(meter_id)]
            for meter_id in offline:
                self._offline[meter_id] = self._online.pop(meter_id)
                self._unordered.discard(meter_id)
        return sorted(offline)

    def __len__(self) -> int:
        """How many meters are tracked (online or recently offline)."""
        return len(self._online) + len(self._offline)

    def online_count(self) -> int:
        """How many meters are online now, without listing them (the stats count them every interval)."""
        return len(self._online)

    def online(self) -> list[str]:
        """The meters online now."""
        with self._lock:
            return sorted(self._online)
