"""The forwarding engine without a broker: the window, each message settled once, the queue."""

from __future__ import annotations

import threading
from typing import Any, NamedTuple

import pytest
from broker import wait_for
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from outgoing import EXPIRED, Forwarder, PublishWindow

ACCEPTED = ReasonCode(PacketTypes.PUBACK, "Success")
NO_SUBSCRIBERS = ReasonCode(PacketTypes.PUBACK, "No matching subscribers")
REFUSED = ReasonCode(PacketTypes.PUBACK, "Not authorized")


class Info(NamedTuple):
    mid: int


class Message(NamedTuple):
    topic: str
    payload: bytes = b"{}"
    retain: bool = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def window(size: int = 3, clock: Clock | None = None) -> tuple[PublishWindow[str], list[tuple[str, str | None]]]:
    settled: list[tuple[str, str | None]] = []
    return (PublishWindow(lambda item, refused: settled.append((item, refused)), size=size, expiry_seconds=120.0,
                          clock=clock or Clock()), settled)


def test_an_answer_settles_its_message_once_accepted_or_refused() -> None:
    subject, settled = window()
    assert subject.reserve(2) == 2
    subject.hand_over("a", lambda: Info(1))
    subject.hand_over("b", lambda: Info(2))

    subject.answered(2, REFUSED)
    subject.answered(1, NO_SUBSCRIBERS)  # a success code: nobody listening is not a refusal
    subject.answered(1, ACCEPTED)  # a second answer for the same id changes nothing

    assert settled == [("b", "Not authorized"), ("a", None)]
    assert len(subject) == 0


def test_an_answer_before_publish_returned_is_kept_for_its_message() -> None:
    # paho's network thread can deliver the PUBACK before publish() hands back the message id.
    subject, settled = window()
    subject.reserve(1)

    def publish_answered_at_once() -> Info:
        subject.answered(7, REFUSED)
        assert settled == []  # not yet known whose answer it is
        return Info(7)

    subject.hand_over("a", publish_answered_at_once)

    assert settled == [("a", "Not authorized")]
    assert len(subject) == 0


def test_the_window_never_holds_more_than_its_size() -> None:
    subject, _settled = window(size=3)

    assert subject.reserve(5) == 3
    assert subject.reserve(1) == 0
    subject.release()
    assert subject.reserve(5) == 1


def test_a_publish_that_raises_gives_its_place_back() -> None:
    subject, settled = window(size=1)
    subject.reserve(1)

    def refuse() -> Info:
        raise ValueError("topic too long")

    with pytest.raises(ValueError, match="topic too long"):
        subject.hand_over("a", refuse)
    assert len(subject) == 0 and settled == []


def test_answers_that_never_come_expire_counting_only_connected_time() -> None:
    clock = Clock()
    subject, settled = window(clock=clock)
    subject.reserve(2)
    subject.hand_over("a", lambda: Info(1))
    clock.now = 100.0
    subject.hand_over("b", lambda: Info(2))
    clock.now = 200.0  # disconnected from 100 to 200: paho sends both again on the new connection
    subject.reconnected()

    assert subject.expire() == 0
    clock.now = 320.5
    assert subject.expire() == 2
    assert settled == [("a", EXPIRED), ("b", EXPIRED)]
    assert subject.reserve(3) == 3


class FakeClient:
    """Records what is published; the test answers for the broker."""

    def __init__(self) -> None:
        self.published: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        with self.lock:
            self.published.append((len(self.published) + 1, topic))
            return Info(len(self.published))


def forwarder(capacity: int = 5, window_size: int = 2, skip: Any = lambda _item: False):
    client = FakeClient()
    settled: list[tuple[str, str | None]] = []
    dropped: list[str] = []
    subject: Forwarder[Message] = Forwarder(
        client, lambda item, refused: settled.append((item.topic, refused)), capacity=capacity,  # type: ignore[arg-type]
        window=window_size, dropped=lambda item: dropped.append(item.topic), skip=skip)
    subject.start()
    return subject, client, settled, dropped


def test_messages_wait_while_disconnected_and_go_in_order_within_the_window() -> None:
    subject, client, settled, _dropped = forwarder()
    for topic in "abcd":
        subject.put(Message(topic))
    assert client.published == [] and subject.depth() == 4

    subject.set_connected(True)
    wait_for(lambda: len(client.published) == 2)
    assert [topic for _mid, topic in client.published] == ["a", "b"]  # the window is full
    for mid in (1, 2):
        subject.answered(mid, ACCEPTED)
    wait_for(lambda: len(client.published) == 4)
    subject.answered(3, ACCEPTED)
    subject.answered(4, REFUSED)

    assert subject.drain(2.0)
    assert settled == [("a", None), ("b", None), ("c", None), ("d", "Not authorized")]
    subject.stop()


def test_a_full_queue_drops_its_oldest_message() -> None:
    subject, _client, _settled, dropped = forwarder(capacity=2)
    for topic in "abc":
        subject.put(Message(topic))

    assert dropped == ["a"] and subject.depth() == 2
    assert subject.discard(lambda item: item.topic == "b") == 1
    assert subject.depth() == 1
    subject.stop()


def test_a_skipped_message_is_not_published_and_frees_its_place() -> None:
    subject, client, settled, _dropped = forwarder(skip=lambda item: item.topic == "big")
    subject.set_connected(True)

    subject.put(Message("big"))
    subject.put(Message("small"))

    wait_for(lambda: client.published == [(1, "small")])
    subject.answered(1, ACCEPTED)
    assert subject.drain(2.0)
    assert settled == [("small", None)]
    subject.stop()


def test_a_message_counts_until_its_settling_is_done() -> None:
    # A drain waiting for an empty window must also wait for what settling does
    # (the proxy releases the raw reading there, before it disconnects).
    seen: list[int] = []
    subject: PublishWindow[str] = PublishWindow(lambda _item, _refused: seen.append(len(subject)), size=3)
    subject.reserve(1)
    subject.hand_over("a", lambda: Info(1))

    subject.answered(1, ACCEPTED)

    assert seen == [1]
    assert len(subject) == 0
