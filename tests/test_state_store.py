"""The energy journal without a broker: its format, what it holds, and compaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from state_store import EnergyJournal, Floor, StateLocked

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


def test_a_second_journal_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    first = EnergyJournal(tmp_path)
    first.open()
    with pytest.raises(StateLocked):
        EnergyJournal(tmp_path).open()
    first.close()
    EnergyJournal(tmp_path).open()
