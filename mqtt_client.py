"""The project's MQTT clients: construction, the connection's handshake, and honest reports of it.

Client construction (credentials, TLS with host-name verification, last
will, reconnect backoff), each connection's handshake (the MQTT version, with
a fall-back from 5 to 3.1.1; the CONNACK timeout; the limits the broker
announces; honest diagnoses of failures) and what a PUBACK says. Both
daemons build their clients here; nothing else imports paho's client setup.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import ssl
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from config_loader import (
    PROTOCOL_5,
    PROTOCOL_311,
    PROTOCOL_AUTO,
    BrokerSettings,
)

# paho's own reconnect backoff (seconds): quick first retry, doubling, capped so
# that a broker coming back is found within half a minute. Each client draws its own
# first delay (the jitter), so that many clients do not retry in lock-step.
RECONNECT_MIN_DELAY = 1.0
RECONNECT_MAX_DELAY = 30.0
# After the broker refused our credentials, retrying fast cannot help.
REFUSED_MIN_DELAY = 30.0
REFUSED_MAX_DELAY = 300.0
CREDENTIALS_REFUSED = frozenset(("Bad user name or password", "Not authorized"))
SESSION_TAKEN_OVER = "Session taken over"
UNSUPPORTED_PROTOCOL = "Unsupported protocol version"  # also paho's name for MQTT 3.1.1's refusal of a version
RETAIN_NOT_SUPPORTED = "Retain not supported"
QOS_NOT_SUPPORTED = "QoS not supported"
# The broker settings to change, in Mosquitto's words (other brokers have their equivalents).
FIX_RETAIN = "set retain_available true in the broker's configuration (Mosquitto), or its equivalent"
FIX_QOS = "set max_qos 1 (or 2) in the broker's configuration (Mosquitto), or its equivalent"
# Connections closed this soon after they began, this many times in a row and with
# nothing else to explain it, are taken for a fight over one client id (see
# ConnectionReporter.disconnected). Three, so that two quick broker restarts are not.
SHORT_LIVED_SECONDS = 10.0
SHORT_LIVED_LIMIT = 3
# A broker that has not answered the CONNECT by then is not going to: see ConnectionReporter.
CONNACK_TIMEOUT_SECONDS = 10.0
# Ports that by convention speak MQTT over TLS, and plain MQTT: a mismatch with the
# ``tls`` setting is the likely reason a connection ends as soon as it began.
TLS_PORTS = frozenset((443, 8443, 8883, 8884, 8885, 8886))
PLAIN_PORTS = frozenset((1883, 1884, 11883))
MQTT_VERSIONS = {PROTOCOL_5: MQTTProtocolVersion.MQTTv5, PROTOCOL_311: MQTTProtocolVersion.MQTTv311}


class BufferedClient(mqtt.Client):
    """paho's client, reading its socket up to 64 KiB at a time instead of a few bytes.

    paho reads each packet with several ``recv`` calls: one byte for its
    type, one per byte of its length, then the rest; and the client that has
    nothing in flight (the internal one, at QoS 0) reads one packet per wait
    on the socket. Each of those is a system call that lets go of the
    interpreter lock, which the other network thread then takes: a backlog
    drained at QoS 0 spent most of its time there. Here one ``recv`` fills a
    buffer that serves paho's small reads, and every packet already in it is
    handled before paho waits on the socket again (data in the buffer would
    not wake that wait). What paho sees is the same stream of bytes.
    """

    READ_SIZE = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = b""
        self._read_offset = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        start = self._read_offset
        buffered = len(self._read_buffer) - start
        if buffered <= 0:
            data = super()._sock_recv(self.READ_SIZE)  # BlockingIOError when nothing has come
            if len(data) <= bufsize:  # all of it wanted, or b"": the connection closed
                return data
            self._read_buffer, start, buffered = data, 0, len(data)
        end = start + min(bufsize, buffered)
        self._read_offset = end
        return self._read_buffer[start:end]

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        result = super().loop_read(max_packets)
        while (result == mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None
               and self._read_offset < len(self._read_buffer)):
            result = super().loop_read(max_packets)
        return result

    def _sock_close(self) -> None:
        self._read_buffer, self._read_offset = b"", 0  # the next connection's bytes start afresh
        super()._sock_close()


def make_client(
    settings: BrokerSettings,
    client_id: str,
    *,
    will_topic: str | None = None,
    will_payload: str | None = None,
) -> mqtt.Client:
    """A client for ``settings``, not yet connected; its ``ConnectionReporter`` picks the MQTT version.

    Built for MQTT 5 (the only version whose options paho takes at
    construction and connection alike); ``use_protocol`` switches it. TLS
    always verifies the broker's certificate and host name: there is no
    option to turn that off, and no plaintext fallback.
    """
    client = BufferedClient(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=MQTTProtocolVersion.MQTTv5,
    )
    if settings.username is not None:
        client.username_pw_set(settings.username, settings.password)
    if settings.tls is not None:
        client.tls_set(
            ca_certs=settings.tls.ca_file,
            certfile=settings.tls.cert_file,
            keyfile=settings.tls.key_file,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    if will_topic is not None:
        client.will_set(will_topic, will_payload, qos=1, retain=True)
    reset_backoff(client)
    # TCP and TLS: the same patience as for the CONNACK.
    client.connect_timeout = CONNACK_TIMEOUT_SECONDS
    # A failing callback is logged and the network thread carries on, instead of
    # dying with the exception and leaving the daemon deaf.
    client.suppress_exceptions = True
    paho_log = logging.getLogger(f"paho.{client_id}")
    paho_log.addFilter(_drop_disconnected_loop_noise)
    client.enable_logger(paho_log)
    return client


def _drop_disconnected_loop_noise(record: logging.LogRecord) -> bool:
    """paho's ERRORs that ConnectionReporter words better, or that are no errors at all.

    paho logs one for every loop pass after a deliberate disconnect, and one
    for a connection reset, which the reporter says (with its likely cause).
    """
    message = record.getMessage()
    return not (message.startswith("Client is not connected") or message.startswith("failed to receive on socket"))


def connect_in_background(client: mqtt.Client, settings: BrokerSettings, *,
                          clean_start: bool = True, session_expiry: int = 0,
                          receive_maximum: int | None = None) -> None:
    """Start paho's network thread; it connects and reconnects with backoff by itself.

    ``clean_start``, ``session_expiry`` and ``receive_maximum`` are MQTT 5's;
    under MQTT 3.1.1 ``clean_start=False`` becomes ``clean_session`` false (a
    session the broker keeps) and the rest does not exist (see use_protocol).
    """
    properties = Properties(PacketTypes.CONNECT)
    if session_expiry:
        properties.SessionExpiryInterval = session_expiry
    if receive_maximum:
        properties.ReceiveMaximum = receive_maximum
    client.connect_async(
        settings.host,
        settings.port,
        keepalive=settings.keepalive_seconds,
        clean_start=clean_start,
        properties=properties,
    )
    client.loop_start()


def use_protocol(client: mqtt.Client, version: str) -> None:
    """Make paho speak MQTT ``version`` (PROTOCOL_5 or PROTOCOL_311) from its next connection attempt on.

    paho fixes the version when the client is built and changes the same
    attribute itself only to fall back from 3.1.1 to 3.1; the connection
    options given to ``connect_async`` stay, and MQTT 3.1.1's clean_session
    follows MQTT 5's clean_start, so that a persistent session stays one.
    Call it between attempts only (``on_pre_connect``): paho-mqtt is pinned,
    and the tests against real brokers of either version check these fields.
    """
    client._protocol = MQTT_VERSIONS[version]
    client._clean_session = bool(client._clean_start)


@dataclass(frozen=True)
class BrokerLimits:
    """What a broker announced it cannot take (MQTT 5 CONNACK); MQTT 3.1.1 brokers announce nothing."""

    retain_available: bool = True
    maximum_qos: int = 2
    maximum_packet_size: int | None = None  # bytes of a whole packet; None: no limit announced


def broker_limits(properties: Any) -> BrokerLimits:
    """The limits in a CONNACK's properties; a value of the wrong type or range counts as not announced."""

    def announced(name: str, low: int, high: int) -> int | None:
        value = getattr(properties, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        return None

    retain = announced("RetainAvailable", 0, 1)
    qos = announced("MaximumQoS", 0, 1)
    return BrokerLimits(retain_available=retain != 0, maximum_qos=2 if qos is None else qos,
                        maximum_packet_size=announced("MaximumPacketSize", 1, 2**32 - 1))


def _variable_length_size(length: int) -> int:
    """Bytes of MQTT's "remaining length" (7 bits a byte)."""
    size = 1
    while length >= 128:
        length >>= 7
        size += 1
    return size


def publish_packet_size(topic: str, payload_size: int, qos: int, mqtt5: bool) -> int:
    """The size in bytes of the PUBLISH packet paho sends for this message (no properties, no topic alias).

    MQTT 5's Maximum Packet Size counts the whole packet: fixed header,
    topic, packet id (QoS > 0), the properties' length (MQTT 5) and payload.
    """
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos else 0) + (1 if mqtt5 else 0) + payload_size
    return 1 + _variable_length_size(remaining) + remaining


def tls_hint(port: int, tls: bool, section: str) -> str:
    """What a connection ended at once suggests about TLS, from the port and the ``tls`` setting ('' if nothing)."""
    if not tls and port in TLS_PORTS:
        return f"port {port} usually speaks MQTT over TLS: set {section}.tls"
    if tls and port in PLAIN_PORTS:
        return f"port {port} usually speaks plain MQTT: check {section}.port and {section}.tls"
    return ""


def reset_backoff(client: mqtt.Client) -> None:
    """The normal reconnect backoff, with a jittered first delay."""
    client.reconnect_delay_set(RECONNECT_MIN_DELAY * random.uniform(1.0, 2.0), RECONNECT_MAX_DELAY)


def slow_backoff(client: mqtt.Client) -> None:
    """Retry slowly: the broker refused us, and hammering it will not change that."""
    client.reconnect_delay_set(REFUSED_MIN_DELAY * random.uniform(1.0, 1.5), REFUSED_MAX_DELAY)


def describe_connect_failure(error: BaseException | None) -> str:
    """Why a connection attempt failed, in words an operator can act on."""
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate of the broker not accepted: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {error.reason or error}"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is the broker running, and is the port right?)"
    if isinstance(error, socket.gaierror):
        return f"host name not found ({error.strerror})"
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    return "unknown error"


def send_without_delay(sock: Any) -> None:
    """Switch Nagle's algorithm off on a client's new socket (TCP_NODELAY), TLS or not.

    paho writes each MQTT packet whole and leaves the option alone. With
    Nagle's algorithm a small packet written while an earlier one is still
    unacknowledged waits for that ACK, and a peer that has nothing to send
    back delays it by up to 40 ms (delayed ACK): a PUBLISH, or a PUBACK the
    internal broker's window waits for, then stalls the stream behind it.
    Measured with bench/run.py's latency run (1,000 msg/s): stalls of 45-75 ms
    without it. A socket that is not TCP (none of ours) keeps its default.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ConnectionReporter:
    """Runs one broker connection's handshake, logs its failures clearly and adapts the backoff.

    - The MQTT version: the configured one, or with ``protocol: auto`` MQTT 5
      first and 3.1.1 when the broker refuses the version, closes the
      connection before its CONNACK or sends none within
      ``CONNACK_TIMEOUT_SECONDS``. The version in use is logged once, and
      under 3.1.1 what the daemon loses (``mqtt311_loses``).
    - The broker's limits from its CONNACK (``limits``): no retained messages
      or QoS 0 only is one ERROR naming the broker setting to change.
    - Honest diagnoses: TLS problems (wrong CA, wrong host name) are ERRORs
      naming the cause, never followed by a plaintext attempt; refused
      credentials, retained messages or QoS slow the retries down; a refusal
      or a broker's DISCONNECT is not followed by a second, vaguer
      "disconnected"; a session taken over by another client with the same
      id is an ERROR only when the broker says so or when nothing else
      explains repeated short connections, and then retried slowly.
    - Every new socket sends without Nagle's algorithm (``send_without_delay``).

    paho calls the hooks on its network thread; the CONNACK timer runs on its
    own short-lived thread. Neither ever waits.
    """

    def __init__(self, client: mqtt.Client, name: str, settings: BrokerSettings, logger: logging.Logger, *,
                 mqtt311_loses: str = "", without_retain: str = "", qos0_only: str = "") -> None:
        self.client = client
        self.settings = settings
        self.section = f"{name}_broker"  # the configuration section, for the hints
        self.where = f"{name} broker {settings.host}:{settings.port}"
        self.log = logger
        self.mqtt311_loses = mqtt311_loses  # "cannot …": what the daemon loses under MQTT 3.1.1
        self.without_retain = without_retain  # what the daemon does when the broker keeps no retained messages
        self.qos0_only = qos0_only  # … and when it takes QoS 0 only
        self.slowed = False
        self.connected_at: float | None = None
        self.short_lived = 0  # unexplained connections in a row that were closed soon after they began
        self.limits = BrokerLimits()  # what the broker announced in its last CONNACK
        # The version of the next attempt; applied to paho when it starts (paho may itself
        # have fallen back from 3.1.1 to 3.1 meanwhile: applying it again undoes that).
        self.protocol = PROTOCOL_311 if settings.protocol == PROTOCOL_311 else PROTOCOL_5
        self._apply_protocol = True
        self._accepted: set[str] = set()  # versions this broker has accepted: auto keeps to them
        self._tried_311 = False  # auto fell back once already: closing on both versions is no version problem
        self._announced: str | None = None
        self._limits_logged: set[str] = set()
        self._last_refusal: str | None = None
        self._lock = threading.Lock()
        self._attempt = 0
        self._attempt_protocol = self.protocol
        self._awaiting_connack = False  # the current attempt's socket is open and no CONNACK came yet
        # Why the current connection ends, once logged: the disconnection paho reports after it is no news.
        self._ending: str | None = None
        self._timer: threading.Timer | None = None
        client.on_pre_connect = self._on_pre_connect
        client.on_socket_open = self._on_socket_open
        client.on_connect_fail = self._on_connect_fail

    # --- paho's hooks --------------------------------------------------------------

    def _on_pre_connect(self, client: mqtt.Client, _userdata: Any) -> None:
        with self._lock:
            self._attempt += 1
            self._awaiting_connack = False
            self._ending = None
            self._cancel_timer()
            if self._apply_protocol:
                use_protocol(client, self.protocol)
                self._apply_protocol = False
            self._attempt_protocol = self.protocol

    def _on_socket_open(self, _client: mqtt.Client, _userdata: Any, sock: Any) -> None:
        """The TCP (and TLS) connection is up and the CONNECT about to go: its CONNACK is due in time."""
        send_without_delay(sock)
        with self._lock:
            self._awaiting_connack = True
            self._timer = threading.Timer(CONNACK_TIMEOUT_SECONDS, self._connack_overdue, args=(self._attempt,))
            self._timer.daemon = True
            self._timer.start()

    def _connack_overdue(self, attempt: int) -> None:
        """No CONNACK in time: say what the broker may be, then close the socket; paho retries with backoff."""
        with self._lock:
            # Nothing to say once the daemon has stopped the client (its network thread ends).
            if attempt != self._attempt or not self._awaiting_connack or not network_thread_alive(self.client):
                return
            self._awaiting_connack = False
            self._ending = "no CONNACK"
            version = self._attempt_protocol
            switched = self._fall_back()
            sock = self.client.socket()
            if sock is not None:
                # Only the socket itself is shut (never paho's state, which its own thread owns):
                # its network loop then sees the connection end, as if the broker had closed it.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)  # type: ignore[arg-type]
        self.log.warning("no answer from the %s within %g s of connecting with MQTT %s: not an MQTT broker, "
                         "a broker that does not understand MQTT %s, or a TLS port spoken to in plain text or "
                         "the other way round%s; %s", self.where, CONNACK_TIMEOUT_SECONDS, version, version,
                         self._tls_hint(), self._next_step(switched))

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        # paho calls this inside its `except OSError` block: the error is at hand.
        error = sys.exc_info()[1]
        with self._lock:
            self._awaiting_connack = False
            self._cancel_timer()
        # The broker could not be reached: an outage or a restart explains the connections before.
        self.short_lived = 0
        hint = ""
        # A plain port answers a TLS handshake with garbage or by hanging up: a setting to fix, an ERROR.
        if self.settings.tls is not None and isinstance(error, ssl.SSLError | ConnectionResetError) \
                and not isinstance(error, ssl.SSLCertVerificationError):
            hint = self._tls_hint() or (f" (does port {self.settings.port} speak plain MQTT? check "
                                        f"{self.section}.port and .tls)")
        level = logging.ERROR if isinstance(error, ssl.SSLError) or hint else logging.WARNING
        self.log.log(level, "cannot connect to the %s: %s%s; retrying", self.where, describe_connect_failure(error),
                     hint)

    # --- called from the daemons' callbacks --------------------------------------------

    def connected(self, reason_code: Any, properties: Any = None) -> bool:
        """Call from on_connect: False (and logged) when the broker refused us."""
        with self._lock:
            self._awaiting_connack = False
            self._cancel_timer()
            version = self._attempt_protocol
        if not reason_code.is_failure:
            self.connected_at = time.monotonic()
            self.limits = broker_limits(properties) if version == PROTOCOL_5 else BrokerLimits()
            self._last_refusal = None
            self._accepted.add(version)
            self._announce(version)
            self._log_limits()
            return True
        reason = reason_text(reason_code)
        with self._lock:
            self._ending = "refused"
            self._apply_protocol = True
            switched = self._fall_back() if reason == UNSUPPORTED_PROTOCOL else False
        if reason == UNSUPPORTED_PROTOCOL:
            if switched:
                self.log.info("the %s does not speak MQTT %s (%s): trying MQTT %s", self.where, version, reason,
                              self.protocol)
            else:
                self.log.error("the %s refused the connection: it does not speak MQTT %s (%s); set %s.protocol "
                               "to auto", self.where, version, reason, self.section)
        elif reason in CREDENTIALS_REFUSED:
            self.log.error("the %s refused the credentials (%s): check the username and password; "
                           "retrying slowly", self.where, reason)
            self._slow_down()
        elif reason == RETAIN_NOT_SUPPORTED:
            self._refused_for_good(reason, "it keeps no retained messages, and this daemon's last will is "
                                   f"retained: {FIX_RETAIN}")
        elif reason == QOS_NOT_SUPPORTED:
            self._refused_for_good(reason, "it takes QoS 0 only, and this daemon delivers at QoS 1: "
                                   f"{FIX_QOS}")
        else:
            self.log.error("the %s refused the connection: %s", self.where, reason)
        return False

    def disconnected(self, reason_code: Any, deliberate: bool, flags: Any = None) -> None:
        """Call from on_disconnect with paho's ``flags``: logs what ended the connection, once.

        Mosquitto 2.0 closes a connection taken over by another client with the
        same id without saying why (MQTT 5's "Session taken over" is not sent),
        so connections closed again and again soon after they began, with
        nothing else to explain it, are taken for that: two instances would
        otherwise evict each other every second. A broker restarting is
        explained by the attempts it refused meanwhile; and it takes
        ``SHORT_LIVED_LIMIT`` such connections, more than two quick restarts.
        """
        with self._lock:
            self._cancel_timer()
            before_connack, self._awaiting_connack = self._awaiting_connack, False
            ending = self._ending
            version = self._attempt_protocol
            from_broker = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            if from_broker or before_connack:
                self._ending = "closed"
            switched = self._fall_back() if before_connack and ending is None and not deliberate else False
        lasted = time.monotonic() - self.connected_at if self.connected_at is not None else None
        self.connected_at = None
        if deliberate:
            return
        reason = reason_text(reason_code)
        if ending is not None:
            self.log.debug("the connection to the %s closed (%s) after it %s", self.where, reason,
                           "was refused" if ending == "refused" else "ended")
            return
        if lasted is not None and lasted >= SHORT_LIVED_SECONDS:
            self.short_lived = 0
            if self.slowed:
                reset_backoff(self.client)
                self.slowed = False
        if before_connack:
            self._closed_before_connack(version, switched)
            return
        if reason == SESSION_TAKEN_OVER:
            self._taken_over(reason)
        elif from_broker:
            self.short_lived = 0  # explained by the broker itself
            self.log.warning("the %s closed the connection: %s; reconnecting", self.where, reason)
        elif lasted is not None and lasted < SHORT_LIVED_SECONDS and self.short_lived + 1 >= SHORT_LIVED_LIMIT:
            self.short_lived += 1
            self._taken_over(reason)
        else:
            if lasted is not None and lasted < SHORT_LIVED_SECONDS:
                self.short_lived += 1
            self.log.warning("disconnected from the %s (%s); reconnecting", self.where, reason)

    # --- the pieces ----------------------------------------------------------------

    def _closed_before_connack(self, version: str, switched: bool) -> None:
        if switched and version == PROTOCOL_5 and not self._tried_311:
            # auto's usual first step with a broker that speaks only 3.1.1 (RabbitMQ before 3.13).
            self._tried_311 = True
            self.log.info("the %s closed the connection without answering MQTT 5: trying MQTT 3.1.1", self.where)
            return
        self.log.warning("the %s closed the connection before answering the CONNECT (MQTT %s): %s; %s",
                         self.where, version,
                         self._tls_hint().removeprefix(" (").removesuffix(")")
                         or f"not an MQTT broker, a broker that does not understand MQTT {version} or refuses "
                            "this client at once, or a TLS port spoken to in plain text",
                         self._next_step(switched))

    def _taken_over(self, reason: str) -> None:
        self.log.error("another client with the same client id took over the session on the %s "
                       "(%s; a second instance running?); retrying slowly", self.where, reason)
        self._slow_down()

    def _refused_for_good(self, reason: str, why: str) -> None:
        """A refusal only the broker's administrator can lift: one ERROR, then slow retries."""
        if reason == self._last_refusal:
            self.log.debug("the %s refused the connection again (%s)", self.where, reason)
        else:
            self._last_refusal = reason
            self.log.error("the %s refused the connection (%s): %s; retrying slowly", self.where, reason, why)
        self._slow_down()

    def _announce(self, version: str) -> None:
        """Which MQTT version is in use, once (and again only if it changes), and what 3.1.1 costs."""
        if version == self._announced:
            return
        self._announced = version
        self.log.info("using MQTT %s with the %s%s", version, self.where,
                      " (protocol: auto)" if self.settings.protocol == PROTOCOL_AUTO else "")
        if version == PROTOCOL_311 and self.mqtt311_loses:
            self.log.warning("under MQTT 3.1.1 the %s %s", self.where, self.mqtt311_loses)

    def _log_limits(self) -> None:
        """The limits the broker announced that change what this daemon does: each once."""
        limits = self.limits
        if not limits.retain_available and "retain" not in self._limits_logged:
            self._limits_logged.add("retain")
            self.log.error("the %s keeps no retained messages (Retain Available 0 in its CONNACK): %s%s",
                           self.where, FIX_RETAIN, f"; until then {self.without_retain}" if self.without_retain else "")
        if limits.maximum_qos == 0 and "qos" not in self._limits_logged:
            self._limits_logged.add("qos")
            self.log.error("the %s takes QoS 0 only (Maximum QoS 0 in its CONNACK): %s%s", self.where, FIX_QOS,
                           f"; until then {self.qos0_only}" if self.qos0_only else "")
        size = limits.maximum_packet_size
        if size is not None and f"size {size}" not in self._limits_logged:
            self._limits_logged.add(f"size {size}")
            self.log.info("the %s takes packets of at most %d bytes: larger messages are not sent", self.where, size)

    def _fall_back(self) -> bool:
        """``auto``: speak the other version at the next attempt, unless this one worked with this broker.

        Caller holds the lock. A version once accepted is kept: a broker that
        restarts and closes a connection early must not cost MQTT 5.
        """
        if self.settings.protocol != PROTOCOL_AUTO or self._attempt_protocol in self._accepted:
            return False
        self.protocol = PROTOCOL_311 if self._attempt_protocol == PROTOCOL_5 else PROTOCOL_5
        self._apply_protocol = True
        return True

    def _next_step(self, switched: bool) -> str:
        return f"trying MQTT {self.protocol} next" if switched else "retrying"

    def _tls_hint(self) -> str:
        hint = tls_hint(self.settings.port, self.settings.tls is not None, self.section)
        return f" ({hint})" if hint else ""

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _slow_down(self) -> None:
        if not self.slowed:
            slow_backoff(self.client)
            self.slowed = True


def reason_text(reason_code: Any) -> str:
    """A reason code as words, whatever paho handed over."""
    return str(getattr(reason_code, "getName", lambda: reason_code)())


def refused_filters(filters: Sequence[str], reason_codes: Sequence[Any]) -> tuple[str, ...]:
    """``"<filter> (<reason>)"`` for each filter a SUBACK refused: its codes follow the filters' order."""
    return tuple(f"{topic} ({reason_text(code)})" for topic, code in zip(filters, reason_codes, strict=False)
                 if code.is_failure)


def refusal(reason_code: Any) -> str | None:
    """Why the broker refused a publish (its PUBACK reason ≥ 0x80), or None when it took it.

    MQTT 5 brokers refuse a QoS 1 publish in the PUBACK (Mosquitto 2.0 sends
    0x87 "Not authorized" for one its ACL denies) and deliver it to nobody, so
    a PUBACK is not proof of delivery. "No matching subscribers" (0x10) is
    not a refusal. Anything but a reason code counts as accepted: that is
    what paho reports for MQTT 3.1.1, whose PUBACK carries no reason.
    """
    if not isinstance(reason_code, ReasonCode) or not reason_code.is_failure:
        return None
    return reason_text(reason_code)


def network_thread_alive(client: mqtt.Client) -> bool:
    """Whether paho's network thread still runs (for the systemd watchdog)."""
    thread = getattr(client, "_thread", None)
    return thread is not None and thread.is_alive()


