"""Pure bookkeeping of which meters are online, for ``<main>/<id>/availability``.

A meter is online from its first valid packet until it has been silent for
``OFFLINE_FACTOR`` times its most frequent upload interval: long enough that
one lost message does not flap the state, short enough that Home Assistant
shows a dead meter as unavailable within a few intervals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from meter_table import MeterIds, MeterTable

OFFLINE_FACTOR = 2.5
_ONLINE, _OFFLINE = 0, 1  # the lists of the meter table


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

    The state lives in a ``MeterTable`` (two lists: online oldest-seen first,
    offline in the order they went offline; a ``seen`` column), not in dicts
    of floats: a reading moves its meter to the young end of a list in place,
    where a dict ordered by popping and re-inserting doubles its table, and
    no object is kept per meter (a float each was 24 bytes): 100,000 meters
    in service held 10.1 MB that way, 4.6 MB now. Meter ids are the validated
    13-character ids (``topics.is_valid_meter_id``): the table refuses any
    other (ValueError).
    """

    def __init__(self, limit_for: Callable[[str], float], shortest_limit: float,
                 max_meters: int = 200_000, ids: MeterIds | None = None) -> None:
        self._limit_for = limit_for
        self._shortest_limit = shortest_limit
        self._max_meters = max_meters
        self._table = MeterTable({"seen": "d"}, lists=2, ids=ids)  # ``seen``: the last reading's time
        # Online meters out of their place in the online list (restored online after they were offline,
        # appended with an older last-seen time than those before them): checked one by one. Rare (the
        # broker's retained "online" for a meter this proxy had offline), so a small set of ids rather
        # than a byte column every meter would pay for and the check would have to scan.
        self._unordered: set[str] = set()
        self._lock = threading.Lock()

    def seen(self, meter_id: str, now: float) -> bool:
        """Record a packet from ``meter_id``; True when it just came online."""
        with self._lock:
            table = self._table
            slot = table.find(meter_id)
            if slot < 0:
                slot = table.add(meter_id, _ONLINE)
                table.column("seen")[slot] = now  # fetched after the add, which may replace the column
                self._bound()
                return True
            came_back = table.list_of(slot) == _OFFLINE
            table.touch(slot, _ONLINE)  # to the young end: the list stays ordered by last seen
            table.column("seen")[slot] = now
            if self._unordered:
                self._unordered.discard(meter_id)
            return came_back

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
            table = self._table
            slot = table.find(meter_id)
            if slot >= 0:
                if table.column("seen")[slot] <= last_seen:
                    was = table.list_of(slot)
                    if online and was == _OFFLINE:
                        table.touch(slot, _ONLINE)
                        self._unordered.add(meter_id)
                    elif not online and was == _ONLINE:
                        table.touch(slot, _OFFLINE)
                        self._unordered.discard(meter_id)
                return
            slot = table.add(meter_id, _ONLINE if online else _OFFLINE)
            table.column("seen")[slot] = last_seen
            self._bound()

    def _bound(self) -> None:
        """Forget the longest-silent meters beyond ``max_meters`` (caller holds the lock): offline ones first."""
        table = self._table
        while len(table) > self._max_meters:
            slot = table.oldest(_OFFLINE)
            if slot < 0:
                slot = table.oldest(_ONLINE)
                self._unordered.discard(table.meter_id(slot))
            table.remove(slot)

    def forget(self, meter_id: str) -> None:
        """Stop tracking a meter (it was excluded): no state is published for it any more."""
        with self._lock:
            slot = self._table.find(meter_id)
            if slot >= 0:
                self._table.remove(slot)
            self._unordered.discard(meter_id)

    def set_limits(self, limit_for: Callable[[str], float], shortest_limit: float) -> None:
        """New silence limits (the configured intervals changed): they apply from the next check."""
        with self._lock:
            self._limit_for = limit_for
            self._shortest_limit = shortest_limit

    def last_seen(self, meter_id: str) -> float | None:
        """When a meter's last reading came (None: not known)."""
        with self._lock:
            slot = self._table.find(meter_id)
            return None if slot < 0 else self._table.column("seen")[slot]

    def snapshot(self) -> list[tuple[str, float, bool]]:
        """Every known meter with its last-seen time and whether it is online (to persist and list).

        The online meters oldest first, then the offline ones in the order
        they went offline; the file keeps no order (its reader sorts).
        """
        with self._lock:
            table = self._table
            seen = table.column("seen")
            return [(table.meter_id(slot), seen[slot], which == _ONLINE)
                    for which in (_ONLINE, _OFFLINE) for slot in table.slots(which)]

    def entries(self) -> Iterator[tuple[str, float, bool]]:
        """What ``snapshot`` lists, in no order, a meter at a time: to save a large fleet's last-seen times.

        The table is copied with the lock held (a few bulk copies of arrays);
        the meters are yielded from the copy after, so that no list of
        100,000 tuples is built while the readings wait for the lock.
        """
        with self._lock:
            copy = self._table.copy("seen")
        return ((meter_id, seen, which == _ONLINE) for meter_id, seen, which in copy.entries())

    def went_offline(self, now: float) -> list[str]:
        """The meters silent for longer than their limit since the last call; now offline."""
        offline: list[str] = []
        slots: list[int] = []  # moved once the walk is over: moving a meter changes the links it follows
        with self._lock:
            table = self._table
            seen = table.column("seen")
            slot = table.oldest(_ONLINE)
            while slot >= 0:
                silence = now - seen[slot]
                if silence <= self._shortest_limit:
                    break  # everyone after this one was heard from even more recently
                meter_id = table.meter_id(slot)
                if silence > self._limit_for(meter_id):
                    offline.append(meter_id)
                    slots.append(slot)
                slot = table.following(slot)
            if self._unordered:
                found = set(offline)
                for meter_id in self._unordered:
                    slot = table.find(meter_id)
                    if meter_id not in found and now - seen[slot] > self._limit_for(meter_id):
                        offline.append(meter_id)
                        slots.append(slot)
                self._unordered.difference_update(offline)
            for slot in slots:
                table.touch(slot, _OFFLINE)  # in the order they went offline
        return sorted(offline)

    def __len__(self) -> int:
        """How many meters are tracked (online or recently offline)."""
        with self._lock:  # the readings' thread adds and removes meters meanwhile
            return len(self._table)

    def online_count(self) -> int:
        """How many meters are online now, without listing them (the stats count them every interval)."""
        with self._lock:
            return self._table.count(_ONLINE)

    def online(self) -> list[str]:
        """The meters online now."""
        with self._lock:
            return sorted(self._table.meter_ids(_ONLINE))
