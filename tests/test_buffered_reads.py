"""The daemons' MQTT clients read their socket in large pieces, against a real Mosquitto."""

from __future__ import annotations

import time
from collections.abc import Iterator

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, wait_for
from daemons import publish_all, publisher

from config_loader import BrokerSettings
from mqtt_client import BufferedClient, make_client

TOPIC = "reads/burst"


@pytest.fixture
def socket_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Each read paho makes from a socket, by its size; paho's own reads and ours go through it."""
    sizes: list[int] = []
    plain = mqtt.Client._sock_recv

    def counted(client: mqtt.Client, bufsize: int) -> bytes:
        data = plain(client, bufsize)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(mqtt.Client, "_sock_recv", counted)
    yield sizes


def burst() -> list[bytes]:
    """Payloads of every size class: tiny, a few hundred bytes, and larger than a read (100 kB)."""
    payloads = [f"{n:04d}".encode() * (1 + n % 50) for n in range(600)]
    for n in (50, 300, 599):
        payloads[n] = bytes([n % 256]) * 100_000
    return payloads


def test_a_burst_arrives_whole_and_in_order_with_a_read_for_many_packets_not_several_for_each(
        internal_broker: Mosquitto, socket_reads: list[int]) -> None:
    """paho read each packet with 3 to 5 ``recv`` calls; each let go of the interpreter lock.

    The burst waits in the socket while the client's loop is not run, so that
    many packets come in together, as in a backlog.
    """
    received: list[bytes] = []
    client = make_client(BrokerSettings(host="127.0.0.1", port=internal_broker.port), "buffered-reads")
    assert isinstance(client, BufferedClient)
    client.on_message = lambda _c, _u, message: received.append(message.payload)
    subscribed: list[object] = []
    client.on_subscribe = lambda *args: subscribed.append(args)
    client.connect("127.0.0.1", internal_broker.port)
    client.subscribe(TOPIC, qos=0)
    deadline = time.monotonic() + 10
    while not subscribed and time.monotonic() < deadline:
        client.loop(0.05)
    assert subscribed

    sender = publisher(internal_broker.port, max_inflight=1000)
    payloads = burst()
    publish_all(sender, [(TOPIC, payload) for payload in payloads])
    socket_reads.clear()
    deadline = time.monotonic() + 20
    while len(received) < len(payloads) and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    sender.disconnect()

    assert received == payloads
    # 600 packets: paho alone read them with at least 1,800 recv calls.
    assert len(socket_reads) < len(payloads) // 4, f"{len(socket_reads)} reads for {len(payloads)} packets"


def test_bytes_read_from_a_closed_connection_are_not_taken_for_the_next_ones(internal_broker: Mosquitto) -> None:
    """What a closed connection left in the buffer is dropped: the next connection starts at its first byte."""
    client = make_client(BrokerSettings(host="127.0.0.1", port=internal_broker.port), "buffered-reconnect")
    assert isinstance(client, BufferedClient)
    connected: list[object] = []
    client.on_connect = lambda *args: connected.append(args)
    client.connect("127.0.0.1", internal_broker.port)
    wait_for(lambda: client.loop(0.05) is not None and connected)
    client._read_buffer, client._read_offset = b"\x30\x05stale", 0  # a packet cut short by the close
    client.reconnect()
    wait_for(lambda: client.loop(0.05) is not None and len(connected) == 2)
    assert client.is_connected()
    client.disconnect()
