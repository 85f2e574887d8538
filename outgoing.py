"""The forwarding engine: messages for one MQTT client, handed over within a window, each settled once.

Two problems every publisher of this project has, solved here once:

- **The window.** paho keys its outgoing QoS 1 messages by a 16-bit message
  id and keeps an unbounded queue of its own: with more than 65,535 waiting,
  ids are reused and messages lost without a word (design.md). So a client is
  never handed more than ``WINDOW`` messages the broker has not acknowledged;
  the rest wait in the project's own bounded structure.
- **The answer.** Each message handed over is settled exactly once: the
  broker accepted it (PUBACK), refused it (a PUBACK reason code of 0x80 or
  more: its ACL, say), or never answered (``expire``: a broker that lost its
  session loses its PUBACKs; only time while connected counts). A PUBACK can
  arrive before ``publish()`` has even returned the message id (paho's network
  thread is that fast): the answer is kept until the id is known.

``PublishWindow`` is that bookkeeping, used by both daemons (the config
sender's worker hands its commands over one by one as they fall due).
``Forwarder`` adds a bounded FIFO, a publisher thread and the drain: the
proxy's whole path to the central broker.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import paho.mqtt.client as mqtt

from mqtt_client import refusal

log = logging.getLogger(__name__)

# Handed over and not yet acknowledged, per client (well under paho's 65,535 ids).
WINDOW = 1_000
# A PUBACK that has not come after this much connected time is not coming.
EXPIRY_SECONDS = 120.0
# A settlement: None when the broker accepted the message, else its reason (or EXPIRED).
EXPIRED = "no acknowledgement"


class Message(Protocol):
    """What the engine publishes: any object with these three attributes."""

    @property
    def topic(self) -> str: ...

    @property
    def payload(self) -> bytes: ...

    @property
    def retain(self) -> bool: ...


T = TypeVar("T")  # what is handed over with a message, given back when it is settled
M = TypeVar("M", bound=Message)  # a message that carries its own topic, payload and retain flag
Settle = Callable[[T, "str | None"], None]
_UNKNOWN = object()


class PublishWindow(Generic[T]):
    """The messages one client was handed and the broker has not answered yet.

    Thread-safe: ``hand_over`` runs on the publishing thread, ``answered`` on
    paho's network thread. ``settle(item, refusal)`` is called exactly once per
    item handed over, outside the lock, on whichever thread completes it:
    ``refusal`` is None when the broker took the message, else the reason it
    gave (or ``EXPIRED``). ``on_room`` is called when an answer frees a place.
    """

    def __init__(self, settle: Settle[T], *, size: int = WINDOW, expiry_seconds: float = EXPIRY_SECONDS,
                 on_room: Callable[[], None] = lambda: None, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.expiry_seconds = expiry_seconds
        self._settle = settle
        self._on_room = on_room
        self._clock = clock
        self._lock = threading.Lock()
        self._handed: dict[int, tuple[float, T]] = {}  # message id → (handed or reconnected at, item)
        self._early: dict[int, tuple[float, Any]] = {}  # message id → (when, reason code): PUBACK before the id
        self._reserved = 0  # places taken by messages being published right now
        self._settling = 0  # answered, their ``settle`` still running: not done yet (see ``__len__``)

    def __len__(self) -> int:
        """How many places are taken: being published, handed over and unanswered, or being settled.

        A message counts until its ``settle`` has returned, so that a drain
        that waits for zero also waits for what settling does (the proxy
        acknowledges the raw reading there, before it disconnects).
        """
        return len(self._handed) + self._reserved + self._settling

    def reserve(self, wanted: int) -> int:
        """Take up to ``wanted`` places for messages about to be handed over; how many were taken."""
        with self._lock:
            taken = max(0, min(wanted, self.size - len(self._handed) - self._reserved))
            self._reserved += taken
            return taken

    def release(self, count: int = 1) -> None:
        """Give back places reserved for messages that were not handed over after all."""
        with self._lock:
            self._reserved -= count
        self._on_room()

    def hand_over(self, item: T, publish: Callable[[], mqtt.MQTTMessageInfo]) -> None:
        """Publish ``item`` in a reserved place (``publish`` calls paho) and wait for the broker's answer.

        An exception from ``publish`` gives the place back and propagates.
        """
        try:
            info = publish()
        except BaseException:
            self.release()
            raise
        with self._lock:
            self._reserved -= 1
            early = self._early.pop(info.mid, _UNKNOWN)
            if early is _UNKNOWN:
                self._handed[info.mid] = (self._clock(), item)
                return
            self._settling += 1
        self._settled(item, refusal(early[1]))  # type: ignore[index]

    def answered(self, mid: int, reason_code: Any) -> None:
        """The broker's PUBACK for ``mid`` (paho's ``on_publish``)."""
        with self._lock:
            entry = self._handed.pop(mid, None)
            if entry is None:  # publish() has not returned this id yet: hand_over settles it
                self._early[mid] = (self._clock(), reason_code)
                return
            self._settling += 1
        self._settled(entry[1], refusal(reason_code))

    def _settled(self, item: T, refused: str | None) -> None:
        """Settle one answered message, then free its place."""
        try:
            self._settle(item, refused)
        finally:
            with self._lock:
                self._settling -= 1
            self._on_room()

    def reconnected(self) -> None:
        """A new connection: paho sends the unanswered messages again, their wait starts anew."""
        now = self._clock()
        with self._lock:
            self._handed = {mid: (now, item) for mid, (_at, item) in self._handed.items()}

    def expire(self) -> int:
        """Settle as ``EXPIRED`` what has waited longer than ``expiry_seconds``; how many.

        Call it only while connected (time disconnected is not the broker's
        silence: see ``reconnected``).
        """
        limit = self._clock() - self.expiry_seconds
        with self._lock:
            lost = [(mid, item) for mid, (at, item) in self._handed.items() if at < limit]
            for mid, _item in lost:
                del self._handed[mid]
            for mid in [mid for mid, (at, _reason) in self._early.items() if at < limit]:
                del self._early[mid]  # an answer for an id that was never handed over (paho's own use)
            self._settling += len(lost)
        for _mid, item in lost:
            self._settled(item, EXPIRED)
        return len(lost)


class Forwarder(Generic[M]):
    """A bounded FIFO of messages for one client, published in order within a ``PublishWindow``.

    Messages are handed over by whichever thread finds the window with room
    and nobody else handing over: ``put`` (any thread) publishes from the
    caller's thread, and the PUBACK that frees a place (``answered``, paho's
    network thread) hands the next queued messages over itself; so no message
    waits for a thread to be woken and no thread is woken per message. One
    thread hands over at a time (``_in_hand``), which keeps the FIFO order;
    a thread that finds another one at work leaves its messages to it (that
    one looks at the queue again before it stops). A publisher thread does
    what no message and no answer starts: the queue after a (re)connection,
    and a look every second as a safety net. Nothing is handed over while
    disconnected.

    When the queue is full the oldest message is dropped and given to
    ``dropped`` (the newest readings are the most useful after a long outage).
    ``skip(item)`` may veto a message just before it is handed over (it is
    then settled by ``skip`` itself: too large for the broker, say). Wire
    ``answered`` to the client's ``on_publish``, and ``set_connected`` to its
    connection state.

    ``pack`` turns a message into what waits in the queue, ``unpack`` back
    (the proxy packs its messages into bytes: see ``pack_outgoing``); a
    message handed over at once is never packed.
    """

    def __init__(self, client: mqtt.Client, settle: Settle[M], *, capacity: int, window: int = WINDOW,
                 dropped: Callable[[M], None] = lambda _item: None,
                 skip: Callable[[M], bool] = lambda _item: False, name: str = "publisher",
                 pack: Callable[[M], Any] = lambda item: item, unpack: Callable[[Any], M] = lambda item: item) -> None:
        self._client = client
        self._dropped = dropped
        self._skip = skip
        self._pack, self._unpack = pack, unpack
        self.capacity = capacity
        self._condition = threading.Condition()
        self._queue: deque[Any] = deque()  # packed messages
        self._in_hand = 0  # taken from the queue, being handed over now (by one thread at a time)
        self._connected = False
        self._stopping = False
        self._kick = threading.Event()  # wakes the publisher thread: connected, or stopping
        self.window: PublishWindow[M] = PublishWindow(settle, size=window, on_room=self._pump)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # --- what the owner calls ---------------------------------------------------------

    def start(self) -> None:
        """Start the publisher thread."""
        self._thread.start()

    def put(self, item: M) -> None:
        """Publish ``item`` after what is queued; never blocks (see the class)."""
        with self._condition:
            # Nothing ahead of it and room: handed over at once, without going through the queue.
            direct = (not self._queue and not self._in_hand and self._connected and not self._stopping
                      and self.window.reserve(1))
            if direct:
                self._in_hand = 1
            else:
                oldest = self._queue.popleft() if len(self._queue) >= self.capacity else None
                self._queue.append(self._pack(item))
        if direct:
            self._hand_over_batch((item,))
        elif oldest is not None:
            self._dropped(self._unpack(oldest))
        self._pump()

    def answered(self, mid: int, reason_code: Any) -> None:
        """The broker's PUBACK (call from the client's ``on_publish``)."""
        self.window.answered(mid, reason_code)

    def set_connected(self, connected: bool) -> None:
        """The client's connection state: messages are handed over only while connected."""
        with self._condition:
            was = self._connected
            self._connected = connected
        if connected and not was:
            self.window.reconnected()
            self._kick.set()

    def expire(self) -> int:
        """Give up on PUBACKs that are not coming (call periodically); how many."""
        return self.window.expire() if self._connected else 0

    def discard(self, unwanted: Callable[[M], bool]) -> int:
        """Remove queued messages for which ``unwanted`` is true; how many."""
        with self._condition:
            kept = deque(packed for packed in self._queue if not unwanted(self._unpack(packed)))
            removed = len(self._queue) - len(kept)
            self._queue = kept
            return removed

    def drain(self, seconds: float) -> bool:
        """Wait (at most ``seconds``, while connected) until everything is delivered; whether it was.

        It looks every 50 ms: nothing wakes it, so that the path of every
        message wakes no thread.
        """
        deadline = time.monotonic() + seconds
        while self.pending() and self._connected:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            time.sleep(min(left, 0.05))
        return not self.pending()

    def stop(self, timeout: float = 2.0) -> None:
        """End the publisher thread (what is queued stays queued)."""
        with self._condition:
            self._stopping = True
        self._kick.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def depth(self) -> int:
        """How many messages wait in the queue."""
        return len(self._queue)

    def pending(self) -> int:
        """Queued, being handed over, or handed over and unanswered."""
        return len(self._queue) + self._in_hand + len(self.window)

    def alive(self) -> bool:
        """Whether the publisher thread runs (for the systemd watchdog)."""
        return self._thread.is_alive()

    # --- the publisher thread -------------------------------------------------------------

    def _pump(self) -> None:
        """Hand queued messages over while the window has room, unless another thread is at it.

        Called after a message is queued, after a place in the window is
        freed, and by the publisher thread. Never holds the condition while
        publishing: paho calls ``on_publish`` (here: ``answered``) holding its
        own lock. The unlocked first look only saves the lock when nothing is
        queued: whoever queues a message pumps after it.
        """
        if not self._queue:
            return
        while True:
            with self._condition:
                if self._in_hand or not self._connected or self._stopping or not self._queue:
                    return
                count = self.window.reserve(len(self._queue))
                if not count:
                    return  # the next answer frees a place and pumps again
                queue = self._queue
                batch = [queue.popleft() for _ in range(count)]
                self._in_hand = count
            self._hand_over_batch(map(self._unpack, batch))  # unpacked as each is handed over, not under the lock

    def _hand_over_batch(self, batch: Iterable[M]) -> None:
        """Hand over messages with places reserved for them, then let the next thread hand over.

        A QoS 1 message handed over while disconnected stays in paho's session
        and is sent on reconnect, so every message handed over counts in the
        window.
        """
        try:
            for item in batch:
                try:
                    self._hand_over(item)
                except (ValueError, RuntimeError) as error:  # paho refused the message itself
                    log.error("could not publish %s: %s", item.topic, error)
        finally:
            with self._condition:
                self._in_hand = 0

    def _run(self) -> None:
        """The publisher thread: what is queued when the connection comes (and a look every second)."""
        while not self._stopping:
            self._kick.wait(1.0)
            self._kick.clear()
            self._pump()

    def _hand_over(self, item: M) -> None:
        """Publish one message in a reserved place of the window (or skip it)."""
        if self._skip(item):
            self.window.release()
            return
        client = self._client
        self.window.hand_over(item, lambda: client.publish(item.topic, item.payload, qos=1, retain=item.retain))
