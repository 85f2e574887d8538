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
        self.threads: list[int] = []  # the thread that published each message
        self.lock = threading.Lock()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> Info:
        with self.lock:
            self.published.append((len(self.published) + 1, topic))
            self.threads.append(threading.get_ident())
            return Info(len(self.published))


def forwarder(capacity: int = 5, window_size: int = 2, skip: Any = lambda _item: False, **packing: Any):
    client = FakeClient()
    settled: list[tuple[str, str | None]] = []
    dropped: list[str] = []
    subject: Forwarder[Message] = Forwarder(
        client, lambda item, refused: settled.append((item.topic, refused)), capacity=capacity,  # type: ignore[arg-type]
        window=window_size, dropped=lambda item: dropped.append(item.topic), skip=skip, **packing)
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


def test_messages_wait_packed_and_everyone_else_sees_them_unpacked() -> None:
    """What waits in the queue is packed; the drop, the discard, the skip, the client and the settling get messages."""
    skipped: list[str] = []

    def skip(item: Message) -> bool:
        skipped.append(item.topic)
        return False

    subject, client, settled, dropped = forwarder(capacity=3, skip=skip, pack=lambda item: item.topic.encode(),
                                                  unpack=lambda packed: Message(packed.decode()))
    for topic in "abcd":
        subject.put(Message(topic))
    assert list(subject._queue) == [b"b", b"c", b"d"] and dropped == ["a"]
    assert subject.discard(lambda item: item.topic == "c") == 1

    subject.set_connected(True)
    wait_for(lambda: len(client.published) == 2)
    subject.put(Message("e"))  # the window is full: it waits, packed
    assert list(subject._queue) == [b"e"]
    for mid in (1, 2, 3):
        wait_for(lambda mid=mid: len(client.published) >= mid)
        subject.answered(mid, ACCEPTED)
    assert subject.drain(2.0)
    assert [topic for _mid, topic in client.published] == ["b", "d", "e"] == skipped
    assert settled == [("b", None), ("d", None), ("e", None)]
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


def test_a_message_queued_behind_a_full_window_goes_out_on_the_thread_that_frees_its_place() -> None:
    # The PUBACK that frees a place hands the next queued message over itself (paho's
    # network thread, in the proxy): no wake-up of the publisher thread per message.
    subject, client, settled, _dropped = forwarder(capacity=10, window_size=1)
    subject.set_connected(True)
    subject.put(Message("a"))  # the window is free: published at once, on this thread
    subject.put(Message("b"))  # the window is full: queued
    subject.put(Message("c"))
    assert [topic for _mid, topic in client.published] == ["a"]

    answering = threading.Thread(target=subject.answered, args=(1, ACCEPTED))
    answering.start()
    answering.join()

    assert [topic for _mid, topic in client.published] == ["a", "b"]
    assert client.threads == [threading.get_ident(), answering.ident]
    subject.answered(2, ACCEPTED)
    assert [topic for _mid, topic in client.published] == ["a", "b", "c"]
    subject.answered(3, ACCEPTED)
    assert subject.drain(2.0)
    assert settled == [("a", None), ("b", None), ("c", None)]
    subject.stop()


def test_many_producers_and_an_answering_thread_settle_every_message_once_in_order() -> None:
    # Producers put while PUBACKs free places on another thread: nothing is stranded in
    # the queue, nothing published twice, each producer's messages go out in its order.
    subject, client, settled, _dropped = forwarder(capacity=100_000, window_size=7)
    subject.set_connected(True)
    stop = threading.Event()

    def broker() -> None:  # answers whatever was published, in order
        answered = 0
        while not stop.is_set() or answered < len(client.published):
            with client.lock:
                mids = [mid for mid, _topic in client.published[answered:]]
            for mid in mids:
                subject.answered(mid, ACCEPTED)
            answered += len(mids)
            if not mids:
                stop.wait(0.001)

    def producer(name: str) -> None:
        for number in range(2_000):
            subject.put(Message(f"{name}/{number}"))

    answering = threading.Thread(target=broker)
    answering.start()
    producers = [threading.Thread(target=producer, args=(name,)) for name in "pqr"]
    for thread in producers:
        thread.start()
    for thread in producers:
        thread.join()
    wait_for(lambda: len(settled) == 6_000, timeout=20)
    stop.set()
    answering.join()

    assert subject.drain(2.0)
    topics = [topic for _mid, topic in client.published]
    assert len(topics) == len(set(topics)) == 6_000
    for name in "pqr":
        assert [t for t in topics if t.startswith(name)] == [f"{name}/{number}" for number in range(2_000)]
    assert sorted(topic for topic, _refused in settled) == sorted(topics)
    subject.stop()
