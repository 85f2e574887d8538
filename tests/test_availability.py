"""Which meters are online: pure bookkeeping, tested with a fake clock."""

from __future__ import annotations

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
