"""Which meters are online: pure bookkeeping, tested with a fake clock."""

from __future__ import annotations

import sys
import tracemalloc
from collections.abc import Callable
from types import FrameType

from availability import MeterAvailability, silence_limit

FAST, SLOW = "33B0000000001", "33B0000000002"


def tracker(max_meters: int = 200_000) -> MeterAvailability:
    """FAST goes offline after 75 s of silence, every other meter after 150 s."""
    limits = {FAST: 75.0}
    return MeterAvailability(lambda meter_id: limits.get(meter_id, 150.0), shortest_limit=75.0,
                             max_meters=max_meters)


def test_silence_limit_is_two_and_a_half_of_the_most_frequent_interval() -> None:
    assert silence_limit(60, 1) == 150.0
    assert silence_limit(3600, 1) == 150.0
    assert silence_limit(30, 5) == 75.0


def test_a_meter_comes_online_when_first_seen_and_only_then() -> None:
    availability = tracker()

    assert availability.seen(SLOW, 0.0) is True
    assert availability.seen(SLOW, 10.0) is False
    assert availability.online() == [SLOW]


def test_a_silent_meter_goes_offline_once_after_its_own_limit() -> None:
    availability = tracker()
    availability.seen(FAST, 0.0)
    availability.seen(SLOW, 0.0)

    assert availability.went_offline(75.0) == []
    assert availability.went_offline(75.5) == [FAST]
    assert availability.went_offline(150.5) == [SLOW]
    assert availability.went_offline(1000.0) == []
    assert availability.online() == []


def test_an_offline_meter_heard_again_comes_back_online() -> None:
    availability = tracker()
    availability.seen(SLOW, 0.0)
    availability.went_offline(200.0)

    assert availability.seen(SLOW, 201.0) is True
    assert availability.online() == [SLOW]


def test_recently_seen_meters_keep_older_silent_ones_visible() -> None:
    availability = tracker()
    availability.seen(SLOW, 0.0)
    availability.seen(FAST, 100.0)  # seen later, shorter limit

    assert availability.went_offline(151.0) == [SLOW]
    assert availability.went_offline(176.0) == [FAST]


def test_beyond_max_meters_the_longest_silent_is_forgotten() -> None:
    availability = tracker(max_meters=2)
    for now, meter_id in enumerate(("33B0000000010", "33B0000000011", "33B0000000012")):
        availability.seen(meter_id, float(now))

    assert len(availability) == 2
    assert availability.online() == ["33B0000000011", "33B0000000012"]
    assert availability.seen("33B0000000010", 5.0) is True


def test_a_restored_meter_goes_offline_at_its_limit_from_its_last_reading() -> None:
    availability = tracker()
    availability.restore(FAST, -50.0, online=True)  # heard 50 s before this run's clock started

    assert availability.online() == [FAST]
    assert availability.went_offline(25.0) == []
    assert availability.went_offline(25.5) == [FAST]


def test_a_restored_offline_meter_is_not_reported_again_and_comes_back_when_heard() -> None:
    availability = tracker()
    availability.restore(SLOW, 0.0, online=False)

    assert availability.went_offline(1000.0) == []
    assert availability.seen(SLOW, 1001.0) is True
    assert availability.online() == [SLOW]


def test_restoring_a_meter_already_heard_changes_nothing() -> None:
    availability = tracker()
    availability.seen(FAST, 10.0)

    availability.restore(FAST, 0.0, online=False)

    assert availability.online() == [FAST]
    assert availability.last_seen(FAST) == 10.0


def test_a_meter_learnt_late_is_checked_once_the_meters_before_it_are_old_enough() -> None:
    # Learnt from the broker 5 s after the start, appended after a meter heard at 4 s:
    # it is still reported, at most those few seconds late.
    availability = tracker()
    availability.seen(SLOW, 4.0)
    availability.restore(FAST, 0.0, online=True)

    assert availability.went_offline(76.0) == []
    assert availability.went_offline(79.5) == [FAST]


def test_new_limits_apply_from_the_next_check() -> None:
    availability = tracker()
    availability.seen(SLOW, 0.0)

    availability.set_limits(lambda _meter_id: 300.0, shortest_limit=300.0)

    assert availability.went_offline(200.0) == []
    assert availability.went_offline(301.0) == [SLOW]


def test_snapshot_lists_every_meter_oldest_first_with_its_state() -> None:
    availability = tracker()
    availability.seen(SLOW, 0.0)
    availability.seen(FAST, 10.0)
    availability.went_offline(90.0)

    assert availability.snapshot() == [(SLOW, 0.0, True), (FAST, 10.0, False)]


def test_a_restored_meter_not_heard_since_takes_the_state_the_broker_retained() -> None:
    availability = tracker()
    availability.restore(SLOW, 0.0, online=True)  # from the state directory

    availability.restore(SLOW, 0.0, online=False)  # the broker's retained availability

    assert availability.online() == []
    assert availability.seen(SLOW, 5.0) is True  # heard again: announced online


def test_the_online_count_follows_comings_goings_restores_forgetting_and_the_bound() -> None:
    """What the bridge's "Meters online" shows in Home Assistant (``online`` in the stats)."""
    availability = tracker(max_meters=3)
    assert availability.online_count() == 0
    availability.seen(FAST, 0.0)
    availability.seen(SLOW, 0.0)
    assert availability.online_count() == 2
    availability.went_offline(75.5)
    assert availability.online_count() == 1
    availability.restore("33B0000000003", 0.0, online=False)
    availability.restore("33B0000000004", 0.0, online=True)  # the bound forgets FAST, offline
    assert availability.online_count() == 2
    availability.forget(SLOW)
    assert availability.online_count() == 1
    availability.seen("33B0000000003", 80.0)
    assert availability.online_count() == len(availability.online()) == 2


def lines_run(call: Callable[[], object], function: Callable[..., object]) -> int:
    """How many lines of ``function`` ran during ``call()``: its work, counted without a clock."""
    code = getattr(function, "__code__", None) or function.__func__.__code__  # type: ignore[attr-defined]
    count = 0

    def local(frame: FrameType, event: str, _arg: object) -> Callable[..., object]:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame: FrameType, _event: str, _arg: object) -> Callable[..., object] | None:
        return local if frame.f_code is code else None

    sys.settrace(tracer)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def test_the_silence_check_does_not_walk_the_meters_already_offline() -> None:
    # A large fleet mostly silent (a site's network down): the check runs twice a second with the lock held.
    availability = tracker()
    silent = [f"33B9{n:09d}" for n in range(1000)]
    for meter_id in silent:
        availability.seen(meter_id, 0.0)
    availability.seen(SLOW, 150.0)
    assert availability.went_offline(151.0) == silent

    work = lines_run(lambda: availability.went_offline(152.0), MeterAvailability.went_offline)

    assert work < 50, work  # a walk of the 1,000 offline meters would be thousands of lines
    assert availability.online() == [SLOW]
    assert availability.went_offline(301.0) == [SLOW]


def test_a_meter_restored_online_after_it_went_offline_is_checked_at_once_wherever_it_sits() -> None:
    # The broker's retained "online" for a meter the proxy's own state has offline: consumers were told
    # online, so it must go offline again at the next check, though it now sits after meters heard since.
    availability = tracker()
    availability.seen(FAST, 0.0)
    availability.seen(SLOW, 0.0)
    assert availability.went_offline(76.0) == [FAST]
    availability.seen(SLOW, 100.0)

    availability.restore(FAST, 0.0, online=True)

    assert availability.online() == [FAST, SLOW]
    assert availability.went_offline(101.0) == [FAST]
    assert availability.went_offline(102.0) == []
    assert availability.seen(FAST, 103.0) is True
    assert availability.went_offline(251.0) == [FAST, SLOW]


def test_once_a_silent_fleet_is_back_its_offline_table_gives_its_memory_back() -> None:
    # Nothing of its time offline stays held: a dict of offline meters emptied key by key kept the table of
    # its largest size (about 400 KB for 20,000 meters); in the table the meters only move between lists.
    availability = tracker()
    fleet = [f"33B9{n:09d}" for n in range(20_000)]
    tracemalloc.start()
    try:
        for meter_id in fleet:
            availability.seen(meter_id, 0.0)
        online = tracemalloc.get_traced_memory()[0]
        assert len(availability.went_offline(200.0)) == len(fleet)
        for meter_id in fleet:
            assert availability.seen(meter_id, 201.0) is True
        back = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    assert availability.online_count() == len(fleet)
    assert back < online + 10_000, (online, back)


def test_a_fleet_heard_again_holds_a_few_bytes_per_meter_not_a_regrown_dict_and_a_float_each() -> None:
    """20,000 meters, each heard twice (a fleet in service): under 60 bytes a meter.

    Measured on Python 3.11: dicts of last-seen floats held 72 bytes a meter (a
    24-byte float each, and the dict's table doubled by the pop and re-insert of
    every reading: 101 bytes a meter at 100,000); the compact table holds 48.
    """
    availability = tracker()
    fleet = [f"33B8{n:09d}" for n in range(20_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for heard in (0.0, 1000.0):
            for number, meter_id in enumerate(fleet):
                availability.seen(meter_id, heard + number)  # a new float each reading, as the clock gives
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()

    assert availability.online_count() == len(fleet)
    assert held / len(fleet) < 60, held / len(fleet)
