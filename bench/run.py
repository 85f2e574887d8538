"""``make bench``: the proxy's performance, measured beside its references, in one table.

    .venv/bin/python bench/run.py [--backlog-runs 3] [--stream] [--skip-memory] [--skip-sender]
                                  [--only-backlog] [--quick] [--keep] [--meters 1000] [--rounds 25] [--connections 1]

Everything runs on this machine in one go, against its own Mosquitto
processes on free ports (never 1883/11883/11884):

- backlog drain: 12,000 real RT_DATA readings of 1,000 meters queued on the
  internal broker while the forwarder is stopped (SIGSTOP), timed from SIGCONT
  to the last clean message on the central broker, at QoS 1 and QoS 0 loads,
  for the proxy and the bare paho forwarder (``bare_forwarder.py``, the
  simplest paho forwarder: the ceiling) alternately, with proxy ÷ bare;
- added latency at a steady 1,000 msg/s (``paced_publisher.py``), for the
  proxy, the bare forwarder and Mosquitto's own bridge;
- the proxy's resident memory with 1, 1,000 and 100,000 distinct meters, then
  with each of the 100,000 heard again;
- config_sender: 1,000 meters answering, 1,000 never answering, and the time
  from saving ``config.yaml`` to the first command;
- with ``--stream``: the steady-stream throughput (a pre-generated load
  published with ``mosquitto_pub -l`` while the forwarder runs) of the proxy,
  the bare forwarder and Mosquitto's bridge at QoS 0 and QoS 1.

Every message must arrive: a loss makes the exit code 1. It prints one table
(metric | value | target | met?) with the machine, the software versions and
the broker settings; exit code 1 when a run lost messages, a daemon crashed or
a measurement could not be made, 2 when Mosquitto's programs are missing. A
target not met is a "**NO**" in the table, not an exit code. See
bench/README.md for what limits each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.append(str(ROOT / "tests"))  # after bench/: its payloads.py, not the tests'
sys.path.append(str(ROOT))  # the project's modules, for the names of what the proxy publishes

from broker import Mosquitto, free_port  # noqa: E402
from payloads import ENY_NOW, RT_DATA, LoadBuilder, Reading, bench_meter_ids, write_publisher_files  # noqa: E402

from ha_discovery import CLOCK_OFFSET_OBJECT  # noqa: E402

PYTHON = sys.executable
PROXY_SCRIPT = ROOT / "kpm33b_proxy.py"
MAIN_TOPIC = "kpm33b"
BRIDGED_PREFIX = f"{MAIN_TOPIC}/bridged/"
BRIDGE_PROBE = "bench/probe"
# The last Home Assistant config of each meter's diagnostics (the proxy's defaults: discovery on, prefix
# homeassistant): they follow a meter's first reading over the next ticks, 50 meters a tick.
DIAGNOSTICS_DONE = f"homeassistant/sensor/+/{CLOCK_OFFSET_OBJECT}/config"
COUNTER_PROBE = "bench/counter-probe"
STALL_SECONDS = 15.0  # no new message for this long: the rest is lost
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The broker settings of every benchmark broker (printed with the table).
BROKER_SETTINGS = (
    "persistence false",
    "max_queued_messages 1000000",
    "max_inflight_messages 1000",
)

LATENCY_RATE = 1000.0  # msg/s
LATENCY_SECONDS = 5.0
LATENCY_METERS = 500
MEMORY_CHUNK = 10_000  # new meters fed at once in the memory run
MEMORY_TARGET_MB = 50  # VmRSS with 100,000 meters

PROXY = "proxy"
BARE = "bare paho"
BRIDGE = "mosquitto bridge"


class BenchError(Exception):
    """A benchmark step that could not run (not a measurement)."""


# --- processes and brokers -------------------------------------------------------------


def broker_config(broker: Mosquitto, extra: str = "") -> None:
    """Overwrite the broker's generated configuration with the benchmark's."""
    run_as = "user root\n" if os.geteuid() == 0 else ""
    broker.config_file.write_text(
        run_as
        + f"listener {broker.port} 127.0.0.1\nallow_anonymous true\n"
        + "".join(f"{line}\n" for line in BROKER_SETTINGS)
        + f"log_dest file {broker.log_path}\nlog_type error\nlog_type warning\nlog_type notice\n"
        + extra
    )


def bridge_config(central_port: int) -> str:
    """The internal broker's bridge to the central one: both data topics, QoS 1, under ``kpm33b/bridged/``."""
    return (
        "connection bench-bridge\n"
        f"address 127.0.0.1:{central_port}\n"
        "cleansession true\nnotifications false\nrestart_timeout 1\n"
        f'topic MQTT_RT_DATA out 1 "" {BRIDGED_PREFIX}\n'
        f'topic MQTT_ENY_NOW out 1 "" {BRIDGED_PREFIX}\n'
        f'topic {BRIDGE_PROBE} out 1 "" {BRIDGED_PREFIX}\n'
    )


def start_broker(extra: str = "") -> Mosquitto:
    """A benchmark broker on a free port."""
    broker = Mosquitto(port=free_port())
    broker_config(broker, extra)
    return broker.start()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """VmRSS of a process, in MB (10^6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    raise BenchError(f"no VmRSS for pid {pid}")


def busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all CPUs, /proc/stat), idle and iowait excluded."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


class ForeignLoad:
    """How busy the machine was with processes that are not this benchmark's, during a measurement.

    The machine's busy time minus the CPU time of the benchmark (this process,
    its waited-for children, and the long-running processes it names), as a
    share of all CPUs: another job on the machine makes the figures worse, and
    this says whether that happened.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        own = os.times()
        mine = own.user + own.system + own.children_user + own.children_system
        for pid in self._pids():
            with contextlib.suppress(OSError):  # it just ended: its time is in children_* once waited for
                mine += cpu_seconds(pid)
        return time.monotonic(), busy_seconds(), mine

    def percent(self) -> float:
        """Other processes' CPU use since construction, in percent of the machine."""
        wall, busy, mine = self._sample()
        elapsed = wall - self._start[0]
        if elapsed <= 0:
            return 0.0
        other = (busy - self._start[1]) - (mine - self._start[2])
        return max(0.0, 100 * other / (elapsed * (os.cpu_count() or 1)))


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate``; BenchError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Monitor:
    """A paho client on the central broker: bridge state, stats, probes, and (for latency) readings."""

    def __init__(self, port: int) -> None:
        self.state: bytes | None = None
        self.stats: dict[str, Any] = {}
        self.probes = 0
        self.diagnostics: set[str] = set()  # topics of DIAGNOSTICS_DONE seen (latency warm-up)
        self.received: list[tuple[float, str, bytes]] = []
        self._recording = False
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-monitor",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "the monitor's connection")
        # Not <main>/bridge/devices: the device list (about 200 bytes per meter, 100 KB in the latency run,
        # with every stats message) would delay the readings behind it on this connection.
        self.subscribe([f"{MAIN_TOPIC}/bridge/state", f"{MAIN_TOPIC}/bridge/stats", BRIDGED_PREFIX + BRIDGE_PROBE])

    def subscribe(self, topics: Iterable[str]) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK."""
        done = threading.Event()
        self.client.on_subscribe = lambda *_: done.set()
        self.client.subscribe([(topic, 1) for topic in topics])
        if not done.wait(10):
            raise BenchError("the monitor could not subscribe")

    def record(self, on: bool) -> None:
        """Start or stop recording live readings (latency)."""
        self._recording = on

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        received = time.monotonic()
        topic = message.topic
        if topic.endswith(DIAGNOSTICS_DONE.rsplit("+", 1)[1]):
            self.diagnostics.add(topic)
        elif self._recording and not message.retain and not topic.startswith((f"{MAIN_TOPIC}/bridge/", "bench/")):
            self.received.append((received, topic, message.payload))
        elif topic == f"{MAIN_TOPIC}/bridge/state":
            self.state = message.payload
        elif topic == f"{MAIN_TOPIC}/bridge/stats":
            self.stats = json.loads(message.payload)
        elif topic.endswith(BRIDGE_PROBE):
            self.probes += 1

    def close(self) -> None:
        """Disconnect."""
        self.client.disconnect()
        self.client.loop_stop()


class Counter:
    """``mosquitto_sub`` on the central broker writing one ``<unix time> <topic>`` line per message."""

    def __init__(self, port: int, topics: Iterable[str], path: Path) -> None:
        self.path = path
        self._out = open(path, "wb")  # noqa: SIM115 (closed in close())
        command = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-R", "-F", "%U %t",
                   "-i", f"bench-counter-{os.getpid()}-{time.monotonic_ns()}"]
        for topic in (*topics, COUNTER_PROBE):
            command += ["-t", topic]
        self.process = subprocess.Popen(command, stdout=self._out, stderr=subprocess.DEVNULL)
        self._reader = open(path, "rb")  # noqa: SIM115
        self._partial = b""
        self.times: list[float] = []
        self.probes = 0

    def poll(self) -> int:
        """Read what arrived since the last call; the number of readings counted."""
        data = self._partial + self._reader.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            stamp, _, topic = line.partition(b" ")
            if topic == COUNTER_PROBE.encode():
                self.probes += 1
            else:
                self.times.append(float(stamp))
        return len(self.times)

    def wait_subscribed(self, publish: Callable[[str, bytes], object]) -> None:
        """Publish probes on the central broker until the subscriber shows one."""
        deadline = time.monotonic() + 10
        while self.poll() is not None and not self.probes:
            if time.monotonic() > deadline:
                raise BenchError("the counting subscriber did not subscribe")
            publish(COUNTER_PROBE, b"probe")
            time.sleep(0.05)

    def wait_count(self, target: int) -> bool:
        """Wait until ``target`` readings were counted; False when arrivals stop short of it."""
        last_count, last_change = self.poll(), time.monotonic()
        while last_count < target:
            time.sleep(0.02)
            count = self.poll()
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > STALL_SECONDS:
                return False
        time.sleep(0.3)  # anything beyond the target would be a duplicate
        return self.poll() == target

    def close(self) -> None:
        """Stop the subscriber."""
        self.process.terminate()
        self.process.wait(5)
        self._out.close()
        self._reader.close()


class Forwarder:
    """What moves the messages: the proxy, the bare paho forwarder, or the internal broker's bridge."""

    def __init__(self, kind: str, workdir: Path, internal: Mosquitto, central: Mosquitto, monitor: Monitor,
                 state_dir: Path | None = None) -> None:
        self.kind = kind
        self.monitor = monitor
        self.internal = internal
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{kind.replace(' ', '_')}.log"
        if kind == BRIDGE:
            self._wait_bridge()
            return
        if kind == PROXY:
            config = {
                "internal_broker": {"host": "127.0.0.1", "port": internal.port},
                "central_broker": {"host": "127.0.0.1", "port": central.port},
                "logging": {"level": "WARNING"},
                "health": {"stats_interval_seconds": 1},
            }
            # In a directory of its own: the proxy watches the configuration's directory, and the
            # counting subscriber's file in the work directory would wake its watcher at every line.
            config_path = workdir / "config" / "config.yaml"
            config_path.parent.mkdir(parents=True, exist_ok=True)
            config_path.write_text(yaml.safe_dump(config))
            command = [PYTHON, str(PROXY_SCRIPT), "--config", str(config_path)]
        else:
            command = [PYTHON, str(BENCH / "bare_forwarder.py"), "--internal-port", str(internal.port),
                       "--central-port", str(central.port)]
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        environment["STATE_DIRECTORY"] = str(state_dir or workdir / "state")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                            env=environment)
        wait_until(lambda: monitor.state == b"online" or self.process.poll() is not None, 20,
                   f"the {kind} to be online")
        if self.process.poll() is not None:
            raise BenchError(f"the {kind} exited with {self.process.returncode}: {self.log_path.read_text()[-2000:]}")

    def _wait_bridge(self) -> None:
        publisher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-bridge-probe")
        publisher.connect("127.0.0.1", self.internal.port)
        publisher.loop_start()
        try:
            deadline = time.monotonic() + 20
            while not self.monitor.probes:
                if time.monotonic() > deadline:
                    raise BenchError("the mosquitto bridge did not forward a probe within 20 s")
                publisher.publish(BRIDGE_PROBE, b"probe", qos=1)
                time.sleep(0.1)
        finally:
            publisher.disconnect()
            publisher.loop_stop()

    @property
    def pid(self) -> int | None:
        """The forwarding process (the internal broker for the bridge)."""
        if self.process is not None:
            return self.process.pid
        return self.internal.process.pid if self.internal.process is not None else None

    def output_topics(self) -> list[str]:
        """Where the forwarded readings appear on the central broker."""
        if self.kind == BRIDGE:
            return [BRIDGED_PREFIX + RT_DATA, BRIDGED_PREFIX + ENY_NOW]
        return [f"{MAIN_TOPIC}/+/seconds", f"{MAIN_TOPIC}/+/minutes"]

    def stop(self) -> None:
        """SIGTERM and wait (the bridge stops with its broker)."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Setup:
    """Two brokers, a monitor and a forwarder; cleaned up as one."""

    workdir: Path
    internal: Mosquitto
    central: Mosquitto
    monitor: Monitor
    forwarder: Forwarder
    extra: list[Any] = field(default_factory=list)

    def close(self) -> None:
        """Stop everything started for this setup."""
        self.forwarder.stop()
        self.monitor.close()
        for broker in (self.internal, self.central):
            broker.cleanup()

    def pids(self) -> list[int]:
        """The long-running processes of this setup: brokers and forwarder."""
        processes = [self.internal.process, self.central.process, self.forwarder.process]
        return [process.pid for process in processes if process is not None and process.poll() is None]

    def forwarder_died(self) -> str | None:
        """The end of the forwarder's log when its process has exited, else None."""
        process = self.forwarder.process
        if process is None or process.poll() is None:
            return None
        lines = [line for line in self.forwarder.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return f"the {self.forwarder.kind} exited with {process.returncode}: " + " / ".join(
            line.strip() for line in lines[-3:])

    def broker_drops(self) -> list[str]:
        """Lines in the brokers' logs about dropped messages."""
        return [line for broker in (self.internal, self.central) for line in broker.log().splitlines()
                if "dropped" in line.lower()]


def setup(kind: str, workdir: Path) -> Setup:
    """Fresh brokers (central first, so a bridge connects at once) and the forwarder."""
    workdir.mkdir(parents=True, exist_ok=True)
    central = start_broker()
    internal = start_broker(bridge_config(central.port) if kind == BRIDGE else "")
    monitor = Monitor(central.port)
    try:
        forwarder = Forwarder(kind, workdir, internal, central, monitor)
    except BaseException:
        monitor.close()
        internal.cleanup()
        central.cleanup()
        raise
    return Setup(workdir, internal, central, monitor, forwarder)


def publish_files(port: int, files: list[tuple[str, Path]], qos: int) -> float:
    """Run one ``mosquitto_pub -l`` per file in parallel; their wall time."""
    started = time.monotonic()
    processes = []
    for index, (topic, path) in enumerate(files):
        with open(path, "rb") as lines:
            processes.append(subprocess.Popen(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-l", "-q", str(qos),
                 "-M", "1000", "-i", f"bench-load-{os.getpid()}-{index}"],
                stdin=lines, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for process in processes:
        _, error = process.communicate(timeout=300)
        if process.returncode:
            raise BenchError(f"mosquitto_pub failed ({process.returncode}): {error.decode()[-500:]}")
    return time.monotonic() - started


# --- measurements -------------------------------------------------------------------------


@dataclass
class Throughput:
    """One throughput run."""

    kind: str
    qos: int
    messages: int
    counted: int
    in_rate: float  # msg/s accepted by the internal broker (load generator's wall time)
    out_rate: float  # msg/s arriving at the central subscriber, first to last
    cpu_per_1000: float | None  # ms of CPU of the forwarding process per 1,000 messages
    drops: list[str]
    foreign: float  # % of the machine used by other processes meanwhile

    @property
    def lost(self) -> bool:
        """Whether the count is not exact, or something was dropped on the way."""
        return self.counted != self.messages or bool(self.drops)


def run_throughput(kind: str, qos: int, warm_readings: list[Reading], readings: list[Reading], connections: int,
                   workdir: Path) -> Throughput:
    """Warm up with one round (every meter known: availability and discovery done), then time the readings."""
    warm_files = write_publisher_files(warm_readings, workdir / "load", connections, "warm")
    files = write_publisher_files(readings, workdir / "load", connections, "run")
    run = setup(kind, workdir)
    counter = Counter(run.central.port, run.forwarder.output_topics(), workdir / "counted.txt")
    try:
        counter.wait_subscribed(lambda topic, payload: run.monitor.client.publish(topic, payload, qos=1))
        publish_files(run.internal.port, warm_files, qos)
        if not counter.wait_count(len(warm_readings)):
            raise BenchError(f"{kind}: the warm-up round did not arrive ({counter.poll()} of {len(warm_readings)})")
        time.sleep(0.5)  # availability and discovery of the warm-up round flushed
        pid = run.forwarder.pid
        cpu_before = cpu_seconds(pid) if pid else None
        first_index = len(counter.times)
        foreign = ForeignLoad(lambda: [*run.pids(), counter.process.pid])
        in_seconds = publish_files(run.internal.port, files, qos)
        complete = counter.wait_count(len(warm_readings) + len(readings))
        cpu_after = cpu_seconds(pid) if pid else None
        other = foreign.percent()
        times = counter.times[first_index:]
        counted = len(times)
        out_rate = (counted - 1) / (times[-1] - times[0]) if counted > 1 and times[-1] > times[0] else 0.0
        drops = losses(run, kind, len(warm_readings) + counted, complete, len(readings) - counted)
        cpu = (cpu_after - cpu_before) * 1000 / counted * 1000 if cpu_before is not None and counted else None
        return Throughput(kind, qos, len(readings), counted, len(readings) / in_seconds, out_rate, cpu, drops, other)
    finally:
        counter.close()
        run.close()


BACKLOG_READINGS = 12  # RT_DATA readings per meter queued while the forwarder is paused (12,000 of 1,000 meters)


@dataclass
class Backlog:
    """One backlog drain: readings queued on the internal broker while the forwarder was stopped, then drained."""

    kind: str
    qos: int
    messages: int
    counted: int
    seconds: float  # from SIGCONT to the last clean message counted on the central broker
    cpu_per_1000: float | None  # ms of CPU of the forwarder per 1,000 messages drained
    drops: list[str]
    foreign: float

    @property
    def rate(self) -> float:
        """Messages drained per second."""
        return self.counted / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> bool:
        """Whether the count is not exact, or something was dropped on the way."""
        return self.counted != self.messages or bool(self.drops)


def _settled_on_broker(port: int) -> None:
    """A QoS 1 round trip on a new connection: the broker has read what the publishers sent before."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"bench-settle-{os.getpid()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(BRIDGE_PROBE, b"settled", qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def run_backlog(kind: str, qos: int, warm_readings: list[Reading], readings: list[Reading],
                workdir: Path) -> Backlog:
    """Warm up (every meter known), SIGSTOP the forwarder, queue ``readings``, SIGCONT: time the drain.

    The forwarder's internal session is persistent and stays connected while
    it is stopped, so the internal broker queues the readings for it (up to
    ``max_queued_messages``) and sends them as fast as it takes them once it
    runs again; the clock stops at the last clean message on the central broker.
    """
    warm_files = write_publisher_files(warm_readings, workdir / "load", 1, "warm")
    files = write_publisher_files(readings, workdir / "load", 1, "backlog")
    run = setup(kind, workdir)
    counter = Counter(run.central.port, run.forwarder.output_topics(), workdir / "counted.txt")
    pid = run.forwarder.pid
    assert pid is not None
    stopped = False
    try:
        counter.wait_subscribed(lambda topic, payload: run.monitor.client.publish(topic, payload, qos=1))
        publish_files(run.internal.port, warm_files, qos)
        if not counter.wait_count(len(warm_readings)):
            raise BenchError(f"{kind}: the warm-up round did not arrive ({counter.poll()} of {len(warm_readings)})")
        time.sleep(0.5)  # availability and discovery of the warm-up round flushed
        first_index = len(counter.times)
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        publish_files(run.internal.port, files, qos)
        _settled_on_broker(run.internal.port)
        foreign = ForeignLoad(lambda: [*run.pids(), counter.process.pid])
        cpu_before = cpu_seconds(pid)
        released = time.time()  # mosquitto_sub's %U is Unix time
        os.kill(pid, signal.SIGCONT)
        stopped = False
        complete = counter.wait_count(len(warm_readings) + len(readings))
        cpu_after = cpu_seconds(pid)
        other = foreign.percent()
        times = counter.times[first_index:]
        counted = len(times)
        seconds = times[-1] - released if times else 0.0
        drops = losses(run, kind, len(warm_readings) + counted, complete, len(readings) - counted)
        cpu = (cpu_after - cpu_before) * 1e6 / counted if counted else None
        return Backlog(kind, qos, len(readings), counted, seconds, cpu, drops, other)
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        counter.close()
        run.close()


@dataclass
class Latency:
    """One latency run: added latency internal publish → central delivery, in ms."""

    kind: str
    messages: int
    received: int
    p50: float
    p99: float
    max: float
    foreign: float


def _reading_key(topic: str, payload: bytes) -> tuple[str, str, str]:
    """(kind, meter id, meter time digits) of a forwarded reading, clean or raw."""
    document = json.loads(payload)
    kind = "seconds" if topic.endswith(("seconds", RT_DATA)) else "minutes"
    return kind, document["id"], re.sub(r"\D", "", document["time"])


def run_latency(kind: str, builder: LoadBuilder, rate: float, seconds: float, workdir: Path) -> Latency:
    """A warm-up round, then ``rate`` msg/s for ``seconds`` from a paced publisher process."""
    meters = len(builder.meters)
    rounds = max(1, round(rate * seconds / (2 * meters)))
    warm = builder.rounds(0, 1)
    readings = builder.rounds(1, rounds)
    run = setup(kind, workdir)
    try:
        run.monitor.subscribe(run.forwarder.output_topics())
        run.monitor.record(True)
        if kind == PROXY:
            run.monitor.subscribe([DIAGNOSTICS_DONE])
        _paced(run.internal.port, warm, rate * 2, workdir / "warm")
        wait_until(lambda: len(run.monitor.received) >= len(warm), 30, f"{kind}: the latency warm-up")
        if kind == PROXY:  # the warm-up's new meters announced in full (spread over 5 s): a steady state
            wait_until(lambda: len(run.monitor.diagnostics) >= meters, 30, f"{kind}: the warm-up's diagnostics")
        time.sleep(0.5)
        run.monitor.received.clear()
        foreign = ForeignLoad(run.pids)
        # The monitor timestamps arrivals in this process: a full collection here (17 ms seen,
        # with the received messages to walk) would count as the forwarder's latency.
        gc.collect()
        gc.disable()
        try:
            sent = _paced(run.internal.port, readings, rate, workdir / "paced")
            deadline = time.monotonic() + 10
            while len(run.monitor.received) < len(readings) and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            gc.enable()
        run.monitor.record(False)
        other = foreign.percent()
        received = {_reading_key(topic, payload): at for at, topic, payload in run.monitor.received}
        delays = []
        for reading, at in zip(readings, sent, strict=True):
            key = ("seconds" if reading.topic == RT_DATA else "minutes", reading.meter_id, reading.meter_time)
            if key in received:
                delays.append((received[key] - at) * 1000)
        delays.sort()
        if not delays:
            raise BenchError(f"{kind}: no message arrived in the latency run")
        return Latency(kind, len(readings), len(delays), statistics.median(delays),
                       delays[min(len(delays) - 1, int(len(delays) * 0.99))], delays[-1], other)
    finally:
        run.close()


def _paced(port: int, readings: list[Reading], rate: float, base: Path) -> list[float]:
    lines = base.with_suffix(".lines")
    times = base.with_suffix(".times")
    lines.write_bytes(b"".join(r.topic.encode() + b" " + r.payload + b"\n" for r in readings))
    subprocess.run([PYTHON, str(BENCH / "paced_publisher.py"), "--port", str(port), "--rate", str(rate),
                    "--input", str(lines), "--output", str(times)], check=True, timeout=600)
    return [float(line) for line in times.read_text().split()]


@dataclass
class Memory:
    """The proxy's VmRSS after the given numbers of distinct meters."""

    rss_by_meters: dict[int, float]
    heard_again_rss: float | None  # after a second reading from every meter of the last step
    idle_rss: float
    peak_rss: float
    seconds_by_meters: dict[int, float]  # how long each step took to be forwarded
    drops: list[str]
    foreign: float


def losses(run: Setup, kind: str, forwarded: int, complete: bool, missing: int) -> list[str]:
    """What went wrong in a run: the brokers' drops, the proxy's own (its stats must count ``forwarded``), a death."""
    drops = run.broker_drops()
    if kind == PROXY:
        try:
            wait_until(lambda: run.monitor.stats.get("forwarded", 0) >= forwarded, 10, "the proxy's stats")
        except BenchError:
            drops.append(f"the proxy's stats do not add up: {run.monitor.stats}")
        drops += [f"proxy dropped {reason}: {n}" for reason, n in run.monitor.stats.get("dropped", {}).items()]
    died = run.forwarder_died()
    if died:
        drops.append(died)
    if not complete and not drops:
        drops.append(f"{missing} messages never arrived")
    return drops


def run_memory(steps: list[int], chunk: int, workdir: Path) -> Memory:
    """One ENY_NOW reading from each new meter until ``steps[i]`` meters are known; the settled RSS after each.

    New meters arrive in chunks of ``chunk``, each forwarded completely before
    the next (a fleet coming online, not one burst that would overflow the
    proxy's outgoing queue: see the README). Then every meter sends a second
    reading, as a fleet does each minute: the RSS of a fleet in service, which
    the first readings alone do not show (the proxy's per-meter tables, kept
    in the order the meters were last heard, grow as they are reordered).
    """
    run = setup(PROXY, workdir)
    rss: dict[int, float] = {}
    heard_again: float | None = None
    seconds: dict[int, float] = {}
    drops: list[str] = []
    try:
        pid = run.forwarder.pid
        assert pid is not None
        time.sleep(1.0)
        idle = peak = rss_mb(pid)
        foreign = ForeignLoad(run.pids)
        known = 0
        try:
            for total in steps:
                started = time.monotonic()
                peak = max(peak, _feed_meters(run, workdir, known, total, chunk, reading=0, forwarded=known))
                known = total
                seconds[total] = time.monotonic() - started
                time.sleep(1.5)  # settle: last acknowledgements, a tick, a stats message
                rss[total] = rss_mb(pid)
            peak = max(peak, _feed_meters(run, workdir, 0, known, chunk, reading=1, forwarded=known))
            time.sleep(1.5)
            heard_again = rss_mb(pid)
        except BenchError as error:  # what was measured before still counts
            drops.append(f"{error} (after the readings of the first {known:,} meters were forwarded)")
        drops += [f"proxy dropped {reason}: {n}" for reason, n in run.monitor.stats.get("dropped", {}).items()]
        return Memory(rss, heard_again, idle, max(peak, *rss.values(), heard_again or 0.0, idle), seconds,
                      drops + run.broker_drops(), foreign.percent())
    finally:
        run.close()


def _feed_meters(run: Setup, workdir: Path, first: int, end: int, chunk: int, *, reading: int,
                 forwarded: int) -> float:
    """The ``reading``-th ENY_NOW reading of meters ``first`` … ``end - 1``, in chunks each forwarded before
    the next (the proxy had ``forwarded`` readings before); the peak RSS meanwhile."""
    peak = 0.0
    for start in range(first, end, chunk):
        size = min(chunk, end - start)
        readings = LoadBuilder(bench_meter_ids(size, first=start)).rounds(reading, 1, (ENY_NOW,))
        files = write_publisher_files(readings, workdir / "load", 1, f"memory-{reading}-{start}")
        publish_files(run.internal.port, files, 1)
        forwarded += size
        peak = max(peak, _wait_forwarded(run, forwarded))
    return peak


def _wait_forwarded(run: Setup, total: int, stall: float = 30.0) -> float:
    """Wait until the proxy's stats show ``total`` forwarded and an empty queue; the peak RSS meanwhile."""
    pid = run.forwarder.pid
    assert pid is not None
    peak = 0.0
    progress, last_change = -1, time.monotonic()
    while True:
        stats = run.monitor.stats
        if stats.get("forwarded", 0) >= total and stats.get("queue_depth", 1) == 0:
            return peak
        died = run.forwarder_died()
        if died:
            raise BenchError(died)
        peak = max(peak, rss_mb(pid))
        if stats.get("received", 0) != progress:
            progress, last_change = stats.get("received", 0), time.monotonic()
        elif time.monotonic() - last_change > stall:
            raise BenchError(f"the proxy made no progress for {stall:.0f} s towards {total} meters: {stats}")
        time.sleep(0.2)


# --- output -----------------------------------------------------------------------------


def machine() -> list[str]:
    """Lines describing where the benchmark ran."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = "?"
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.0f} GB"
    mosquitto_version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    from importlib.metadata import version
    return [
        f"machine: {os.cpu_count()} CPUs ({model}), {memory} RAM, {platform.system()} {platform.release()}",
        f"software: Python {platform.python_version()}, paho-mqtt {version('paho-mqtt')}, {mosquitto_version}",
    ]


def table(rows: list[tuple[str, str, str, str]]) -> str:
    """A Markdown table: metric | value | target | met?"""
    header = ("metric", "value", "target", "met?")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


BUSY_PERCENT = 10.0  # other processes above this share of the CPUs: the figure is marked


def busy(foreign: float) -> str:
    """A mark for a figure measured while other processes used the machine."""
    return f" (other load {foreign:.0f} %)" if foreign > BUSY_PERCENT else ""


def verdict(ok: bool | None) -> str:
    """The met? column."""
    return "" if ok is None else ("yes" if ok else "**NO**")


def result_rows(results: list[Throughput], latencies: list[Latency], memory: Memory | None,
                failures: list[str]) -> list[tuple[str, str, str, str]]:
    """The table's rows for the proxy measurements."""
    rows: list[tuple[str, str, str, str]] = []
    by = {(r.kind, r.qos): r for r in results}
    for qos in (0, 1):
        proxy, bare, bridge = (by.get((kind, qos)) for kind in (PROXY, BARE, BRIDGE))
        for result in (proxy, bare, bridge):
            if result is None:
                continue
            lost = "" if not result.lost else f", LOST {result.messages - result.counted}"
            is_proxy = result.kind == PROXY
            rows.append((f"throughput QoS {qos}, {result.kind} (msg/s out; in)",
                         f"{result.out_rate:,.0f}; {result.in_rate:,.0f}{lost}{busy(result.foreign)}",
                         "none lost" if is_proxy else "", verdict(not result.lost) if is_proxy else ""))
        if proxy and bare and bare.out_rate:
            ratio = proxy.out_rate / bare.out_rate
            rows.append((f"QoS {qos}: proxy / bare paho forwarder", f"{ratio:.2f}", "≥ 0.8", verdict(ratio >= 0.8)))
        if proxy and bridge and bridge.out_rate:
            rows.append((f"QoS {qos}: proxy / mosquitto bridge", f"{proxy.out_rate / bridge.out_rate:.2f}", "", ""))
    for result in results:
        if result.cpu_per_1000 is not None and result.kind != BRIDGE:
            rows.append((f"CPU per 1,000 messages, {result.kind}, QoS {result.qos}",
                         f"{result.cpu_per_1000:.0f} ms", "", ""))
    for latency in latencies:
        target = latency.kind == PROXY
        rows.append((f"added latency at 1,000 msg/s, {latency.kind} (p50 / p99)",
                     f"{latency.p50:.2f} / {latency.p99:.2f} ms{busy(latency.foreign)}", "p99 ≤ 5 ms" if target else "",
                     verdict(latency.p99 <= 5.0) if target else ""))
    if memory is None:
        rows.append(("proxy RSS, 100,000 distinct meters", "not measured", f"≤ {MEMORY_TARGET_MB} MB", ""))
    else:
        rows.append(("proxy RSS, started, no meter", f"{memory.idle_rss:.1f} MB", "", ""))
        # The target is judged in service (every meter heard again), not on the first readings alone.
        for meters, mb in memory.rss_by_meters.items():
            rows.append((f"proxy RSS, {meters:,} distinct meter{'s' if meters > 1 else ''}", f"{mb:.1f} MB", "", ""))
        if memory.heard_again_rss is not None:
            meters = max(memory.rss_by_meters)
            target = meters == 100_000
            rows.append((f"proxy RSS, {meters:,} meters, each heard again",
                         f"{memory.heard_again_rss:.1f} MB{busy(memory.foreign)}",
                         f"≤ {MEMORY_TARGET_MB} MB" if target else "",
                         verdict(memory.heard_again_rss <= MEMORY_TARGET_MB) if target else ""))
        if memory.drops:
            rows.append(("proxy RSS, the rest of the memory run", "not measured: " + memory.drops[0][:90],
                         f"≤ {MEMORY_TARGET_MB} MB", "**NO**"))
        rows.append(("proxy RSS, peak while meters were arriving", f"{memory.peak_rss:.1f} MB", "", ""))
        if memory.seconds_by_meters:
            last = max(memory.seconds_by_meters)
            rows.append((f"time to forward the first readings of {last:,} new meters (chunks of 10,000)",
                         f"{memory.seconds_by_meters[last]:.1f} s", "", ""))
    return rows


def backlog_rows(backlogs: list[Backlog]) -> list[tuple[str, str, str, str]]:
    """The backlog rows: each forwarder's median drain rate, and proxy ÷ bare for each QoS.

    The runs alternate proxy, bare, proxy, bare…: the ratio of the medians
    compares them under the same (shared, noisy) machine.
    """
    rows: list[tuple[str, str, str, str]] = []
    for qos in (1, 0):
        medians: dict[str, float] = {}
        for kind in (PROXY, BARE):
            runs = [b for b in backlogs if b.kind == kind and b.qos == qos]
            if not runs:
                continue
            rates = sorted(b.rate for b in runs)
            medians[kind] = statistics.median(rates)
            cpu = [b.cpu_per_1000 for b in runs if b.cpu_per_1000 is not None]
            lost = sum(b.messages - b.counted for b in runs if b.lost)
            is_proxy = kind == PROXY
            rows.append((f"backlog drain QoS {qos} load, {kind} (msg/s, median of {len(runs)}; runs)",
                         f"{medians[kind]:,.0f}; " + " ".join(f"{r:,.0f}" for r in rates)
                         + (f"; CPU {statistics.median(cpu):.0f} ms/1000" if cpu else "")
                         + (f", LOST {lost}" if lost else "") + busy(max(b.foreign for b in runs)),
                         "none lost" if is_proxy else "", verdict(not lost) if is_proxy else ""))
        if medians.get(BARE) and PROXY in medians:
            ratio = medians[PROXY] / medians[BARE]
            rows.append((f"backlog drain QoS {qos} load: proxy ÷ bare paho forwarder", f"{ratio:.2f}", "≥ 0.8",
                         verdict(ratio >= 0.8)))
    return rows


SENDER_METERS = 1_000
SENDER_ACK_TIMEOUT = 3.0  # the default meters.ack_timeout_seconds
LOG_TIME = re.compile(rb"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class SenderResult:
    """config_sender's three timings, in seconds (None: did not happen)."""

    configure_all: float | None
    acked: int
    alert_all: float | None
    alerted: int
    save_to_command: float | None
    foreign: float


class SenderLog:
    """The sender's log file, read as it grows; each line with the time the sender logged it."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 (closed in close())
        self._partial = b""
        self.lines: list[tuple[float, bytes]] = []

    def poll(self) -> list[tuple[float, bytes]]:
        """Every line so far."""
        data = self._partial + self._file.read()
        parts = data.split(b"\n")
        self._partial = parts.pop()
        for line in parts:
            match = LOG_TIME.match(line)
            if match:  # the sender's own time stamp: independent of when the benchmark reads the file
                stamp = datetime.strptime(match.group(1).decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                self.lines.append((stamp, line))
        return self.lines

    def matching(self, text: bytes, since: float) -> list[float]:
        """Times of the lines containing ``text`` logged at or after ``since`` (time.time())."""
        return [stamp for stamp, line in self.poll() if text in line and stamp >= since - 0.002]

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def _wait_lines(log: SenderLog, text: bytes, since: float, count: int, timeout: float) -> list[float]:
    deadline = time.monotonic() + timeout
    while True:
        found = log.matching(text, since)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def run_sender(workdir: Path) -> SenderResult:
    """config_sender as a process, 2,000 simulated meters (half answering, half silent), three timings."""
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT))
    from meter_simulator import MeterSimulator

    workdir.mkdir(parents=True, exist_ok=True)
    central = start_broker()
    internal = start_broker()
    answering = bench_meter_ids(SENDER_METERS, first=7_000_000)
    silent = bench_meter_ids(SENDER_METERS, first=8_000_000)
    config: dict[str, Any] = {
        "internal_broker": {"host": "127.0.0.1", "port": internal.port},
        "central_broker": {"host": "127.0.0.1", "port": central.port},
        "meters": {"upload_frequency_seconds": 60, "upload_frequency_minutes": 1,
                   "ack_timeout_seconds": SENDER_ACK_TIMEOUT},
        "logging": {"level": "INFO"},  # the acknowledgements are INFO lines
    }
    config_path = workdir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    simulators = [MeterSimulator("127.0.0.1", internal.port, answering, reply_mode="prompt"),
                  MeterSimulator("127.0.0.1", internal.port, silent, reply_mode="none")]
    publisher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="bench-discovery",
                            protocol=MQTTProtocolVersion.MQTTv5)
    log_path = workdir / "config_sender.log"
    process: subprocess.Popen[bytes] | None = None
    log: SenderLog | None = None
    try:
        for simulator in simulators:
            simulator.start(cadence=False)
        for simulator in simulators:
            if not simulator.wait_connected(30):
                raise BenchError("the meter simulator did not connect")
        publisher.connect("127.0.0.1", central.port)
        publisher.loop_start()
        environment = {key: value for key, value in os.environ.items()
                       if key not in ("JOURNAL_STREAM", "NOTIFY_SOCKET", "WATCHDOG_USEC")}
        with open(log_path, "wb") as output:
            process = subprocess.Popen([PYTHON, str(ROOT / "config_sender.py"), "--config", str(config_path)],
                                       stdout=output, stderr=subprocess.STDOUT, cwd=workdir, env=environment)
        log = SenderLog(log_path)
        if not _wait_lines(log, b"ready: subscribed on both brokers", 0, 1, 20):
            raise BenchError("config_sender did not become ready: " + log_path.read_text()[-1500:])
        foreign = ForeignLoad(lambda: [p.pid for p in (central.process, internal.process, process) if p])

        def discover(meters: list[str]) -> float:
            started = time.time()
            infos = [publisher.publish(f"{MAIN_TOPIC}/{meter_id}/availability", "online", qos=1, retain=True)
                     for meter_id in meters]
            for info in infos:
                info.wait_for_publish(10)
            return started

        commands = 2 * SENDER_METERS  # both upload intervals per meter
        started = discover(answering)
        acks = _wait_lines(log, b" acknowledged ", started, commands, 60)
        configure_all = max(acks) - started if len(acks) >= commands else None

        started = discover(silent)
        alerts = _wait_lines(log, b" did not reply to ", started, commands, SENDER_ACK_TIMEOUT + 30)
        alert_all = sorted(alerts)[commands - 1] - started if len(alerts) >= commands else None

        config["meters"]["upload_frequency_seconds"] = 300
        text = yaml.safe_dump(config)
        saved = time.monotonic()
        config_path.write_text(text)
        deadline = time.monotonic() + 10
        first: float | None = None
        while first is None and time.monotonic() < deadline:
            times = [command.received_at for simulator in simulators for command in simulator.received_commands
                     if command.received_at >= saved and command.payload.get("value") == "300"]
            first = min(times) if times else None
            time.sleep(0.02)
        return SenderResult(configure_all, len(acks), alert_all, min(len(alerts), commands),
                            None if first is None else first - saved, foreign.percent())
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if log is not None:
            log.close()
        publisher.disconnect()
        publisher.loop_stop()
        for simulator in simulators:
            simulator.stop()
        internal.cleanup()
        central.cleanup()


def sender_rows(result: SenderResult) -> list[tuple[str, str, str, str]]:
    """The table's rows for config_sender."""
    commands = 2 * SENDER_METERS

    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.2f} s{busy(result.foreign)}"

    return [
        (f"config_sender: {SENDER_METERS:,} answering meters all acked ({result.acked}/{commands} commands)",
         seconds(result.configure_all), "≤ 2 s",
         verdict(result.configure_all is not None and result.configure_all <= 2.0)),
        (f"config_sender: {SENDER_METERS:,} silent meters all alerted ({result.alerted}/{commands} commands)",
         seconds(result.alert_all), f"≤ {SENDER_ACK_TIMEOUT + 0.5:g} s (ack timeout {SENDER_ACK_TIMEOUT:g} s + 0.5)",
         verdict(result.alert_all is not None and result.alert_all <= SENDER_ACK_TIMEOUT + 0.5)),
        ("config_sender: config.yaml saved → first command at a meter", seconds(result.save_to_command),
         "≤ 0.5 s", verdict(result.save_to_command is not None and result.save_to_command <= 0.5)),
    ]


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and print the table; exit 1 if any run lost messages or could not run."""
    parser = argparse.ArgumentParser(description="kpm33b-proxy benchmark")
    parser.add_argument("--meters", type=int, default=1000, help="distinct meters in the throughput load")
    parser.add_argument("--rounds", type=int, default=25,
                        help="readings per meter and kind in a throughput run (2 x meters x rounds messages)")
    parser.add_argument("--connections", type=int, default=1, help="mosquitto_pub connections per topic")
    parser.add_argument("--backlog-runs", type=int, default=3,
                        help="backlog drains per forwarder and QoS (alternating proxy and bare; the median counts)")
    parser.add_argument("--stream", action="store_true",
                        help="also the steady-stream throughput runs (proxy, bare, bridge at QoS 0 and 1; +2 min)")
    parser.add_argument("--skip-backlog", action="store_true", help="leave out the backlog drains")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 100,000-meter memory run")
    parser.add_argument("--only-backlog", action="store_true", help="the backlog drains only (for profiling work)")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not a measurement)")
    parser.add_argument("--skip-sender", action="store_true", help="leave out the config_sender measurements")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, loads)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 5
    for tool in ("mosquitto", "mosquitto_pub", "mosquitto_sub"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (make deps installs Mosquitto)", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="kpm33b-bench-"))
    began = time.monotonic()
    quiet = ForeignLoad(lambda: [])
    time.sleep(1.0)
    before = quiet.percent()
    messages = 2 * args.meters * args.rounds
    stream = f"; {messages:,} readings per steady-stream run" if args.stream else ""
    print(f"kpm33b-proxy benchmark: backlogs of {BACKLOG_READINGS * args.meters:,} readings of {args.meters:,} meters"
          f"{stream}; other load on the machine before starting: {before:.0f} %; work directory {workdir}", flush=True)
    results: list[Throughput] = []
    latencies: list[Latency] = []
    failures: list[str] = []
    memory: Memory | None = None
    sender: SenderResult | None = None

    def step(name: str, measure: Callable[[], Any]) -> Any:
        try:
            return measure()
        except BenchError as error:
            failures.append(f"{name}: {error}")
            print(f"  {name}: FAILED: {error}", flush=True)
            return None

    backlogs: list[Backlog] = []
    try:
        builder = LoadBuilder(bench_meter_ids(args.meters))
        backlog_warm = builder.rounds(0, 1, (RT_DATA,))
        backlog_readings = builder.rounds(1, BACKLOG_READINGS, (RT_DATA,))
        for qos in (1, 0):
            for index in range(0 if args.skip_backlog else 1 if args.quick else args.backlog_runs):
                for kind in (PROXY, BARE) if index % 2 == 0 else (BARE, PROXY):
                    drained = step(f"backlog {kind} QoS {qos}", lambda kind=kind, qos=qos, index=index: run_backlog(
                        kind, qos, backlog_warm, backlog_readings,
                        workdir / f"backlog-{kind.replace(' ', '_')}-qos{qos}-{index}"))
                    if drained is None:
                        continue
                    backlogs.append(drained)
                    print(f"  backlog {kind:9s} QoS {qos}: {drained.rate:8,.0f} msg/s ({drained.seconds:.2f} s), "
                          f"{drained.counted:,}/{drained.messages:,} counted"
                          + (f", CPU {drained.cpu_per_1000:.0f} ms/1000" if drained.cpu_per_1000 else "")
                          + f", other load {drained.foreign:.0f} %"
                          + (f"  LOST: {'; '.join(drained.drops)}" if drained.lost else ""), flush=True)
                    if drained.lost:
                        failures.append(f"backlog {kind} QoS {qos}: {drained.counted:,} of {drained.messages:,} "
                                        "arrived; " + "; ".join(drained.drops))
        warm_readings, readings = builder.rounds(0, 1), builder.rounds(1, args.rounds)
        for qos in (0, 1) if args.stream and not args.only_backlog else ():
            for kind in (PROXY, BARE, BRIDGE):
                result = step(f"throughput {kind} QoS {qos}", lambda kind=kind, qos=qos: run_throughput(
                    kind, qos, warm_readings, readings, args.connections,
                    workdir / f"throughput-{kind.replace(' ', '_')}-qos{qos}"))
                if result is None:
                    continue
                results.append(result)
                print(f"  throughput {kind:16s} QoS {qos}: {result.out_rate:8,.0f} msg/s out, "
                      f"{result.in_rate:8,.0f} msg/s in, {result.counted:,}/{result.messages:,} counted"
                      + (f", CPU {result.cpu_per_1000:.0f} ms/1000" if result.cpu_per_1000 else "")
                      + f", other load {result.foreign:.0f} %"
                      + (f"  LOST: {'; '.join(result.drops)}" if result.lost else ""), flush=True)
                if result.lost:
                    failures.append(f"throughput {kind} QoS {qos}: {result.counted:,} of {result.messages:,} "
                                    "arrived; " + "; ".join(result.drops))
        latency_builder = LoadBuilder(bench_meter_ids(LATENCY_METERS, first=500_000))
        for kind in () if args.only_backlog else (PROXY, BARE, BRIDGE):
            latency = step(f"latency {kind}", lambda kind=kind: run_latency(
                kind, latency_builder, LATENCY_RATE, 2.0 if args.quick else LATENCY_SECONDS,
                workdir / f"latency-{kind.replace(' ', '_')}"))
            if latency is None:
                continue
            latencies.append(latency)
            print(f"  latency {kind:16s}: p50 {latency.p50:.2f} ms, p99 {latency.p99:.2f} ms, "
                  f"max {latency.max:.2f} ms ({latency.received:,}/{latency.messages:,}), "
                  f"other load {latency.foreign:.0f} %", flush=True)
            if latency.received != latency.messages:
                failures.append(f"latency {kind}: {latency.received:,} of {latency.messages:,} arrived")
        steps = [1, 1_000, 10_000] if args.quick else [1, 1_000, 100_000]
        if not (args.skip_memory or args.only_backlog):
            memory = step("memory", lambda: run_memory(steps, MEMORY_CHUNK, workdir / "memory"))
        if memory is not None:
            steps_text = ", ".join(f"{meters:,} meters {mb:.1f} MB" for meters, mb in memory.rss_by_meters.items())
            if memory.heard_again_rss is not None:
                steps_text += f", each heard again {memory.heard_again_rss:.1f} MB"
            print(f"  memory: started {memory.idle_rss:.1f} MB, {steps_text}; peak {memory.peak_rss:.1f} MB; "
                  f"other load {memory.foreign:.0f} %", flush=True)
            if memory.drops:
                failures.append("memory run: " + "; ".join(memory.drops))
        if not (args.skip_sender or args.only_backlog):
            sender = step("config_sender", lambda: run_sender(workdir / "sender"))
            if sender is not None:
                def secs(value: float | None) -> str:
                    return "never" if value is None else f"{value:.2f} s"
                print(f"  config_sender: configure {secs(sender.configure_all)}, alert {secs(sender.alert_all)}, "
                      f"save to first command {secs(sender.save_to_command)}, other load {sender.foreign:.0f} %",
                      flush=True)
                if sender.acked < 2 * SENDER_METERS or sender.alerted < 2 * SENDER_METERS:
                    failures.append(f"config_sender: {sender.acked} acks and {sender.alerted} alerts of "
                                    f"{2 * SENDER_METERS} commands each")
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    rows = backlog_rows(backlogs) + result_rows(results, latencies, memory, failures)
    if sender is not None:
        rows += sender_rows(sender)
    print()
    print(table(rows))
    print()
    for line in machine():
        print(line)
    others = [r.foreign for r in results] + [b.foreign for b in backlogs] + [lat.foreign for lat in latencies] \
        + ([memory.foreign] if memory else []) + ([sender.foreign] if sender else [])
    print(f"other processes on the machine: {before:.0f} % of its CPUs before the run, at most "
          f"{max(others, default=0):.0f} % during a measurement; figures measured with more than "
          f"{BUSY_PERCENT:.0f} % are marked (other load N %): they are worse than the machine can do")
    print("brokers: Mosquitto, one process each for the internal and the central broker, "
          + ", ".join(BROKER_SETTINGS) + "; the bridge: a connection in the internal broker, cleansession, "
          "QoS 1 topics (a QoS 0 message stays QoS 0 over a bridge)")
    print(f"backlog: {BACKLOG_READINGS * args.meters:,} RT_DATA readings (~590 B) of {args.meters:,} meters by "
          "mosquitto_pub -l (one connection, MQTT 3.1.1, -M 1000) while the forwarder is stopped (SIGSTOP), timed "
          "from SIGCONT to the last message counted by mosquitto_sub -q 1 on the central broker; runs alternate "
          "proxy and bare, the median counts")
    if args.stream:
        print(f"stream load: mosquitto_pub -l, {args.connections} connection(s) per topic and data topic, MQTT 3.1.1, "
              f"-M 1000; {args.meters:,} meters, RT_DATA (~590 B) and ENY_NOW (~270 B) alternating, every reading "
              "distinct; counted by mosquitto_sub -q 1 on the central broker")
    print(f"command: make bench (bench/run.py), {time.monotonic() - began:.0f} s")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
