"""Both daemons as real processes under signals and hostile standard output.

- SIGHUP must never kill a daemon (``systemctl reload`` sends it).
- A standard output that nobody reads, or that is closed, must not stop the
  data flow nor print a traceback per log line: log lines are dropped and
  counted instead. In the normal case every line still arrives, in order,
  and the last lines before exit are written.

The config sender is started as a process here (its own tests run it
in-process); the proxy is used as a black box.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import (
    PROXY_SCRIPT,
    ROOT,
    SENDER_SCRIPT,
    Collector,
    DaemonProcess,
    config_dict,
    publish_all,
    publisher,
    simulated_meters,
    start_proxy,
    write_config,
)
from payloads import eny_now, minute

from daemon import NonBlockingStreamHandler, install_signal_handlers

METER = "33B1225950027"


JAN_17 = datetime(2026, 1, 17)  # the readings' meter times count minutes from here


def test_proxy_survives_sighup_and_keeps_forwarding(tmp_path: Path, internal_broker: Mosquitto,
                                                    central_broker: Mosquitto) -> None:
    readings = Collector(central_broker.port, f"kpm33b/{METER}/minutes")
    proxy = start_proxy(write_config(tmp_path, config_dict(internal_broker.port, central_broker.port)))
    proxy.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP received" in proxy.output(), timeout=5)
    client = publisher(internal_broker.port)
    publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(1, JAN_17), 100.0))])
    wait_for(lambda: readings.on(f"kpm33b/{METER}/minutes"), timeout=5)
    assert proxy.alive()
    assert proxy.terminate() == 0
    client.disconnect()
    client.loop_stop()
    readings.close()
    assert "Traceback" not in proxy.output()


def test_sighup_calls_the_reload_callback_and_does_not_stop() -> None:
    stop = threading.Event()
    reloads = threading.Event()
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        install_signal_handlers(stop, reload=reloads.set)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_for(reloads.is_set, timeout=5)
        assert not stop.is_set()
        install_signal_handlers(stop)  # no callback: SIGHUP is logged and ignored
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(stop.is_set, timeout=5)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# A signal's handler runs on the main thread between two bytecodes: also while that thread holds a lock,
# e.g. the condition lock of the stop event inside ``stop.wait`` (the daemons' main loops), or of the
# proxy's reload event. The script holds that very lock when the signal comes, then checks that the
# handler did its work once the lock is free. A handler that takes the lock itself never returns.
SIGNAL_WHILE_LOCKED = """
import logging, os, signal, sys, threading, time
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.INFO)
from daemon import install_signal_handlers
stop, reloads = threading.Event(), threading.Event()
install_signal_handlers(stop, reload=reloads.set)
event = reloads if {signum} == signal.SIGHUP else stop
with event._cond:  # what Event.wait and Event.set hold
    os.kill(os.getpid(), {signum})
    for _ in range(1000):  # bytecodes for the handler to run between
        time.sleep(0.001)
sys.exit(0 if event.wait(5) and (stop.is_set() == ({signum} != signal.SIGHUP)) else 1)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_arriving_while_the_main_thread_holds_a_lock_is_handled_without_a_deadlock(signum) -> None:
    script = SIGNAL_WHILE_LOCKED.format(root=str(ROOT), signum=int(signum))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{signum.name} arriving while the main thread held the event's lock deadlocked it")
    assert done.returncode == 0, done.stderr
    if signum != signal.SIGHUP:  # a reload is the daemon's to log
        assert f"{signum.name} received, shutting down" in done.stderr


LONG_LIVED_AFTER_START = """
import gc, sys
sys.path.insert(0, {root!r})
from pathlib import Path
import daemon

class Service:
    def start(self):
        self.state = [[n] for n in range(1000)]  # what a start loads: the meters' state, long-lived

    def run(self, stop):
        walked = {{id(obj) for obj in gc.get_objects()}}  # what the collector's full passes walk
        return 0 if gc.get_freeze_count() and not any(id(item) in walked for item in self.state) else 1

    def stop(self):
        pass

    def request_reload(self):
        pass

sys.exit(daemon.main("test", "test", Path({root!r}), ["--config", {config!r}], {{}}, lambda *_: Service()))
"""


def test_what_the_start_leaves_is_kept_out_of_the_garbage_collectors_full_passes(tmp_path: Path) -> None:
    """A full collection walked every object of the process: 7 ms in the proxy, a stall of its readings.

    The modules, the configuration and the state loaded at start live as long
    as the daemon: frozen (``gc.freeze``), the collector leaves them alone.
    """
    config = write_config(tmp_path, config_dict(1, 2))
    script = LONG_LIVED_AFTER_START.format(root=str(ROOT), config=str(config))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0, done.stderr


# --- standard output nobody reads, or closed ---------------------------------------------------


class Stdout:
    """A daemon's standard output that is a pipe nobody reads, or one already closed at the other end."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.read_end, self.write_end = os.pipe()

    def started(self) -> None:
        """Call once the process has its copy of the write end."""
        os.close(self.write_end)
        if self.mode == "closed":
            os.close(self.read_end)

    def close(self) -> None:
        if self.mode == "unread":
            os.close(self.read_end)


@pytest.mark.parametrize("mode", ["unread", "closed"])
def test_config_sender_keeps_sending_when_nobody_reads_its_stdout(
        mode: str, tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    """300 meters at DEBUG write about 200 kB of log lines: far more than a pipe holds (64 kB)."""
    meter_ids = [f"33B12261{n:05d}" for n in range(300)]
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, ack_timeout_seconds=5,
                                                sections={"health": {"stats_interval_seconds": 1}}))
    simulator = simulated_meters(internal_broker.port, meter_ids, cadence=False)
    stats = Collector(central_broker.port, "kpm33b/bridge/config_sender/stats")
    stdout = Stdout(mode)
    sender = DaemonProcess(SENDER_SCRIPT, config, stdout=stdout.write_end)  # its log file: standard error only
    stdout.started()
    try:
        wait_for(lambda: stats.on("kpm33b/bridge/config_sender/stats"), timeout=10)
        central = publisher(central_broker.port)
        publish_all(central, [(f"kpm33b/{meter_id}/availability", "online") for meter_id in meter_ids])
        wait_for(lambda: json.loads(stats.on("kpm33b/bridge/config_sender/stats")[-1])["acked"] == 600, timeout=20)
        assert len(simulator.received_commands) == 600
        assert sender.alive()
        assert sender.terminate() == 0
        central.disconnect()
        central.loop_stop()
    finally:
        stdout.close()
        stats.close()
        simulator.stop()
    errors = sender.output()
    assert "Logging error" not in errors and "Traceback" not in errors, errors[:2000]


@pytest.mark.parametrize("mode", ["unread", "closed"])
def test_proxy_keeps_forwarding_when_nobody_reads_its_stdout(
        mode: str, tmp_path: Path, internal_broker: Mosquitto, central_broker: Mosquitto) -> None:
    """2,000 repeated readings, each dropped with a DEBUG line, then fresh ones that must come out."""
    config = write_config(tmp_path, config_dict(internal_broker.port, central_broker.port))
    live = Collector(central_broker.port, "kpm33b/bridge/state", f"kpm33b/{METER}/minutes")
    stdout = Stdout(mode)
    proxy = DaemonProcess(PROXY_SCRIPT, config, stdout=stdout.write_end)  # its log file: standard error only
    stdout.started()
    client = publisher(internal_broker.port)
    try:
        wait_for(lambda: live.on("kpm33b/bridge/state")[-1:] == [b"online"], timeout=15)
        publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(1, JAN_17), 100.0))] * 2000)
        publish_all(client, [("MQTT_ENY_NOW", eny_now(METER, minute(n, JAN_17), 100.0 + n)) for n in range(2, 12)])
        wait_for(lambda: len(live.on(f"kpm33b/{METER}/minutes")) == 11, timeout=20)
        assert proxy.alive()
        assert proxy.terminate() == 0
    finally:
        stdout.close()
        client.disconnect()
        client.loop_stop()
        live.close()
    errors = proxy.output()
    assert "Logging error" not in errors and "Traceback" not in errors, errors[:2000]


# --- the handler itself --------------------------------------------------------------------------


class PipeReader:
    """Reads a pipe to its end on a thread of its own, from when ``start`` is called."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> PipeReader:
        self.thread.start()
        return self

    def _run(self) -> None:
        while chunk := os.read(self.fd, 65536):
            self.data += chunk

    def lines(self, timeout: float = 10) -> list[str]:
        """Every line, once the pipe's write ends are all closed."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the pipe was not closed"
        os.close(self.fd)
        return self.data.decode().splitlines()


def logger_to(handler: logging.Handler) -> logging.Logger:
    """A logger of its own that writes only to ``handler``, message only."""
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test-handler-{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [handler]
    return logger


def test_every_line_arrives_in_order_when_the_stream_is_read() -> None:
    read_end, write_end = os.pipe()
    reader = PipeReader(read_end).start()
    with open(write_end, "w", closefd=True) as stream:
        handler = NonBlockingStreamHandler(stream)
        log = logger_to(handler)
        for number in range(5000):
            log.info("line %d", number)
        handler.close()  # written before close returns
    assert reader.lines() == [f"line {number}" for number in range(5000)]
    assert handler.dropped == 0


def test_a_stream_nobody_reads_never_blocks_the_caller_and_drops_are_counted_then_told() -> None:
    read_end, write_end = os.pipe()
    stream = open(write_end, "w", closefd=True)  # noqa: SIM115 (closed below)
    handler = NonBlockingStreamHandler(stream, capacity=1000, flush_timeout=10)
    log = logger_to(handler)
    logged = threading.Event()

    def log_a_lot() -> None:
        for number in range(50_000):  # about 1 MB: 16 times what the pipe holds
            log.info("line %06d", number)
        logged.set()

    threading.Thread(target=log_a_lot, daemon=True).start()
    wait_for(logged.is_set, timeout=30)
    dropped = handler.dropped
    assert dropped > 0
    reader = PipeReader(read_end).start()  # someone reads again
    handler.flush()  # returns once what waited is written
    log.info("after")
    handler.close()
    stream.close()
    lines = reader.lines()
    numbers = [int(line.split()[1]) for line in lines if line.startswith("line ")]
    assert numbers == sorted(set(numbers))
    assert len(numbers) + dropped == 50_000
    # Each batch written after new drops says how many since the last such line.
    told = [line for line in lines if not line.startswith("line ") and line != "after"]
    assert all(line.endswith(" log lines were dropped: standard output was not read, or closed") for line in told)
    assert sum(int(line.split()[0]) for line in told) == dropped
    assert lines[-1] == "after"


def test_a_closed_stream_costs_no_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w", closefd=True) as stream:
        handler = NonBlockingStreamHandler(stream)
        log = logger_to(handler)
        for number in range(100):
            log.info("line %d", number)
        handler.close()
    assert handler.dropped == 100
    assert capsys.readouterr().err == ""


def test_a_stream_without_a_file_descriptor_is_written_too() -> None:
    stream = io.StringIO()
    handler = NonBlockingStreamHandler(stream)
    log = logger_to(handler)
    log.info("one")
    log.warning("two")
    handler.flush()
    assert stream.getvalue() == "one\ntwo\n"
    handler.close()


def test_the_last_lines_before_exit_are_written(tmp_path: Path) -> None:
    script = (f"import logging, sys; sys.path.insert(0, {str(ROOT)!r})\n"
              "from daemon import setup_logging\n"
              "setup_logging('INFO', {})\n"
              "log = logging.getLogger('t')\n"
              "for number in range(5000):\n"
              "    log.info('line %d', number)\n"
              "log.info('last')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert result.stderr == ""
    messages = [line.split(": ", 1)[1] for line in result.stdout.splitlines()]
    assert messages == [f"line {number}" for number in range(5000)] + ["last"]
