"""The configuration status per meter without a broker: the payload key by key, the state, when to publish.

``config_status`` builds ``<main>/<id>/config_status`` and decides when it is
worth a message; ``command_tracking`` decides the state from a meter's
commands. Fake clocks throughout: every expected output is exact.
"""

from __future__ import annotations

import json

import pytest
from test_command_tracking import EXCLUDED, HEAT_PUMP, LOCAL_NOW, OFFICE, SETTINGS, reply, take_outgoing, tracker

from command_tracking import CommandTracker, SlotStatus, SlotView, config_state_of
from config_loader import MeterSettings
from config_status import (
    CONFIG_STATES,
    OFFSET_INTERVAL,
    ConfigState,
    StatusBook,
    encode_status,
    iso_utc,
    round_offset,
    status_document,
)

APPLIED, PENDING, NO_REPLY, REFUSED = (ConfigState.APPLIED, ConfigState.PENDING, ConfigState.NO_REPLY,
                                       ConfigState.REFUSED)
WALL = 1768235940.0  # 2026-01-12T16:39:00Z


# --- the payload ---------------------------------------------------------------------


def test_status_document_key_by_key() -> None:
    document = status_document(HEAT_PUMP, APPLIED, 30, 5, WALL + 0.4, -3)
    assert list(document) == ["id", "upload_frequency_seconds", "upload_frequency_minutes", "state", "updated",
                              "clock_offset_seconds"]
    assert document["id"] == HEAT_PUMP
    assert document["upload_frequency_seconds"] == 30
    assert document["upload_frequency_minutes"] == 5
    assert document["state"] == "applied"
    assert document["updated"] == "2026-01-12T16:39:00Z"
    assert document["clock_offset_seconds"] == -3
    assert status_document(OFFICE, NO_REPLY, 60, 1, WALL, None)["clock_offset_seconds"] is None


def test_encoded_status_is_compact_json_with_null_for_an_unknown_offset() -> None:
    payload = encode_status(status_document(OFFICE, PENDING, 60, 1, WALL, None))
    assert payload == (b'{"id":"33B1225950028","upload_frequency_seconds":60,"upload_frequency_minutes":1,'
                       b'"state":"pending","updated":"2026-01-12T16:39:00Z","clock_offset_seconds":null}')
    assert json.loads(payload)["clock_offset_seconds"] is None


def test_states_are_the_four_words_home_assistant_lists() -> None:
    assert CONFIG_STATES == ("applied", "pending", "no_reply", "refused")


def test_updated_is_utc_whole_seconds_with_z() -> None:
    assert iso_utc(WALL) == "2026-01-12T16:39:00Z"
    assert iso_utc(WALL + 0.6) == "2026-01-12T16:39:01Z"


@pytest.mark.parametrize(("offset", "published"), [
    (0.0, 0), (-0.4, 0), (-0.6, -1), (1.6, 2), (100.2, 100), (-662_000_000.3, -662_000_000)])
def test_clock_offset_is_whole_seconds(offset: float, published: int) -> None:
    assert round_offset(offset) == published


# --- the state, from the slots -------------------------------------------------------------


def view(status: SlotStatus, value: str, attempt: int = 0) -> SlotView:
    return SlotView(status, value, attempt)


ACK_60, ACK_1 = view(SlotStatus.ACKED, "60"), view(SlotStatus.ACKED, "1")


@pytest.mark.parametrize(("slots", "expected"), [
    ((ACK_60, ACK_1), APPLIED),
    ((view(SlotStatus.QUEUED, "60"), view(SlotStatus.QUEUED, "1")), PENDING),
    ((ACK_60, view(SlotStatus.WAITING, "1")), PENDING),
    ((view(SlotStatus.RETRY_SCHEDULED, "60"), ACK_1), NO_REPLY),
    ((view(SlotStatus.GAVE_UP, "60"), view(SlotStatus.WAITING, "1")), NO_REPLY),
    ((view(SlotStatus.WAITING, "60", attempt=1), ACK_1), NO_REPLY),  # a retry in flight: the ALERT stands
    ((view(SlotStatus.QUEUED, "60", attempt=2), ACK_1), NO_REPLY),
    ((view(SlotStatus.FAILED, "60"), ACK_1), REFUSED),
    ((view(SlotStatus.FAILED, "60"), view(SlotStatus.GAVE_UP, "1")), REFUSED),
    ((view(SlotStatus.REFUSED, "60"), view(SlotStatus.REFUSED, "1")), REFUSED),  # the broker's ACL
    ((ACK_60, view(SlotStatus.CANCELLED, "1")), None),   # dropped: it went away; the last status stands
    ((view(SlotStatus.ACKED, "300"), ACK_1), None),      # acknowledged what is no longer configured
    ((None, None), None),                                # never commanded
    ((ACK_60, None), None),
])
def test_state_from_the_latest_interval_commands(slots: tuple[SlotView | None, ...],
                                                 expected: ConfigState | None) -> None:
    assert config_state_of(slots, ["60", "1"]) is expected


# --- the state, from what the tracker went through ---------------------------------------------


def states(state: CommandTracker) -> dict[str, ConfigState | None]:
    """The meters touched since the last call, with their state now."""
    return {meter_id: state.config_state(meter_id) for meter_id in state.take_touched()}


def test_an_answering_meter_goes_pending_then_applied() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    assert states(state) == {OFFICE: PENDING}
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    assert states(state) == {OFFICE: PENDING}
    state.observe_reply(reply(1), 0.2)
    assert states(state) == {OFFICE: PENDING}  # one of two
    state.observe_reply(reply(2), 0.3)
    assert states(state) == {OFFICE: APPLIED}
    assert states(state) == {}  # nothing happened since


def test_a_silent_meter_is_no_reply_through_its_retries_and_applied_when_a_retry_is_answered() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    states(state)
    state.tick(3.0)  # both alerted
    assert states(state) == {OFFICE: NO_REPLY}
    state.tick(13.0)
    take_outgoing(state, 13.0, LOCAL_NOW, 10)  # the retries, oprids 3 and 4
    assert states(state) == {OFFICE: NO_REPLY}
    state.observe_reply(reply(3), 13.1)
    assert states(state) == {OFFICE: NO_REPLY}
    state.observe_reply(reply(4), 13.2)
    assert states(state) == {OFFICE: APPLIED}


def test_a_late_acceptance_applies() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.tick(3.0)
    assert states(state) == {OFFICE: NO_REPLY}
    state.observe_reply(reply(1), 4.0)
    state.observe_reply(reply(2), 4.1)
    assert states(state) == {OFFICE: APPLIED}


def test_a_refusing_meter_is_refused() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.observe_reply(reply(1, "02", msg="value not allowed"), 0.2)
    assert states(state) == {OFFICE: REFUSED}
    state.observe_reply(reply(2), 0.3)
    assert states(state) == {OFFICE: REFUSED}


def test_a_command_the_internal_broker_refuses_is_refused() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    for command in take_outgoing(state, 0.0, LOCAL_NOW, 10):
        state.refused_by_broker(command)
    assert states(state) == {OFFICE: REFUSED}


def test_a_new_configuration_is_pending_with_the_new_intervals_then_applied() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.observe_reply(reply(1), 0.1)
    state.observe_reply(reply(2), 0.1)
    assert states(state) == {OFFICE: APPLIED}
    state.apply_settings(MeterSettings(upload_frequency_seconds=300), 1.0)
    assert states(state) == {OFFICE: PENDING}
    take_outgoing(state, 1.0, LOCAL_NOW, 10)
    state.observe_reply(reply(3), 1.1)
    state.observe_reply(reply(4), 1.1)
    assert states(state) == {OFFICE: APPLIED}


def test_a_meter_away_at_a_save_keeps_its_status_and_one_offline_since_discovery_has_none() -> None:
    state = tracker()
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    state.observe_reply(reply(1), 0.1)
    state.observe_reply(reply(2), 0.1)
    state.observe_availability(HEAT_PUMP, "offline", 0.2)
    assert states(state) == {OFFICE: APPLIED, HEAT_PUMP: None}
    # Silent for 1000 s (limit 150 s): the save sends it nothing, and decides nothing about its status.
    state.apply_settings(MeterSettings(upload_frequency_seconds=300, devices=SETTINGS.devices), 1000.0)
    assert states(state) == {}
    assert state.config_state(OFFICE) is None  # what it acknowledged is not what is configured now
    assert take_outgoing(state, 1000.0, LOCAL_NOW, 10) == []


def test_an_excluded_meter_has_no_state_at_discovery_and_once_excluded() -> None:
    state = tracker()
    state.observe_availability(EXCLUDED, "online", 0.0)
    assert states(state) == {EXCLUDED: None}
    state.observe_availability(OFFICE, "online", 0.0)
    take_outgoing(state, 0.0, LOCAL_NOW, 10)
    states(state)
    state.apply_settings(MeterSettings(exclude=frozenset({OFFICE, EXCLUDED})), 1.0)
    assert states(state) == {EXCLUDED: None, OFFICE: None}  # touched, so that the daemon clears them


# --- when a status is worth a message ------------------------------------------------------------


def taken(book: StatusBook, now: float = 0.0, limit: int = 100) -> dict[str, dict[str, object] | None]:
    """The messages due, decoded (None for a clearing)."""
    return {meter_id: json.loads(payload) if payload else None for meter_id, payload in book.take(limit, now)}


def test_a_status_is_published_when_its_state_or_intervals_change_only() -> None:
    book = StatusBook()
    assert book.update(OFFICE, PENDING, 60, 1, WALL)
    assert taken(book) == {OFFICE: {"id": OFFICE, "upload_frequency_seconds": 60, "upload_frequency_minutes": 1,
                                    "state": "pending", "updated": "2026-01-12T16:39:00Z",
                                    "clock_offset_seconds": None}}
    assert not book.update(OFFICE, PENDING, 60, 1, WALL + 5)
    assert not book.update(OFFICE, None, 60, 1, WALL + 5)  # no opinion: the last status stands
    assert taken(book) == {}
    assert book.update(OFFICE, PENDING, 300, 1, WALL + 6)  # a new push while one is pending
    assert taken(book)[OFFICE] == {"id": OFFICE, "upload_frequency_seconds": 300, "upload_frequency_minutes": 1,
                                   "state": "pending", "updated": "2026-01-12T16:39:06Z",
                                   "clock_offset_seconds": None}
    assert book.update(OFFICE, APPLIED, 300, 1, WALL + 7)
    assert taken(book)[OFFICE]["state"] == "applied"
    assert book.state(OFFICE) is APPLIED


def test_changes_faster_than_the_broker_takes_them_cost_one_message_the_latest() -> None:
    book = StatusBook()
    book.update(OFFICE, PENDING, 60, 1, WALL)
    book.update(HEAT_PUMP, PENDING, 30, 1, WALL)
    book.update(OFFICE, APPLIED, 60, 1, WALL + 1)
    assert book.due() == 2
    assert [meter_id for meter_id, _ in book.take(1, 0.0)] == [OFFICE]
    assert book.due() == 1
    assert taken(book) == {HEAT_PUMP: {"id": HEAT_PUMP, "upload_frequency_seconds": 30,
                                       "upload_frequency_minutes": 1, "state": "pending",
                                       "updated": "2026-01-12T16:39:00Z", "clock_offset_seconds": None}}


def test_an_excluded_meter_is_cleared_once_and_gets_a_status_again_when_configured() -> None:
    book = StatusBook()
    book.update(OFFICE, APPLIED, 60, 1, WALL)
    book.take(10, 0.0)
    assert book.update(OFFICE, None, 60, 1, WALL + 1, excluded=True)
    assert taken(book) == {OFFICE: None}
    assert book.state(OFFICE) is None
    assert not book.update(OFFICE, None, 60, 1, WALL + 2, excluded=True)
    assert not book.clear(OFFICE)
    assert book.update(OFFICE, PENDING, 60, 1, WALL + 3)  # no longer excluded
    assert taken(book)[OFFICE]["state"] == "pending"
    assert book.update(OFFICE, None, 60, 1, WALL + 4, excluded=True)
    assert taken(book) == {OFFICE: None}


def test_a_meter_never_configured_is_cleared_too_when_excluded() -> None:
    """At start-up: excluded while the sender was not running, its old retained status must go."""
    book = StatusBook()
    assert book.update(EXCLUDED, None, 60, 1, WALL, excluded=True)
    assert taken(book) == {EXCLUDED: None}


def test_the_first_offset_is_published_at_once_and_then_rides_along() -> None:
    book = StatusBook()
    assert not book.observe_offset(OFFICE, -0.4, 0.0)  # no status yet: kept for the first one
    book.update(OFFICE, PENDING, 60, 1, WALL)
    assert taken(book, now=0.0)[OFFICE]["clock_offset_seconds"] == 0

    other = StatusBook()
    other.update(HEAT_PUMP, PENDING, 30, 1, WALL)
    other.take(10, 0.0)  # published without an offset
    assert other.observe_offset(HEAT_PUMP, 12.3, 1.0)  # the first known: at once, however soon
    assert taken(other, now=1.0)[HEAT_PUMP]["clock_offset_seconds"] == 12
    assert not other.observe_offset(HEAT_PUMP, 13.4, 2.0)  # moved 1 s: jitter
    other.update(HEAT_PUMP, APPLIED, 30, 1, WALL + 2)  # a state change carries the latest offset
    assert taken(other, now=2.0)[HEAT_PUMP]["clock_offset_seconds"] == 13


def test_an_offset_change_alone_is_published_when_it_moved_2_s_and_at_most_once_a_minute() -> None:
    book = StatusBook()
    book.observe_offset(OFFICE, 0.0, 0.0)
    book.update(OFFICE, APPLIED, 60, 1, WALL)
    book.take(10, 100.0)  # published with offset 0 at 100
    for now in range(101, 160):  # a reading a second, the clock 5 s ahead: not within the minute
        assert not book.observe_offset(OFFICE, 5.0, float(now))
    assert book.observe_offset(OFFICE, 5.0, 100.0 + OFFSET_INTERVAL)
    assert not book.observe_offset(OFFICE, 5.0, 160.5)  # already due: one message
    assert taken(book, now=160.5)[OFFICE]["clock_offset_seconds"] == 5
    assert not book.observe_offset(OFFICE, 6.4, 300.0)  # 1 s since the published 5: not worth a message
    assert book.observe_offset(OFFICE, 7.0, 300.0)  # 2 s
    assert taken(book, now=300.0)[OFFICE]["clock_offset_seconds"] == 7
    assert book.observe_offset(OFFICE, -662_000_000.0, 400.0)  # the clock fell back to 2005
    assert taken(book, now=400.0)[OFFICE]["clock_offset_seconds"] == -662_000_000


def test_a_thousand_meters_reading_every_second_cost_no_message() -> None:
    book = StatusBook()
    meters = [f"33B12260{n:05d}" for n in range(1000)]
    for meter_id in meters:
        book.observe_offset(meter_id, 0.3, 0.0)
        book.update(meter_id, APPLIED, 60, 1, WALL)
    assert len(book.take(5000, 0.0)) == 1000
    for second in range(1, 600):
        for n, meter_id in enumerate(meters):
            assert not book.observe_offset(meter_id, 0.3 + (n % 3) * 0.5 - 0.5, float(second))
    assert book.due() == 0


def test_a_status_the_broker_never_acknowledged_is_published_again_with_the_latest() -> None:
    book = StatusBook()
    book.update(OFFICE, PENDING, 60, 1, WALL)
    book.take(10, 0.0)
    book.update(OFFICE, APPLIED, 60, 1, WALL + 1)
    book.take(10, 1.0)
    book.again(OFFICE)  # the PUBACK of the pending one never came
    assert taken(book, now=200.0)[OFFICE]["state"] == "applied"
    book.clear(OFFICE)
    book.take(10, 201.0)
    book.again(OFFICE)
    assert taken(book, now=400.0) == {OFFICE: None}
    book.again(HEAT_PUMP)  # never had a status: nothing to repeat
    assert book.due() == 0
