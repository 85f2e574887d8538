"""The compact meter table: checked against a plain model (dicts and lists) under random operations."""

from __future__ import annotations

import random
import sys
import threading
import tracemalloc

import pytest

from meter_table import METER_TIME, MeterIds, MeterSet, MeterTable, time_code, time_text


def meter(number: int) -> str:
    return f"33B{number:010d}"


class Model:
    """What the table must behave like: ordered lists of meter ids and their column values."""

    def __init__(self, lists: int) -> None:
        self.lists: list[list[str]] = [[] for _ in range(lists)]
        self.values: dict[str, tuple[float, int]] = {}

    def which(self, meter_id: str) -> int:
        return next(number for number, ids in enumerate(self.lists) if meter_id in ids)


def check(table: MeterTable, model: Model) -> None:
    assert len(table) == len(model.values)
    for which, ids in enumerate(model.lists):
        assert table.meter_ids(which) == ids
        assert table.count(which) == len(ids)
    for meter_id, (energy, time) in model.values.items():
        slot = table.find(meter_id)
        assert slot >= 0 and table.meter_id(slot) == meter_id
        assert (table.column("energy")[slot], table.column("time")[slot]) == (energy, time)


def random_step(table: MeterTable, model: Model, rng: random.Random, meter_id: str, step: int) -> None:
    """One random add, touch or remove of ``meter_id``, in the table and in its model."""
    slot = table.find(meter_id)
    action = rng.random()
    if meter_id not in model.values:
        assert slot == -1 and meter_id not in table
        if action < 0.7:
            which = rng.randrange(2)
            slot = table.add(meter_id, which)
            assert table.column("time")[slot] == 0 and table.column("energy")[slot] != table.column("energy")[slot]
            table.column("energy")[slot], table.column("time")[slot] = step / 4, step
            model.lists[which].append(meter_id)
            model.values[meter_id] = (step / 4, step)
    elif action < 0.5:
        which = rng.randrange(2)
        table.touch(slot, which)
        assert table.list_of(slot) == which
        model.lists[model.which(meter_id)].remove(meter_id)
        model.lists[which].append(meter_id)
    else:
        table.remove(slot)
        model.lists[model.which(meter_id)].remove(meter_id)
        del model.values[meter_id]


@pytest.mark.parametrize("seed", range(8))
def test_random_adds_touches_and_removes_keep_ids_order_and_columns(seed: int) -> None:
    rng = random.Random(seed)
    table = MeterTable({"energy": "d", "time": "q"}, defaults={"energy": float("nan")}, lists=2)
    model = Model(2)
    population = [meter(rng.randrange(10**10)) for _ in range(600)]
    for step in range(6000):
        random_step(table, model, rng, rng.choice(population), step)
        if step % 97 == 0:
            check(table, model)
    check(table, model)


def test_growing_to_many_meters_and_emptying_again() -> None:
    table = MeterTable({"seen": "d"})
    ids = [meter(number * 7919) for number in range(5000)]
    for number, meter_id in enumerate(ids):
        slot = table.add(meter_id)  # before ``column``: an add may replace the arrays
        table.column("seen")[slot] = number
    assert table.meter_ids() == ids
    assert [table.column("seen")[table.find(meter_id)] for meter_id in ids] == list(range(5000))
    for meter_id in ids[:4990]:
        table.remove(table.find(meter_id))
    assert table.meter_ids() == ids[4990:]
    assert [table.column("seen")[table.find(meter_id)] for meter_id in ids[4990:]] == list(range(4990, 5000))
    while table.oldest() != -1:
        table.remove(table.oldest())
    assert len(table) == 0 and ids[0] not in table


def test_an_id_that_is_not_13_ascii_characters_is_refused() -> None:
    table = MeterTable()
    for bad in ("33B", "33B00000000000", "33B000000000é"):
        with pytest.raises(ValueError, match="not a meter id"):
            table.add(bad)
        assert bad not in table  # a question about it is answered, not an exception
    assert len(table) == 0


def test_a_meter_costs_bytes_not_objects_and_touching_it_costs_nothing() -> None:
    """20,000 meters with two 8-byte columns: under 80 bytes each, free slots included (a dict of floats takes 62)."""
    ids = [meter(number) for number in range(20_000)]
    tracemalloc.start()
    try:
        table = MeterTable({"energy": "d", "time": "q"})
        for meter_id in ids:
            table.add(meter_id)
        added = tracemalloc.get_traced_memory()[0]
        for meter_id in ids:
            table.touch(table.find(meter_id))
        touched = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert added / len(ids) < 80
    assert touched - added < 1000  # moving 20,000 meters: no growth (a dict's table would double)


def test_a_meter_set_is_an_ordered_set_whose_members_keep_their_place() -> None:
    members = MeterSet()
    for number in (3, 1, 2, 1):
        members.add(meter(number))
    assert list(members) == [meter(3), meter(1), meter(2)] and len(members) == 3
    assert members.first(2) == [meter(3), meter(1)] and members.first(9) == list(members)
    members.discard(meter(1))
    members.discard(meter(9))  # not a member: nothing happens
    assert list(members) == [meter(3), meter(2)] and meter(1) not in members and meter(2) in members
    for member in members:  # a copy: the set may change meanwhile
        members.discard(member)
    assert len(members) == 0 and members.first(1) == []


def test_a_slot_and_a_column_stay_valid_while_the_table_grows() -> None:
    """Growing extends the arrays in place: a fleet appearing at once is not copied meter by meter."""
    table = MeterTable({"energy": "d"})
    slots = {meter(number): table.add(meter(number)) for number in range(16)}
    table.touch(slots[meter(0)])  # the oldest is now the youngest: a copy in list order would move it
    energies = table.column("energy")
    energies[slots[meter(0)]] = 1.5
    for number in range(16, 1000):
        table.add(meter(number))
    assert table.find(meter(0)) == slots[meter(0)] and table.column("energy") is energies
    assert energies[slots[meter(0)]] == 1.5


def test_a_copy_has_every_meter_in_the_table_and_none_removed() -> None:
    table = MeterTable({"seen": "d"}, lists=2)
    for number in range(40):
        slot = table.add(meter(number), number % 2)
        table.column("seen")[slot] = number / 2
    for number in range(0, 40, 3):
        table.remove(table.find(meter(number)))
    copy = table.copy("seen")
    table.add(meter(99))  # the copy is the table as it was
    assert sorted(copy.entries()) == [(meter(number), number / 2, number % 2) for number in range(40) if number % 3]


@pytest.mark.parametrize("seed", range(6))
def test_tables_sharing_their_ids_each_keep_their_own_meters_and_free_an_id_once_none_holds_it(seed: int) -> None:
    """Three tables on one ``MeterIds``, random adds, touches, removes and clears, each against its own model."""
    rng = random.Random(seed)
    ids = MeterIds()
    tables = [MeterTable({"energy": "d", "time": "q"}, defaults={"energy": float("nan")}, lists=2, ids=ids)
              for _ in range(3)]
    models = [Model(2) for _ in tables]
    population = [meter(rng.randrange(10**10)) for _ in range(400)]
    for step in range(5000):
        number = rng.randrange(3)
        meter_id = rng.choice(population)
        if rng.random() < 0.001:
            tables[number].clear()
            models[number] = Model(2)
        else:
            random_step(tables[number], models[number], rng, meter_id, step)
            slot = tables[number].find(meter_id)
            assert slot == -1 or ids.find(meter_id) == slot  # one slot for a meter, whichever tables hold it
        if step % 97 == 0:
            for each, its_model in zip(tables, models, strict=True):
                check(each, its_model)
            held = set().union(*(its_model.values for its_model in models))
            assert len(ids) == len(held)
            assert all((ids.find(meter_id) >= 0) == (meter_id in held) for meter_id in population)
    for table in tables:
        table.clear()
    assert len(ids) == 0 and ids.capacity == 16  # no meter held: the ids' memory is given back


def test_a_meter_removed_from_one_table_stays_in_the_others_with_its_slot() -> None:
    ids = MeterIds()
    first, second = MeterTable({"seen": "d"}, ids=ids), MeterSet(ids)
    slot = first.add(meter(1))
    second.add(meter(1))
    first.add(meter(2))
    second.discard(meter(1))
    assert first.find(meter(1)) == slot and meter(1) not in second and len(ids) == 2
    second.add(meter(3))
    first.remove(slot)
    assert ids.find(meter(1)) == -1 and meter(1) not in first  # held by none: its slot is free
    assert first.add(meter(4)) == slot  # and handed out again
    assert sorted(first.meter_ids()) == [meter(2), meter(4)] and list(second) == [meter(3)]


def test_tables_of_different_threads_share_their_ids_safely() -> None:
    """Two threads, each with its own table on the same ids, add and remove overlapping meters at once."""
    ids = MeterIds()
    tables = [MeterTable(ids=ids) for _ in range(2)]
    errors: list[BaseException] = []

    def churn(table: MeterTable, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(20_000):
                meter_id = meter(rng.randrange(3000))
                slot = table.find(meter_id)
                if slot < 0:
                    slot = table.add(meter_id)
                    assert table.meter_id(slot) == meter_id
                elif rng.random() < 0.4:
                    assert table.meter_id(slot) == meter_id
                    table.remove(slot)
        except BaseException as error:  # reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=churn, args=(table, seed)) for seed, table in enumerate(tables)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns inside a lookup, as they may in service
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    members = [set(table.meter_ids()) for table in tables]
    assert len(ids) == len(members[0] | members[1])
    for table, its_members in zip(tables, members, strict=True):
        assert all(table.meter_id(table.find(meter_id)) == meter_id for meter_id in its_members)


TIMES = ["20000101000000", "20051231235959", "20260112163900", "20260112163901", "20261206151300",
         "21321231235959", "19991231235959", "19700101000000", "21340101000000", "99991231235959"]


def test_a_meter_time_kept_in_a_table_comes_back_as_it_was_and_times_sort_as_their_codes() -> None:
    """Every meter time, also one of a clock set far wrong (before 2000, after 2132), is kept exactly."""
    table = MeterTable({"seen": METER_TIME})
    slots = [table.add(meter(number)) for number in range(len(TIMES))]
    assert [table.time("seen", slot) for slot in slots] == [None] * len(TIMES)
    for slot, meter_time in zip(slots, TIMES, strict=True):
        table.set_time("seen", slot, meter_time)
    assert [table.time("seen", slot) for slot in slots] == TIMES
    in_range = sorted(t for t in TIMES if "2000" <= t[:4] <= "2132")
    assert [time_code(t) for t in in_range] == sorted(time_code(t) for t in in_range)
    assert all(time_text(time_code(t)) == t for t in in_range)
    table.set_time("seen", slots[-1], None)
    assert table.time("seen", slots[-1]) is None


def test_a_far_time_set_aside_goes_with_its_meter_and_is_not_the_next_meters_in_that_slot() -> None:
    table = MeterTable({"seen": METER_TIME})
    slot = table.add(meter(1))
    table.add(meter(2))
    table.set_time("seen", slot, "19991231235959")
    table.remove(slot)
    assert table.add(meter(3)) == slot and table.time("seen", slot) is None
    table.set_time("seen", slot, "21500101000000")
    table.set_time("seen", slot, "20260112163900")  # back in range: nothing left aside
    assert table.time("seen", slot) == "20260112163900" and not any(table._aside.values())
    table.set_time("seen", slot, "21500101000000")
    table.clear()
    assert not any(table._aside.values())


def test_a_meter_time_column_takes_four_bytes_a_meter() -> None:
    """A 14-digit time as the number it spells needs 8 bytes; 10,000 meters with two time columns."""
    tracemalloc.start()
    try:
        table = MeterTable({"a": METER_TIME, "b": METER_TIME}, lists=1)
        before = tracemalloc.get_traced_memory()[0]
        for number in range(10_000):
            slot = table.add(meter(number))
            table.set_time("a", slot, "20260112163900")
            table.set_time("b", slot, "20260112163900")
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # ids 13, holders 1, index ~8, links 9; times 2 × 4 (2 × 8 as 64-bit numbers): about 50 bytes with room to grow
    assert kept / 10_000 < 54, kept / 10_000


def test_the_ids_keep_room_for_an_eighth_more_meters_at_most() -> None:
    """Every array of every table is as long as the ids' capacity: what it has beyond the fleet is paid per table.

    Grown by half, 100,000 meters had room for 118,342 (18 % unused); grown by an
    eighth, room for 102,908, and the proxy's tables took 11.8 MB, not 13.4.
    """
    ids = MeterIds()
    for number in range(30_000):
        ids.hold(meter(number))
        assert ids.capacity <= max(16, (number + 1) * 9 // 8 + 1), (number + 1, ids.capacity)
