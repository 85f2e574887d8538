"""The shipped internal broker configuration, run for real.

mosquitto/internal.conf is started with only its site-specific lines rewritten
(listener port, password file, ACL, persistence directory, log destination),
so every other setting is the production one. Accounts are made with
scripts/meter-account.sh, exactly as an operator would, and the ACL is the
shipped mosquitto/acl plus the meter sections that script appends.

"Must not arrive" is asserted without sleeping: after the forbidden message a
control message the subscriber may receive is sent on the same path; once the
control message is in, the forbidden one would have been delivered before it.
A test-only observer account that may read everything (appended to the ACL
copy) shows whether a refused publish reached the broker's subscribers at all.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker import Mosquitto, free_port, wait_for
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

ROOT = Path(__file__).resolve().parent.parent
METER_ACCOUNT = ROOT / "scripts" / "meter-account.sh"

METER_A = "33B1225950027"
METER_B = "33B1225950028"
USER_A = METER_A[-8:]
USER_B = METER_B[-8:]
PASSWORD = "meter-secret"
PROXY = "kpm33b-proxy"
SENDER = "kpm33b-config-sender"
OBSERVER = "kpm33b-test-observer"
NOT_AUTHORIZED = 135


def accepted(reason_code: ReasonCode) -> bool:
    """A PUBACK that is not a refusal ("No matching subscribers" is fine)."""
    return not reason_code.is_failure


def fake_systemctl(directory: Path, broker_pid: int | None = None) -> Path:
    """A ``systemctl`` that logs its calls: kpm33b-broker is active when ``broker_pid`` is given.

    Its ``reload`` does what the unit's ExecReload= does (SIGHUP to the broker),
    so a test sees the real broker take the change. Without a pid the broker is
    inactive, as on a machine where the units are not installed or not started.
    Every run of meter-account.sh in these tests gets one, so that none of them
    can reach a kpm33b-broker really installed on the machine.
    """
    directory.mkdir(parents=True, exist_ok=True)
    active = f'case "$1" in is-active) exit 0 ;; reload) kill -HUP {broker_pid} ;; esac' if broker_pid else \
        'case "$1" in is-active) exit 3 ;; esac'
    script = directory / "systemctl"
    script.write_text(f'#!/bin/sh\necho "$*" >> "{directory}/calls"\n{active}\n')
    script.chmod(0o755)
    return directory


def meter_account(passwd: Path, *args: str, systemctl: Path | None = None,
                  env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run scripts/meter-account.sh on a throw-away password file and ACL (``systemctl``: its fake's folder)."""
    bin_dir = systemctl or fake_systemctl(passwd.parent / "inactive-systemd")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("KPM33B_")}
    environment.update(PATH=f"{bin_dir}:{os.environ['PATH']}", **(env or {}))
    return subprocess.run(
        ["bash", str(METER_ACCOUNT), "--passwd-file", str(passwd), *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
    )


def rewrite_line(text: str, pattern: str, replacement: str) -> str:
    """Replace the one line matching ``pattern``; fail if it is not exactly one."""
    new_text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    assert count == 1, f"expected one line matching {pattern!r} in internal.conf, found {count}"
    return new_text


def internal_conf_for_test(workdir: Path, port: int, log_path: Path) -> str:
    """internal.conf with the listener and the file locations moved into ``workdir``."""
    text = (ROOT / "mosquitto" / "internal.conf").read_text()
    text = rewrite_line(text, r"^listener 11883$", f"listener {port} 127.0.0.1")
    text = rewrite_line(text, r"^password_file .*$", f"password_file {workdir / 'passwd'}")
    text = rewrite_line(text, r"^acl_file .*$", f"acl_file {workdir / 'acl'}")
    text = rewrite_line(text, r"^persistence_location .*$", f"persistence_location {workdir}/")
    text = rewrite_line(text, r"^log_dest syslog$", f"log_dest file {log_path}")
    # Started as root (a container), mosquitto would switch to the "mosquitto"
    # user, which cannot read these files; under systemd it is never root.
    return text + f"user {pwd.getpwuid(os.geteuid()).pw_name}\n"


class Client:
    """A paho 2.x client that records what happens to it, for assertions with deadlines."""

    def __init__(
        self,
        port: int,
        username: str | None,
        password: str | None = PASSWORD,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv5,
        client_id: str | None = None,
        clean: bool = True,
    ) -> None:
        self._lock = threading.Lock()
        self.connack: ReasonCode | None = None
        self.messages: list[tuple[str, bytes]] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.pubacks: dict[int, ReasonCode] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{username}-{uuid.uuid4().hex[:8]}",
            protocol=protocol,
            clean_session=None if protocol == mqtt.MQTTv5 else clean,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        if protocol == mqtt.MQTTv5:
            self.client.connect("127.0.0.1", port, keepalive=30, clean_start=clean)
        else:
            self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        wait_for(lambda: self.connack is not None, timeout=10)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connack = reason_code
        if reason_code.is_failure:
            # Do not let paho retry a refused account in the background.
            client.disconnect()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append((message.topic, message.payload))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        with self._lock:
            self.subacks[mid] = reason_codes

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._lock:
            self.pubacks[mid] = reason_code

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, *topics: str) -> list[ReasonCode]:
        """Subscribe at QoS 1 and return the SUBACK reason codes."""
        result, mid = self.client.subscribe([(topic, 1) for topic in topics])
        assert result == mqtt.MQTT_ERR_SUCCESS
        wait_for(lambda: mid in self.subacks, timeout=10)
        return self.subacks[mid]

    def publish(self, topic: str, payload: str) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code (MQTT 5 tells refusals)."""
        info = self.client.publish(topic, payload, qos=1)
        wait_for(lambda: info.mid in self.pubacks, timeout=10)
        return self.pubacks[info.mid]

    def received(self, topic: str, payload: str | None = None) -> bool:
        with self._lock:
            return any(t == topic and (payload is None or p == payload.encode()) for t, p in self.messages)

    def topics(self) -> list[str]:
        with self._lock:
            return [topic for topic, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class InternalBroker:
    """The production configuration on a free port, with two meters and both daemons' accounts."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.dir = tmp_path
        self.passwd = tmp_path / "passwd"
        self.acl = tmp_path / "acl"
        self.acl.write_text((ROOT / "mosquitto" / "acl").read_text())
        for args in (
            ("add", METER_A, PASSWORD),
            ("add", METER_B, PASSWORD),
            ("add-service", PROXY, PASSWORD),
            ("add-service", SENDER, PASSWORD),
        ):
            result = meter_account(self.passwd, *args)
            assert result.returncode == 0, result.stderr
        # Test-only: an account that may read everything, to see whether a
        # refused publish got through to subscribers.
        with self.acl.open("a") as acl:
            acl.write(f"user {OBSERVER}\ntopic read #\n")
        subprocess.run(["mosquitto_passwd", "-b", str(self.passwd), OBSERVER, PASSWORD], check=True, timeout=30)
        self.config = tmp_path / "internal.conf"
        self.mosquitto = Mosquitto(port=self.port, config_file=self.config)
        self.config.write_text(internal_conf_for_test(tmp_path, self.port, self.mosquitto.log_path))
        self.clients: list[Client] = []

    def connect(self, username: str | None, **kwargs: object) -> Client:
        client = Client(self.port, username, **kwargs)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def login(self, username: str, **kwargs: object) -> Client:
        client = self.connect(username, **kwargs)
        assert client.connected, f"{username} refused: {client.connack}\n{self.mosquitto.log()}"
        return client

    def reload(self) -> None:
        """What `systemctl reload kpm33b-broker` does: SIGHUP."""
        assert self.mosquitto.process is not None
        self.mosquitto.process.send_signal(signal.SIGHUP)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.mosquitto.cleanup()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[InternalBroker]:
    internal = InternalBroker(tmp_path)
    internal.mosquitto.start()
    yield internal
    internal.close()


def test_config_keeps_the_production_settings() -> None:
    text = (ROOT / "mosquitto" / "internal.conf").read_text()
    settings = [line.split(None, 1) for line in text.splitlines() if line and not line.startswith("#")]
    values = {key: value for key, value in settings}
    assert values["listener"] == "11883"
    assert values["allow_anonymous"] == "false"
    assert values["password_file"] == "/etc/kpm33b/mosquitto/passwd"
    assert values["acl_file"] == "/etc/kpm33b/mosquitto/acl"
    assert values["persistence"] == "true"
    assert values["persistence_location"].startswith("/var/lib/kpm33b/mosquitto")
    assert values["max_queued_messages"] == "200000"
    assert values["message_size_limit"] == "65536"
    assert values["persistent_client_expiration"] == "7d"


def test_meter_publishes_readings_that_the_proxy_receives(broker: InternalBroker) -> None:
    proxy = broker.login(PROXY)
    assert [code.value for code in proxy.subscribe("MQTT_RT_DATA", "MQTT_ENY_NOW")] == [1, 1]
    meter = broker.login(USER_A)

    assert accepted(meter.publish("MQTT_ENY_NOW", '{"id":"33B1225950027"}'))
    assert accepted(meter.publish("MQTT_RT_DATA", '{"id":"33B1225950027","zyggl":1.5}'))

    wait_for(lambda: proxy.received("MQTT_ENY_NOW", '{"id":"33B1225950027"}'))
    wait_for(lambda: proxy.received("MQTT_RT_DATA"))


def test_meter_receives_its_own_commands_and_the_sender_its_replies(broker: InternalBroker) -> None:
    meter = broker.login(USER_A, protocol=mqtt.MQTTv311)
    meter.subscribe(f"MQTT_COMMOD_SET_{USER_A}", f"MQTT_SETTIME_{USER_A}")
    sender = broker.login(SENDER)
    sender.subscribe("MQTT_COMMOD_SET_REP", "MQTT_METER_TIME_REP")

    assert accepted(sender.publish(f"MQTT_COMMOD_SET_{USER_A}", "interval"))
    assert accepted(sender.publish(f"MQTT_SETTIME_{USER_A}", "clock"))
    wait_for(lambda: meter.received(f"MQTT_COMMOD_SET_{USER_A}", "interval"))
    wait_for(lambda: meter.received(f"MQTT_SETTIME_{USER_A}", "clock"))

    meter.publish("MQTT_COMMOD_SET_REP", "set-ack")
    meter.publish("MQTT_METER_TIME_REP", "time-ack")
    wait_for(lambda: sender.received("MQTT_COMMOD_SET_REP", "set-ack"))
    wait_for(lambda: sender.received("MQTT_METER_TIME_REP", "time-ack"))


def test_meter_does_not_receive_another_meters_commands(broker: InternalBroker) -> None:
    meter_a = broker.login(USER_A, protocol=mqtt.MQTTv311)
    meter_a.subscribe(f"MQTT_COMMOD_SET_{USER_B}", f"MQTT_SETTIME_{USER_B}", f"MQTT_COMMOD_SET_{USER_A}")
    meter_b = broker.login(USER_B, protocol=mqtt.MQTTv311)
    meter_b.subscribe(f"MQTT_COMMOD_SET_{USER_B}")
    sender = broker.login(SENDER)

    sender.publish(f"MQTT_COMMOD_SET_{USER_B}", "for-b")
    sender.publish(f"MQTT_SETTIME_{USER_B}", "clock-for-b")
    sender.publish(f"MQTT_COMMOD_SET_{USER_A}", "control")

    wait_for(lambda: meter_a.received(f"MQTT_COMMOD_SET_{USER_A}", "control"))
    wait_for(lambda: meter_b.received(f"MQTT_COMMOD_SET_{USER_B}", "for-b"))
    assert meter_a.topics() == [f"MQTT_COMMOD_SET_{USER_A}"]


def test_meter_cannot_publish_commands_or_network_settings(broker: InternalBroker) -> None:
    observer = broker.login(OBSERVER, protocol=mqtt.MQTTv311)
    observer.subscribe("#")
    meter_b = broker.login(USER_B, protocol=mqtt.MQTTv311)
    meter_b.subscribe(f"MQTT_COMMOD_SET_{USER_B}")
    meter_a = broker.login(USER_A)

    forbidden = [
        f"MQTT_SET_{USER_A}",
        f"MQTT_SET_{USER_B}",
        f"MQTT_COMMOD_SET_{USER_B}",
        f"MQTT_TELECTRL_{USER_A}",
        f"MQTT_RECONFIG_{USER_A}",
    ]
    for topic in forbidden:
        assert meter_a.publish(topic, "forbidden").value == NOT_AUTHORIZED, topic
    assert accepted(meter_a.publish("MQTT_ENY_NOW", "control"))

    wait_for(lambda: observer.received("MQTT_ENY_NOW", "control"))
    assert observer.topics() == ["MQTT_ENY_NOW"]
    assert meter_b.topics() == []


def test_anonymous_and_wrong_password_clients_are_refused(broker: InternalBroker) -> None:
    for protocol in (mqtt.MQTTv311, mqtt.MQTTv5):
        anonymous = broker.connect(None, protocol=protocol)
        assert anonymous.connack is not None and anonymous.connack.value == NOT_AUTHORIZED
        assert not anonymous.connected
    wrong = broker.connect(USER_A, password="not-the-password", protocol=mqtt.MQTTv311)
    assert not wrong.connected
    unknown = broker.connect("12345678", password=PASSWORD)
    assert not unknown.connected


def test_proxy_reads_only_the_data_and_cannot_publish_commands(broker: InternalBroker) -> None:
    proxy = broker.login(PROXY)
    proxy.subscribe("MQTT_ENY_NOW", "MQTT_COMMOD_SET_REP", "MQTT_DAY_DATA", "MQTT_TELEIND")
    meter = broker.login(USER_A, protocol=mqtt.MQTTv311)
    meter.subscribe(f"MQTT_COMMOD_SET_{USER_A}", f"MQTT_SET_{USER_A}")
    sender = broker.login(SENDER)

    for topic in (f"MQTT_COMMOD_SET_{USER_A}", f"MQTT_SETTIME_{USER_A}", f"MQTT_SET_{USER_A}", "MQTT_RT_DATA"):
        assert proxy.publish(topic, "from-proxy").value == NOT_AUTHORIZED, topic
    sender.publish(f"MQTT_COMMOD_SET_{USER_A}", "control")
    wait_for(lambda: meter.received(f"MQTT_COMMOD_SET_{USER_A}", "control"))
    assert meter.topics() == [f"MQTT_COMMOD_SET_{USER_A}"]
    assert not meter.received(f"MQTT_COMMOD_SET_{USER_A}", "from-proxy")

    meter.publish("MQTT_COMMOD_SET_REP", "reply")
    meter.publish("MQTT_DAY_DATA", "day")
    meter.publish("MQTT_TELEIND", "di")
    meter.publish("MQTT_ENY_NOW", "control")
    wait_for(lambda: proxy.received("MQTT_ENY_NOW", "control"))
    assert proxy.topics() == ["MQTT_ENY_NOW"]


def test_sender_writes_commands_reads_replies_and_nothing_else(broker: InternalBroker) -> None:
    observer = broker.login(OBSERVER, protocol=mqtt.MQTTv311)
    observer.subscribe("#")
    sender = broker.login(SENDER)
    sender.subscribe("MQTT_ENY_NOW", "MQTT_RT_DATA", "MQTT_COMMOD_SET_REP")
    meter = broker.login(USER_A)

    assert accepted(sender.publish(f"MQTT_COMMOD_SET_{USER_A}", "interval"))
    assert accepted(sender.publish(f"MQTT_SETTIME_{USER_B}", "clock"))
    for topic in (f"MQTT_SET_{USER_A}", f"MQTT_TELECTRL_{USER_A}", "MQTT_RT_DATA", "MQTT_COMMOD_SET_REP"):
        assert sender.publish(topic, "from-sender").value == NOT_AUTHORIZED, topic
    # An account that is not a meter's gets no command topic either.
    assert sender.publish(f"MQTT_COMMOD_SET_{PROXY}", "from-sender").value == NOT_AUTHORIZED

    meter.publish("MQTT_ENY_NOW", "reading")
    meter.publish("MQTT_COMMOD_SET_REP", "reply")
    wait_for(lambda: sender.received("MQTT_COMMOD_SET_REP", "reply"))
    wait_for(lambda: observer.received("MQTT_COMMOD_SET_REP", "reply"))
    assert sender.topics() == ["MQTT_COMMOD_SET_REP"]
    assert sorted(set(observer.topics())) == sorted(
        {f"MQTT_COMMOD_SET_{USER_A}", f"MQTT_SETTIME_{USER_B}", "MQTT_ENY_NOW", "MQTT_COMMOD_SET_REP"}
    )


def test_removed_meter_is_refused_after_a_reload(broker: InternalBroker) -> None:
    meter = broker.login(USER_B)
    meter.close()

    result = meter_account(broker.passwd, "remove", METER_B)
    assert result.returncode == 0, result.stderr
    assert "systemctl reload kpm33b-broker" in result.stdout
    broker.reload()

    def refused() -> bool:
        client = broker.connect(USER_B)
        return not client.connected

    wait_for(refused, timeout=10)
    broker.login(USER_A)


def test_new_meter_can_connect_after_a_reload(broker: InternalBroker) -> None:
    new_meter = "KPM31A0000001"
    assert not broker.connect(new_meter[-8:]).connected
    result = meter_account(broker.passwd, "add", new_meter)
    assert result.returncode == 0, result.stderr
    password = re.search(r"Password \(shown only now\): (\S+)", result.stdout)
    assert password is not None, result.stdout
    broker.reload()

    wait_for(lambda: broker.connect(new_meter[-8:], password=password.group(1)).connected, timeout=10)
    proxy = broker.login(PROXY)
    proxy.subscribe("MQTT_RT_DATA")
    client = broker.login(new_meter[-8:], password=password.group(1))
    assert accepted(client.publish("MQTT_RT_DATA", "reading"))
    wait_for(lambda: proxy.received("MQTT_RT_DATA", "reading"))


def test_add_and_remove_reload_the_running_broker_themselves(broker: InternalBroker) -> None:
    """With kpm33b-broker active, nothing is left for the operator to do after `add` or `remove`."""
    assert broker.mosquitto.process is not None
    systemctl = fake_systemctl(broker.dir / "active-systemd", broker.mosquitto.process.pid)
    new_meter = "KPM31A0000002"
    assert not broker.connect(new_meter[-8:], password="new-secret").connected

    added = meter_account(broker.passwd, "add", new_meter, "new-secret", systemctl=systemctl)
    assert added.returncode == 0, added.stderr
    assert "kpm33b-broker has reloaded its accounts" in added.stdout
    assert "Apply it with" not in added.stdout
    wait_for(lambda: broker.connect(new_meter[-8:], password="new-secret").connected, timeout=10)

    removed = meter_account(broker.passwd, "remove", METER_B, systemctl=systemctl)
    assert removed.returncode == 0, removed.stderr
    assert "kpm33b-broker has reloaded its accounts" in removed.stdout
    wait_for(lambda: not broker.connect(USER_B).connected, timeout=10)
    assert (systemctl / "calls").read_text().splitlines() == [
        "is-active --quiet kpm33b-broker", "reload kpm33b-broker",
    ] * 2


def test_add_reloads_the_broker_named_by_its_pid_file(broker: InternalBroker) -> None:
    """The container's way: no systemd, the broker's pid in the file KPM33B_BROKER_PID_FILE names."""
    assert broker.mosquitto.process is not None
    pid_file = broker.dir / "mosquitto.pid"
    pid_file.write_text(f"{broker.mosquitto.process.pid}\n")
    new_meter = "KPM31A0000003"

    added = meter_account(broker.passwd, "add", new_meter, "new-secret", env={"KPM33B_BROKER_PID_FILE": str(pid_file)})
    assert added.returncode == 0, added.stderr
    assert "kpm33b-broker has reloaded its accounts" in added.stdout
    wait_for(lambda: broker.connect(new_meter[-8:], password="new-secret").connected, timeout=10)


def test_the_broker_log_lines_in_the_meter_guide_are_what_the_broker_logs(broker: InternalBroker) -> None:
    """doc/meters.md quotes the broker's lines for a meter that connects and one that is refused."""
    broker.login(USER_A, protocol=mqtt.MQTTv311, client_id="meter-a")
    assert not broker.connect(USER_A, password="not-the-password", protocol=mqtt.MQTTv311).connected
    quoted = [line for line in (ROOT / "doc" / "meters.md").read_text().splitlines()
              if line.startswith(("New connection from ", "New client connected from ", "Client <unknown> "))]
    assert len(quoted) >= 4, quoted
    logged = broker.mosquitto.log().splitlines()

    for line in quoted:
        # The guide's address, port, client id and keep-alive stand for anyone's.
        pattern = re.escape(line)
        for example, anything in (("192.168.1.57:51344", r"127\.0\.0\.1:\d+"), ("port 11883", r"port \d+"),
                                  ("<client id>", r"\S+"), ("k60", r"k\d+")):
            pattern = pattern.replace(re.escape(example), anything)
        assert any(re.fullmatch(pattern, entry) for entry in logged), f"{line!r} not in:\n{broker.mosquitto.log()}"


def test_queued_readings_beyond_a_thousand_survive_a_broker_restart(broker: InternalBroker) -> None:
    """A persistent proxy session keeps its queue while it is away, on disk across a restart."""
    proxy = broker.login(PROXY, protocol=mqtt.MQTTv311, client_id="kpm33b-proxy-test", clean=False)
    proxy.subscribe("MQTT_ENY_NOW")
    proxy.close()

    meter = broker.login(USER_A, protocol=mqtt.MQTTv311)
    count = 1500
    infos = [meter.client.publish("MQTT_ENY_NOW", str(number), qos=1) for number in range(count)]
    wait_for(lambda: all(info.mid in meter.pubacks for info in infos), timeout=20)
    meter.close()
    broker.mosquitto.restart()

    proxy = broker.login(PROXY, protocol=mqtt.MQTTv311, client_id="kpm33b-proxy-test", clean=False)
    wait_for(lambda: len(proxy.messages) >= count, timeout=20)
    assert [int(payload) for _, payload in proxy.messages] == list(range(count))
    assert "dropped" not in broker.mosquitto.log().lower()


def test_oversized_message_is_not_forwarded(broker: InternalBroker) -> None:
    proxy = broker.login(PROXY)
    proxy.subscribe("MQTT_RT_DATA")
    meter = broker.login(USER_A, protocol=mqtt.MQTTv311)
    meter.publish("MQTT_RT_DATA", "x" * 70_000)
    meter.publish("MQTT_RT_DATA", "control")
    wait_for(lambda: proxy.received("MQTT_RT_DATA", "control"))
    assert len(proxy.messages) == 1


@pytest.mark.parametrize("name", ["internal-dev.conf", "central-dev.conf"])
def test_development_brokers_accept_local_anonymous_clients(tmp_path: Path, name: str) -> None:
    port = free_port()
    text = (ROOT / "mosquitto" / name).read_text()
    text = rewrite_line(text, r"^listener \d+ 127\.0\.0\.1$", f"listener {port} 127.0.0.1")
    config = tmp_path / name
    config.write_text(text)
    dev = Mosquitto(port=port, config_file=config).start()
    try:
        client = Client(port, None)
        assert client.connected
        client.subscribe("MQTT_ENY_NOW")
        client.publish("MQTT_ENY_NOW", "reading")
        wait_for(lambda: client.received("MQTT_ENY_NOW", "reading"))
        client.close()
    finally:
        dev.cleanup()


# --- scripts/meter-account.sh on its own ----------------------------------------


@pytest.fixture
def accounts(tmp_path: Path) -> Path:
    """An empty password file beside a copy of the shipped ACL."""
    (tmp_path / "acl").write_text((ROOT / "mosquitto" / "acl").read_text())
    passwd = tmp_path / "passwd"
    passwd.touch()
    return passwd


@pytest.mark.parametrize("meter_id", ["33B122595002", "33B12259500277", "33B12259500-7", "", "33B1225950027 "])
def test_meter_account_rejects_what_is_not_a_meter_id(accounts: Path, meter_id: str) -> None:
    result = meter_account(accounts, "add", meter_id)
    assert result.returncode != 0
    assert "not a meter id" in result.stderr
    assert accounts.read_text() == ""


def test_meter_account_add_is_idempotent_and_listed(accounts: Path) -> None:
    acl = accounts.parent / "acl"
    for _ in range(2):
        result = meter_account(accounts, "add", METER_A, "pw1")
        assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in accounts.read_text().splitlines()] == [USER_A]
    assert acl.read_text().count(f"# >>> meter {METER_A}") == 1
    assert f"topic write MQTT_COMMOD_SET_{USER_A}\n" in acl.read_text()
    assert "Password (shown only now)" not in result.stdout

    listing = meter_account(accounts, "list")
    assert listing.returncode == 0
    assert re.search(rf"^{METER_A}\s+{USER_A}\s+set$", listing.stdout, re.MULTILINE), listing.stdout


def test_meter_account_refuses_a_second_id_with_the_same_last_eight(accounts: Path) -> None:
    assert meter_account(accounts, "add", METER_A).returncode == 0
    result = meter_account(accounts, "add", "44C1225950027")
    assert result.returncode != 0
    assert METER_A in result.stderr


def test_meter_account_remove_leaves_the_other_meters(accounts: Path) -> None:
    acl = accounts.parent / "acl"
    shipped = acl.read_text()
    assert meter_account(accounts, "add", METER_A).returncode == 0
    assert meter_account(accounts, "add", METER_B).returncode == 0
    assert meter_account(accounts, "remove", METER_A).returncode == 0

    assert [line.split(":")[0] for line in accounts.read_text().splitlines()] == [USER_B]
    assert METER_A not in acl.read_text()
    assert meter_account(accounts, "remove", METER_B).returncode == 0
    assert acl.read_text() == shipped
    again = meter_account(accounts, "remove", METER_B)
    assert again.returncode == 0
    assert "nothing to remove" in again.stdout


def test_meter_account_generates_a_password_and_manages_only_known_services(accounts: Path) -> None:
    first = meter_account(accounts, "add-service", PROXY)
    assert first.returncode == 0, first.stderr
    assert re.search(r"Password \(shown only now\): [A-Za-z0-9]{20}$", first.stdout, re.MULTILINE)
    assert "KPM33B_INTERNAL_USERNAME=kpm33b-proxy" in first.stdout
    refused = meter_account(accounts, "add-service", "admin")
    assert refused.returncode != 0
    assert [line.split(":")[0] for line in accounts.read_text().splitlines()] == [PROXY]


def test_meter_account_without_a_running_broker_says_how_to_apply_the_change(accounts: Path) -> None:
    result = meter_account(accounts, "add", METER_A, "pw1")
    assert result.returncode == 0, result.stderr
    assert "Apply it with: systemctl reload kpm33b-broker" in result.stdout
    assert "reloaded" not in result.stdout
    assert (accounts.parent / "inactive-systemd/calls").read_text().splitlines() == ["is-active --quiet kpm33b-broker"]


def test_meter_account_takes_ids_in_any_letter_case_as_upper_case(accounts: Path) -> None:
    """`add 33b…` then `remove 33B…` once left the ACL section behind, and it blocked a new `add`."""
    acl = accounts.parent / "acl"
    shipped = acl.read_text()
    for meter_id in ("33b1225950030", "kpm31a00000b2"):
        upper = meter_id.upper()
        added = meter_account(accounts, "add", meter_id, "pw1")
        assert added.returncode == 0, added.stderr
        assert f"Meter {upper}: account {upper[-8:]} added" in added.stdout
        assert f"# >>> meter {upper} " in acl.read_text()
        assert f"user {upper[-8:]}\n" in acl.read_text()
        assert f"topic write MQTT_COMMOD_SET_{upper[-8:]}\n" in acl.read_text()
        assert meter_id not in acl.read_text()
        assert [line.split(":")[0] for line in accounts.read_text().splitlines()] == [upper[-8:]]

        removed = meter_account(accounts, "remove", upper)
        assert removed.returncode == 0, removed.stderr
        assert acl.read_text() == shipped
        assert accounts.read_text() == ""

        again = meter_account(accounts, "add", upper, "pw1")
        assert again.returncode == 0, again.stderr
        assert meter_account(accounts, "remove", meter_id).returncode == 0
        assert acl.read_text() == shipped
        assert accounts.read_text() == ""


def test_meter_account_replaces_and_removes_a_section_an_older_version_wrote_in_lower_case(accounts: Path) -> None:
    acl = accounts.parent / "acl"
    shipped = acl.read_text()
    acl.write_text(shipped + (
        "# >>> meter 33b1225950030 (written by scripts/meter-account.sh; edit with it)\n"
        "user 25950030\ntopic write MQTT_RT_DATA\n"
        "user kpm33b-config-sender\ntopic write MQTT_COMMOD_SET_25950030\n"
        "# <<< meter 33b1225950030\n"
    ))

    added = meter_account(accounts, "add", "33B1225950030", "pw1")
    assert added.returncode == 0, added.stderr
    assert acl.read_text().lower().count("# >>> meter 33b1225950030 ") == 1
    assert "# >>> meter 33B1225950030 " in acl.read_text()

    assert meter_account(accounts, "remove", "33B1225950030").returncode == 0
    assert acl.read_text() == shipped


def lan_address() -> str:
    """This machine's address on its default route: one a meter on the LAN can reach."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # UDP: nothing is sent, the kernel only picks the source address
        return str(probe.getsockname()[0])


def test_meter_account_add_prints_what_to_enter_on_the_meter(accounts: Path) -> None:
    result = meter_account(accounts, "add", METER_A)
    assert result.returncode == 0, result.stderr
    server = re.search(r"^  server address: (.*)$", result.stdout, re.MULTILINE)
    assert server is not None, result.stdout
    assert lan_address() in re.findall(r"[0-9]+(?:\.[0-9]+){3}", server.group(1))
    assert "127.0.0.1" not in server.group(1)
    assert "\n  port: 11883\n" in result.stdout
    assert f"\n  MQTT account: {USER_A}\n" in result.stdout

    # The port is the broker's listener, or the one published for its container.
    (accounts.parent / "internal.conf").write_text("per_listener_settings false\nlistener 12345\n")
    assert "\n  port: 12345\n" in meter_account(accounts, "add", METER_A, "pw1").stdout
    published = meter_account(accounts, "add", METER_A, "pw1", env={"KPM33B_METER_PORT": "1884"})
    assert "\n  port: 1884\n" in published.stdout
