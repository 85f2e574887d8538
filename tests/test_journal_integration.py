"""The proxy's energy journal between real Mosquitto processes: only the truth on disk, and damage survived.

The journal holds, per meter, the last energy the central broker acknowledged:
the counter guard restored from it at the next start must never be ahead of
what consumers have, or the readings in between are dropped as
``energy_decrease`` when the internal broker delivers them again. Each test
drives the proxy as a real process and breaks it at a chosen moment (SIGKILL,
a frozen central broker, a damaged journal, a full file system).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from broker import Mosquitto, wait_for
from daemons import (
    Collector,
    config_dict,
    energies,
    lines_with,
    logged_stats,
    publish_all,
    publisher,
    start_proxy,
    write_config,
)
from filesystems import fill_up, remount_read_only, small_tmpfs

from tools.meter_simulator import encode_payload, eny_now_payload

METER = "33B1225950027"
BASE_TIME = datetime(2026, 1, 12, 0, 0, 0)
# The journal is compacted once it holds more than 4 lines per meter + 10,000 (one meter here):
# 30,000 readings drained in one go cross that twice and leave about 10,000 after the second.
DRAIN_READINGS = 30_000
COMPACTION_LINES = 10_000
STATS_EVERY_SECOND = {"health": {"stats_interval_seconds": 1}}


# --- helpers -------------------------------------------------------------------


def energy_of(index: int) -> float:
    """The energy of reading ``index``: +0.01 kWh a minute (0.6 kW), far below any rate guard."""
    return round(1_000 + index / 100, 3)


def readings(first: int, count: int, meter: str = METER) -> list[tuple[str, bytes]]:
    """``count`` rising ENY_NOW readings of one meter, one minute apart (valid calendar dates)."""
    return [("MQTT_ENY_NOW", encode_payload(eny_now_payload(meter, BASE_TIME + timedelta(minutes=index),
                                                           energy_of(index))))
            for index in range(first, first + count)]


def send(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 and wait until the internal broker has every message."""
    client = publisher(port, max_inflight=500)  # paho's default of 20 makes 30,000 readings slow to send
    try:
        publish_all(client, messages)
    finally:
        client.disconnect()
        client.loop_stop()


def journal_lines(path: Path) -> int:
    """Complete lines in the journal file right now (0 when it does not exist)."""
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture
def internal_broker() -> Iterator[Mosquitto]:
    """The internal broker with the shipped limits (mosquitto/internal.conf).

    At Mosquitto's default queue of 1,000 messages a client, 2.0.11 drops part of
    a resumed session holding tens of thousands of unacknowledged readings and
    never answers the proxy's subscription: the broker's limit, not the proxy's.
    """
    broker = Mosquitto(extra_config="max_queued_messages 200000\nmax_inflight_messages 100").start()
    yield broker
    broker.cleanup()


@pytest.fixture
def central_broker() -> Iterator[Mosquitto]:
    """The central broker, with room to queue a whole drain for the test's consumer."""
    broker = Mosquitto(extra_config="max_queued_messages 1000000").start()
    yield broker
    if broker.process is not None:
        broker.process.send_signal(signal.SIGCONT)  # a test may have left it frozen
    broker.cleanup()


# --- 1. only what the central broker acknowledged -------------------------------


class Shrinks:
    """Watches the journal file and counts how often it got shorter (a compaction)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.longest = journal_lines(path)
        self.count = 0

    def poll(self) -> int:
        lines = journal_lines(self.path)
        if lines < self.longest:
            self.count += 1
        self.longest = lines
        return self.count


@pytest.mark.parametrize("fault", ["sigkill-after-compaction-1", "sigkill-after-compaction-2",
                                   "central-frozen-then-sigterm"])
def test_a_proxy_stopped_mid_drain_restarts_without_losing_a_reading(
        tmp_path, internal_broker, central_broker, fault):
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    consumer = Collector(central_broker.port, "kpm33b/+/minutes", client_id="drain-consumer", persistent=True)
    state = tmp_path / "state"
    proxy = start_proxy(write_config(tmp_path / "first", document), state=state)
    journal = state / "energy.journal"

    central_broker.stop()
    wait_for(lambda: "disconnected from the central broker" in proxy.output(), timeout=10)
    send(internal_broker.port, readings(0, DRAIN_READINGS))
    wait_for(lambda: (s := logged_stats(proxy.output())) and s["received"] >= DRAIN_READINGS, timeout=60)
    shrinks = Shrinks(journal)
    central_broker.start()

    if fault.startswith("sigkill"):
        wanted = int(fault[-1])
        wait_for(lambda: shrinks.poll() >= wanted, timeout=120, interval=0.005)
        proxy.kill()  # at once: mid-drain, just after a compaction
    else:
        # Frozen while the journal is about to be compacted (or just was): the compaction
        # then runs while the central broker acknowledges nothing more.
        wait_for(lambda: shrinks.poll() or journal_lines(journal) > COMPACTION_LINES, timeout=120,
                 interval=0.005)
        central_broker.process.send_signal(signal.SIGSTOP)
        wait_for(lambda: shrinks.poll(), timeout=10, interval=0.005)
        assert proxy.terminate(timeout=60) == 0
        central_broker.process.send_signal(signal.SIGCONT)
    arrived_before_restart = len(energies(consumer, METER))

    restarted = start_proxy(write_config(tmp_path / "restarted", document), state=state)
    expected = [energy_of(index) for index in range(DRAIN_READINGS)]
    try:
        wait_for(lambda: energies(consumer, METER)[-1:] == expected[-1:], timeout=120)
    finally:
        got = energies(consumer, METER)
        missing = sorted(set(expected) - set(got))
        print(f"\n[{fault}] readings sent {len(expected)}, arrived {len(got)} ({arrived_before_restart} before the "
              f"restart), missing {len(missing)} (first {missing[:3]}), repeated {len(got) - len(set(got))}")
    assert restarted.terminate() == 0
    stats = logged_stats(restarted.output())
    print(f"  restarted proxy: {stats}")
    assert not missing
    assert "energy_decrease" not in stats["dropped"]
    # Mid-drain: the restarted proxy had readings left to forward. How many depends on how fast the first
    # one drained before the stop point (550 to 20,000 seen), so any number above none proves it.
    assert stats["forwarded"] > 0, "the proxy was not stopped mid-drain"


# --- 2. damage survived ------------------------------------------------------------

OTHER = "33B1225950028"


def reading(meter: str, minutes: int, energy: float) -> tuple[str, bytes]:
    """One ENY_NOW reading ``minutes`` after BASE_TIME."""
    return ("MQTT_ENY_NOW", encode_payload(eny_now_payload(meter, BASE_TIME + timedelta(minutes=minutes), energy)))


def test_a_damaged_journal_is_read_around_the_damage_and_the_proxy_forwards(
        tmp_path, internal_broker, central_broker):
    state = tmp_path / "state"
    state.mkdir()
    (state / "energy.journal").write_bytes(
        f"{METER} 16234.5 20260111235900\n".encode()
        + f"{OTHER} 1\xff2.0 20260111235900\n".encode("latin-1")  # not UTF-8
        + f"{OTHER} 12.5 20260111235900\n".encode()
        + b"\x00" * 40 + b"\n"  # a block of NULs
        + f"{METER} 16".encode()  # torn: 16234.75 cut short, no newline
    )
    consumer = Collector(central_broker.port, "kpm33b/+/minutes")
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    proxy = start_proxy(write_config(tmp_path / "proxy", document), state=state)
    send(internal_broker.port, [reading(METER, 1, 16000.0), reading(OTHER, 1, 12.4),  # below the kept floors
                                reading(METER, 2, 16240.0), reading(OTHER, 2, 12.6)])
    wait_for(lambda: energies(consumer, METER) and energies(consumer, OTHER), timeout=10)
    assert energies(consumer, METER) == [16240.0]
    assert energies(consumer, OTHER) == [12.6]
    output = proxy.output()
    print("\n" + "\n".join(lines_with(output, "journal", level="WARNING") + lines_with(output, "loaded", level="INFO")))
    assert len(lines_with(output, "skipped 2 damaged lines of the energy journal", level="WARNING")) == 1
    assert len(lines_with(output, "unfinished last line", level="WARNING")) == 1
    assert "loaded the last energy of 2 meters" in output and "(2 damaged lines skipped)" in output
    assert proxy.terminate() == 0
    assert "Traceback" not in proxy.output()
    assert (state / "energy.journal").read_text().splitlines() == [
        f"{METER} 16234.5 20260111235900", f"{OTHER} 12.5 20260111235900",
        f"{METER} 16240.0 20260112000200", f"{OTHER} 12.6 20260112000200"]


@pytest.mark.parametrize("content", [b"\x00" * 4096, b"\x00" * 100 + b"\n" + b"\xff\xfe" * 50 + b"\n"],
                         ids=["nul-bytes", "garbage-lines"])
def test_a_journal_that_yields_nothing_is_kept_aside_with_an_error(
        tmp_path, internal_broker, central_broker, content):
    state = tmp_path / "state"
    state.mkdir()
    (state / "energy.journal").write_bytes(content)
    consumer = Collector(central_broker.port, "kpm33b/+/minutes")
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    proxy = start_proxy(write_config(tmp_path / "proxy", document), state=state)
    send(internal_broker.port, [reading(METER, 1, 5.0)])
    wait_for(lambda: energies(consumer, METER) == [5.0], timeout=10)
    errors = lines_with(proxy.output(), "holds no valid line", level="ERROR")
    print("\n" + "\n".join(errors))
    assert len(errors) == 1
    kept = list(state.glob("energy.journal.damaged-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == content, "the evidence was not kept as it was"
    assert str(kept[0]) in errors[0]
    assert proxy.terminate() == 0
    assert "Traceback" not in proxy.output()


def test_a_second_unreadable_journal_does_not_overwrite_the_first_one_kept_aside(
        tmp_path, internal_broker, central_broker):
    state = tmp_path / "state"
    state.mkdir()
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    for attempt in range(2):
        (state / "energy.journal").write_bytes(bytes([attempt]) * 100)
        proxy = start_proxy(write_config(tmp_path / f"proxy-{attempt}", document), state=state)
        assert proxy.terminate() == 0
    kept = sorted(path.read_bytes() for path in state.glob("energy.journal.damaged-*"))
    assert kept == [b"\x00" * 100, b"\x01" * 100]


@pytest.fixture
def small_file_system(tmp_path: Path) -> Iterator[Path]:
    """A 256 KB tmpfs mounted for this test: a real file system that can be filled up (needs root)."""
    with small_tmpfs(tmp_path / "small-fs") as mount_point:
        yield mount_point


def test_a_state_directory_on_a_full_file_system_at_start_exits_3_with_one_error(
        tmp_path, small_file_system, internal_broker, central_broker):
    state = small_file_system / "state"
    state.mkdir()
    (state / "energy.journal").write_text(f"{METER} 16234.5 20260111235900\n")
    fill_up(small_file_system)
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    proxy = start_proxy(write_config(tmp_path / "proxy", document), state=state, wait_online=False)
    assert proxy.wait(15) == 3
    output = proxy.output()
    print("\n" + "\n".join(lines_with(output, level="ERROR")))
    assert "Traceback" not in output
    assert len(lines_with(output, level="ERROR")) == 1
    assert lines_with(output, f"cannot use the state directory {state}: No space left on device", level="ERROR")
    assert (state / "energy.journal").read_text() == f"{METER} 16234.5 20260111235900\n", "the journal was damaged"


@pytest.mark.parametrize("fault", ["state-is-a-file", "journal-is-a-directory", "read-only-file-system"])
def test_an_unusable_state_directory_exits_3_with_one_error_line(
        tmp_path, small_file_system, internal_broker, central_broker, fault):
    if fault == "state-is-a-file":
        state = tmp_path / "state"
        state.write_text("not a directory\n")
        expected = f"cannot use the state directory {state}: Not a directory ({state})"
    elif fault == "journal-is-a-directory":
        state = tmp_path / "state"
        (state / "energy.journal").mkdir(parents=True)
        expected = f"cannot use the state directory {state}: Is a directory ({state / 'energy.journal'})"
    else:
        state = small_file_system / "state"
        state.mkdir()
        remount_read_only(small_file_system)
        expected = f"cannot use the state directory {state}: Read-only file system"
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    proxy = start_proxy(write_config(tmp_path / "proxy", document), state=state, wait_online=False)
    assert proxy.wait(15) == 3
    output = proxy.output()
    print("\n" + "\n".join(lines_with(output, level="ERROR")))
    assert "Traceback" not in output
    assert len(lines_with(output, level="ERROR")) == 1
    assert lines_with(output, expected, level="ERROR")


def test_a_full_file_system_while_running_is_one_error_forwarding_goes_on_and_the_journal_catches_up(
        tmp_path, small_file_system, internal_broker, central_broker):
    state = small_file_system / "state"
    consumer = Collector(central_broker.port, "kpm33b/+/minutes")
    document = config_dict(internal_broker.port, central_broker.port, level="INFO", sections=STATS_EVERY_SECOND)
    document["logging"] = {"level": "DEBUG"}  # each failed write is a DEBUG line; the ERROR is rate-limited
    proxy = start_proxy(write_config(tmp_path / "proxy", document), state=state)
    filler = fill_up(small_file_system)

    # 300 lines of ~37 bytes need new pages of the file system: the writes fail.
    send(internal_broker.port, [reading(METER, minute, 100 + minute / 100) for minute in range(300)])
    wait_for(lambda: len(energies(consumer, METER)) == 300, timeout=20)
    failed = "energy journal write failed"
    wait_for(lambda: len(lines_with(proxy.output(), failed, level="DEBUG")) >= 3, timeout=30)  # retried, still full
    send(internal_broker.port, [reading(METER, minute, 100 + minute / 100) for minute in range(300, 400)])
    wait_for(lambda: len(energies(consumer, METER)) == 400, timeout=20)
    assert energies(consumer, METER) == [100 + minute / 100 for minute in range(400)]
    output = proxy.output()
    errors = lines_with(output, "cannot write the energy journal", level="ERROR")
    print(f"\n[full file system] {len(lines_with(output, failed, level='DEBUG'))} failed writes, "
          f"{len(errors)} ERROR lines:\n" + "\n".join(errors))
    assert len(errors) == 1 and "No space left on device" in errors[0]
    assert proxy.alive()

    filler.unlink()  # space is back: the next retry writes every acknowledged floor
    journal = state / "energy.journal"
    wait_for(lambda: journal.read_text() == f"{METER} 103.99 20260112063900\n", timeout=20)
    # The file is in place before the line is logged (through the log's writer thread).
    wait_for(lambda: lines_with(proxy.output(), "is written again", level="WARNING"), timeout=5)
    send(internal_broker.port, [reading(METER, 400, 104.0)])
    wait_for(lambda: len(energies(consumer, METER)) == 401, timeout=10)
    assert proxy.terminate() == 0
    assert journal.read_text().splitlines()[-1] == f"{METER} 104.0 20260112064000"
    assert "Traceback" not in proxy.output()
