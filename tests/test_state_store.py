"""The energy journal without a broker: its format, what it holds, and compaction."""

from __future__ import annotations

import io
import logging
import tracemalloc
from pathlib import Path

import pytest
from filesystems import fill_up, small_tmpfs
from hypothesis import given
from hypothesis import strategies as st

from meter_table import MeterIds
from state_store import (
    MAX_LINE_BYTES,
    EnergyJournal,
    Floor,
    LastSeenFile,
    ParsedJournal,
    StateLocked,
    format_line,
    parse_journal,
    split_lines,
)

METER = "33B1225950027"
OTHER = "33B1225950028"


def journal_text(directory: Path) -> str:
    return (directory / "energy.journal").read_text()


def test_a_recorded_floor_is_written_with_its_meter_time_and_loads_again(tmp_path: Path) -> None:
    journal = EnergyJournal(tmp_path)
    assert journal.open() == {}
    journal.record(METER, 16234.5, "20260117211500")
    journal.record(OTHER, 12.0, "20260117211500")
    journal.record(METER, 16234.75, "20260117213000")
    journal.close()
    assert journal_text(tmp_path).splitlines() == [
        f"{METER} 16234.5 20260117211500",
        f"{OTHER} 12.0 20260117211500",
        f"{METER} 16234.75 20260117213000",
    ]
    again = EnergyJournal(tmp_path)
    assert again.open() == {OTHER: Floor(12.0, "20260117211500"), METER: Floor(16234.75, "20260117213000")}
    again.close()
    assert journal_text(tmp_path).splitlines() == [f"{OTHER} 12.0 20260117211500",
                                                   f"{METER} 16234.75 20260117213000"]


def test_old_two_field_lines_load_without_a_meter_time_and_stay_loadable(tmp_path: Path) -> None:
    (tmp_path / "energy.journal").write_text(f"{METER} 163.486\n{OTHER} 1.5\n{METER} 163.5\n")
    journal = EnergyJournal(tmp_path)
    assert journal.open() == {OTHER: Floor(1.5, None), METER: Floor(163.5, None)}
    journal.record(OTHER, 2.0, "20260117211500")
    journal.compact()
    journal.close()
    assert journal_text(tmp_path).splitlines() == [f"{METER} 163.5", f"{OTHER} 2.0 20260117211500"]


def test_compaction_writes_only_what_was_recorded_as_acknowledged(tmp_path: Path) -> None:
    # The proxy's filters may already hold newer energy of readings still queued for the
    # central broker: compact() takes nothing from outside, only what record() was given.
    journal = EnergyJournal(tmp_path, compact_after=3)
    journal.open()
    for minute in range(5):
        journal.record(METER, 100.0 + minute, f"2026011721{minute:02d}00")
    journal.flush()
    assert journal.needs_compaction()
    journal.compact()
    assert not journal.needs_compaction()
    journal.close()
    lines = journal_text(tmp_path).splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{METER} 104.0 ")


def test_the_compaction_threshold_is_today_s_rule_by_default(tmp_path: Path) -> None:
    journal = EnergyJournal(tmp_path)
    journal.open()
    for index in range(10_000):
        journal.record(METER, float(index), "20260117211500")
    journal.flush()
    assert not journal.needs_compaction()  # 10,000 lines: not more than 4 per meter + 10,000
    journal.record(METER, 10_000.0, "20260117211500")
    journal.flush()
    assert journal.needs_compaction()
    journal.close()


def test_the_journal_keeps_at_most_max_meters_the_least_recently_recorded_go_first(tmp_path: Path) -> None:
    journal = EnergyJournal(tmp_path, max_meters=2)
    journal.open()
    journal.record(METER, 1.0, "20260117211500")
    journal.record(OTHER, 2.0, "20260117211500")
    journal.record(METER, 1.5, "20260117213000")  # METER is now the most recent
    journal.record("33B1225950029", 3.0, "20260117211500")
    journal.compact()
    journal.close()
    assert EnergyJournal(tmp_path).open() == {METER: Floor(1.5, "20260117213000"),
                                              "33B1225950029": Floor(3.0, "20260117211500")}


def test_a_journal_opened_again_lets_go_of_the_meters_it_held_before_in_the_shared_ids(tmp_path: Path) -> None:
    """A journal reopened replaces its table of floors: the old one must not keep holding its meters.

    The ids are shared with the proxy's other tables; a meter the old table
    still held would never be freed once every live table let go of it.
    """
    ids = MeterIds()
    journal = EnergyJournal(tmp_path, max_meters=2, ids=ids)
    journal.open()
    journal.record(METER, 1.0, "20260117211500")
    journal.record(OTHER, 2.0, "20260117211500")
    journal.close()
    journal.open()
    journal.record("33B1225950029", 3.0, "20260117211500")  # METER, the least recently recorded, goes
    assert journal.floors() == {OTHER: Floor(2.0, "20260117211500"), "33B1225950029": Floor(3.0, "20260117211500")}
    assert ids.find(METER) == -1 and len(ids) == 2
    journal.close()


def test_a_fleet_in_service_holds_bytes_per_meter_not_a_dict_entry_and_a_tuple(tmp_path: Path) -> None:
    """20,000 meters each recorded twice, as a fleet in service is: under 70 bytes per meter held (58 measured).

    Kept in a dict of ``Floor`` tuples moved to the end at each record, they
    held 136 bytes per meter: a tuple and a float each, and a dict table
    grown by the moves.
    """
    meters = [f"33B{number:010d}" for number in range(20_000)]
    journal = EnergyJournal(tmp_path, compact_after=10**9)
    journal.open()
    tracemalloc.start()
    try:
        for meter_time in ("20260117211500", "20260117213000"):
            for number, meter_id in enumerate(meters):
                journal.record(meter_id, 1000.0 + number + int(meter_time[-4:]) / 10_000, meter_time)
            journal.flush()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
        journal.close()
    assert journal.floors()[meters[7]] == Floor(1007.3, "20260117213000")
    assert held / len(meters) < 70


def test_compacting_a_large_fleet_writes_its_lines_in_chunks_not_all_at_once(tmp_path: Path) -> None:
    """20,000 floors rewritten: a peak under 1 MB, the file whole.

    The journal was rewritten from all its lines joined at once: 100,000
    meters made 13.4 MB of short-lived strings, every few minutes in a
    fleet in service. Measured for 20,000: a peak of 2.7 MB before, 0.7 MB
    after (and 0.7 MB for 100,000).
    """
    journal = EnergyJournal(tmp_path, compact_after=10**9)
    journal.open()
    for number in range(20_000):
        journal.record(f"33B{number:010d}", 1000.0 + number * 0.37, "20260117211500")
    journal.flush()
    tracemalloc.start()
    try:
        journal.compact()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    journal.close()
    lines = journal_text(tmp_path).splitlines()
    assert len(lines) == 20_000 and lines[7] == f"33B{7:010d} {1000.0 + 7 * 0.37!r} 20260117211500"
    assert peak < 1_000_000, peak


def test_a_floor_whose_time_is_not_a_meter_time_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    journal = EnergyJournal(tmp_path)
    journal.open()
    journal.record(METER, 1.0, "20260117211500")
    for bad in ("2026", "2026011721150x"):
        with pytest.raises(ValueError, match="not a meter time"):
            journal.record(OTHER, 2.0, bad)
    assert journal.floors() == {METER: Floor(1.0, "20260117211500")}
    journal.close()


def test_a_second_journal_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = EnergyJournal(tmp_path)
    first.open()
    with pytest.raises(StateLocked):
        EnergyJournal(tmp_path).open()
    first.close()
    EnergyJournal(tmp_path).open()


# --- the parser: damage ------------------------------------------------------------------


def parse(data: bytes) -> ParsedJournal:
    """Parse journal bytes as the journal reads its file."""
    return parse_journal(split_lines(io.BytesIO(data)))


@pytest.mark.parametrize("line", [
    f"{METER} 163.5 2026011721150",  # 13 digits
    f"{METER} 163.5 202601172115000",  # 15 digits
    f"{METER} 163.5 2026-01-17T21",
    f"{METER} 163.5 20260117211500 extra",
    f"{METER} 163.5  20260117211500",
    f"{METER} 163.5 20260117211500\r",
    f"{METER} 163.5 ２０２６０１１７２１１５００",  # full-width digits
    f"{METER} nan 20260117211500",
    f"{METER} inf",
    f"{METER} 0x10",
    f"{METER}",
    f"{METER[:-1]} 163.5 20260117211500",
    "33B12/5950027 163.5 20260117211500",
    "",
])
def test_a_line_with_a_bad_field_is_damaged(line: str) -> None:
    parsed = parse(f"{METER} 1.0 20260117200000\n{line}\n{OTHER} 2.0\n".encode())
    assert parsed.floors == {METER: Floor(1.0, "20260117200000"), OTHER: Floor(2.0, None)}
    assert parsed.damaged == 1
    assert parsed.first_damaged is not None and parsed.first_damaged[0] == 2
    assert not parsed.torn


def test_a_byte_that_is_not_utf8_damages_its_line_only() -> None:
    parsed = parse(f"{METER} 16234.5 20260117211500\n".encode()
                   + b"33B1225950028 12\xff.5 20260117211500\n"
                   + f"{OTHER} 12.5 20260117211500\n".encode())
    assert parsed.floors == {METER: Floor(16234.5, "20260117211500"), OTHER: Floor(12.5, "20260117211500")}
    assert parsed.damaged == 1
    assert parsed.first_damaged == (2, b"33B1225950028 12\xff.5 20260117211500\n")


def test_damaged_middle_lines_are_counted_and_the_later_valid_lines_win() -> None:
    parsed = parse(f"{METER} 1.0 20260117200000\n".encode() + b"\x00" * 30 + b"\n"
                   + f"{METER} 2.0 20260117201500\n".encode() + b"garbage\n" + b"\xc3\x28\n"
                   + f"{METER} 3.0 20260117203000\n".encode())
    assert parsed.floors == {METER: Floor(3.0, "20260117203000")}
    assert parsed.damaged == 3
    assert parsed.first_damaged == (2, b"\x00" * 30 + b"\n")


def test_a_file_of_nul_bytes_yields_nothing() -> None:
    assert parse(b"\x00" * 4096) == ParsedJournal({}, 0, None, True)  # one unfinished line
    assert parse((b"\x00" * 99 + b"\n") * 3).damaged == 3


def test_a_torn_last_line_is_ignored_and_does_not_lower_the_floor() -> None:
    parsed = parse(f"{METER} 16234.5 20260117211500\n{METER} 16".encode())
    assert parsed.floors == {METER: Floor(16234.5, "20260117211500")}
    assert parsed.torn and parsed.damaged == 0


def test_an_overlong_line_is_damaged_and_the_next_line_still_loads() -> None:
    overlong = f"{METER} 1".encode() + b"0" * 1_000_000 + b"\n"  # a prefix of it would read as a huge floor
    parsed = parse(overlong + f"{OTHER} 2.0 20260117211500\n".encode())
    assert parsed.floors == {OTHER: Floor(2.0, "20260117211500")}
    assert parsed.damaged == 1 and len(parsed.first_damaged[1]) == 60
    assert parse(b"x" * (MAX_LINE_BYTES * 3)).torn


@given(energy=st.floats(allow_nan=False, allow_infinity=False),
       meter_time=st.none() | st.from_regex(r"\A[0-9]{14}\Z"))
def test_every_floor_written_reads_back_the_same(energy: float, meter_time: str | None) -> None:
    floor = Floor(energy, meter_time)
    assert parse(format_line(METER, floor).encode()) == ParsedJournal({METER: floor}, 0, None, False)


# --- a failing disk --------------------------------------------------------------------------


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def journal_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]


def test_writes_failing_on_a_full_disk_are_one_error_a_minute_retried_and_caught_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    with small_tmpfs(tmp_path / "small-fs") as mount_point:
        journal = EnergyJournal(mount_point / "state", retry_seconds=5.0, clock=clock)
        journal.open()
        filler = fill_up(mount_point)
        with caplog.at_level(logging.DEBUG, logger="state_store"):
            journal.record(METER, 1.0, "20260117200000")
            journal.flush()  # fails: an ERROR
            assert len(journal_errors(caplog)) == 1 and "No space left on device" in journal_errors(caplog)[0]
            for second in range(1, 60):  # every tick of the next minute: the floors change, retries fail
                clock.now += 1
                journal.record(METER, 1.0 + second, "20260117200000")
                journal.flush()
                assert not journal.needs_compaction()
            assert journal.write_failures == 1 + 59 // 5
            assert len(journal_errors(caplog)) == 1
            clock.now += 1  # a minute after the first ERROR: the next failure is reported again
            journal.flush()
            errors = journal_errors(caplog)
            unreported = journal.write_failures - 1
            assert len(errors) == 2 and f"({unreported} failed writes since the last report)" in errors[1]
            assert journal.floors() == {METER: Floor(60.0, "20260117200000")}

            filler.unlink()
            clock.now += 4.9
            journal.flush()  # not yet due
            assert (mount_point / "state" / "energy.journal").read_text() == ""
            clock.now += 0.1
            journal.flush()
            assert (mount_point / "state" / "energy.journal").read_text() == f"{METER} 60.0 20260117200000\n"
            assert any("is written again" in record.getMessage() for record in caplog.records)
            journal.record(METER, 61.0, "20260117201500")
            journal.flush()  # appending again
            journal.close()
        assert (mount_point / "state" / "energy.journal").read_text().splitlines() == [
            f"{METER} 60.0 20260117200000", f"{METER} 61.0 20260117201500"]
        assert not list((mount_point / "state").glob("*.tmp")), "a failed rewrite left its temporary file"


def test_a_journal_still_failing_at_close_says_so_and_holds_only_acknowledged_floors(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with small_tmpfs(tmp_path / "small-fs") as mount_point:
        state = mount_point / "state"
        state.mkdir()
        (state / "energy.journal").write_text(f"{METER} 1.0 20260117200000\n")
        journal = EnergyJournal(state)
        journal.open()
        fill_up(mount_point)
        recorded = [2.0 + index for index in range(300)]  # more than the file's last page holds
        with caplog.at_level(logging.ERROR, logger="state_store"):
            for energy in recorded:
                journal.record(METER, energy, "20260117201500")
            journal.flush()
            journal.close()
        assert any("could not be written before stopping" in message for message in journal_errors(caplog))
        # What reached the disk before it was full: whole lines of acknowledged floors, and at
        # most one line cut short at the end (ignored at the next start).
        parsed = parse((state / "energy.journal").read_bytes())
        assert parsed.damaged == 0
        assert parsed.floors[METER].energy in [1.0, *recorded]


# --- the last-seen file ---------------------------------------------------------------


def test_last_seen_round_trips_oldest_first(tmp_path: Path) -> None:
    store = LastSeenFile(tmp_path)
    assert store.save([("33B1225950028", 1_800_000_100.4, False), ("33B1225950027", 1_800_000_000.0, True)])

    assert list(store.load().items()) == [("33B1225950027", (1_800_000_000.0, True)),
                                          ("33B1225950028", (1_800_000_100.0, False))]


def test_last_seen_skips_damaged_lines_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "last_seen").write_bytes(b"33B1225950027 1800000000 online\n" + b"\x00" * 30 + b"\n"
                                         + b"33B12/5950028 1800000000 online\n33B1225950029 nan online\n"
                                         + b"33B1225950030 1800000000 maybe\n33B1225950031 18")

    assert LastSeenFile(tmp_path).load() == {"33B1225950027": (1_800_000_000.0, True)}
    assert "skipped 5 damaged lines" in caplog.text


def test_last_seen_that_cannot_be_written_is_an_error_not_an_exception(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LastSeenFile(tmp_path / "missing-directory")

    assert store.save([("33B1225950027", 1.0, True)]) is False
    assert store.save([("33B1225950027", 1.0, True)]) is False
    assert caplog.text.count("cannot write") == 1
