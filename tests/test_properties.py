"""Property tests of data_mapping: whatever arrives on the internal broker, what goes out is clean."""

from __future__ import annotations

import itertools
import json
import math
import re
import string
from datetime import datetime

from hypothesis import example, given, settings
from hypothesis import strategies as st

from data_mapping import (
    DROP_ENERGY_DECREASE,
    EVENT_RESET,
    PER_PHASE_FIELDS,
    PER_PHASE_GROUPS,
    REJECTIONS,
    VALUE_TAGS,
    MeterDataProcessor,
    MeterMemory,
    Outcome,
    PacketAssembler,
    encode_payload,
    parse_packet,
)
from kpm33b_proxy import Outgoing, pack_outgoing, unpack_outgoing
from topics import MINUTES, SECONDS, reading_topic

CLEAN_TOPIC = re.compile(r"kpm33b/[0-9A-Za-z]{13}/(seconds|minutes)")
METER_ID = re.compile(r"[0-9A-Za-z]{13}")
ISO_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}")
DROP_REASONS = {*REJECTIONS, "excluded", "duplicate", "all_zero", "energy_decrease", "implausible_rise"}
FAST = settings(max_examples=200, deadline=None)
PER_PHASE = {"33B1225950027": PER_PHASE_GROUPS, "33B1225950028": ("current",)}

# --- strategies ---------------------------------------------------------------------

valid_meter_ids = st.text(alphabet=string.ascii_letters + string.digits, min_size=13, max_size=13)
meter_ids = st.one_of(
    st.sampled_from(["33B1225950027", "33B1225950028", "33B12259500/7", "33B122595002+", "33B122595002#",
                     "33B122595002", "33B12259500270", ""]),
    valid_meter_ids,
    st.text(max_size=16),
)
valid_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)).map(
    lambda moment: moment.strftime("%Y%m%d%H%M%S"))
times = st.one_of(valid_times, st.sampled_from(["20261399000000", "20260230120000", "2026011216390", ""]),
                  st.text(alphabet=string.digits, min_size=14, max_size=14), st.text(max_size=16))
keys = st.one_of(st.sampled_from(["id", "time", "isend", "zyggl", "zygsz", "ua", "fygsz"]), st.text(max_size=8))
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(),
    st.integers(min_value=2 * 10**308, max_value=10**400),  # valid JSON, beyond any float
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=10))
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(keys, children, max_size=4)),
    max_leaves=15,
)
arbitrary_documents = st.one_of(json_values, st.dictionaries(keys, json_values, max_size=6))
# Documents shaped like readings, so that many get past validation into the filters.
meter_like_documents = st.builds(
    lambda envelope, values: {**values, **envelope},
    st.fixed_dictionaries({}, optional={
        "id": st.one_of(meter_ids, json_values),
        "time": st.one_of(times, json_values),
        "isend": st.one_of(st.sampled_from(["0", "1", "1", "2", 1, None]), json_values),
    }),
    st.dictionaries(st.sampled_from(["zyggl", "zygsz", "ua", "ia", "pfa", "zglys", "fygsz", "zwgsz"]),
                    st.one_of(numbers, st.just(0.0), json_values), max_size=4),
)


def encode(document: object) -> bytes:
    """JSON text as a careless or hostile client might send it: NaN and Infinity literals included."""
    return json.dumps(document, allow_nan=True).encode()


payloads = st.one_of(
    st.binary(max_size=200),
    arbitrary_documents.map(encode),
    meter_like_documents.map(encode),
)


def _no_constants(name: str) -> object:
    raise ValueError(name)


def assert_clean(outcome: Outcome, processor: MeterDataProcessor) -> None:
    """What comes out is a clean message with a safe topic, or a known drop reason, or a held part.

    The same for every held reading the packet settled.
    """
    for settled in outcome.settled:
        assert (settled.message is None) != (settled.reason is None)
        if settled.message is None:
            assert settled.reason in DROP_REASONS
        else:
            assert_clean(Outcome(message=settled.message, meter_id=settled.message.meter_id), processor)
    if outcome.message is None:
        assert outcome.reason is None or outcome.reason in DROP_REASONS
        if outcome.meter_id is not None:
            assert METER_ID.fullmatch(outcome.meter_id)
        return
    message = outcome.message
    assert outcome.reason is None
    assert METER_ID.fullmatch(message.meter_id)
    assert CLEAN_TOPIC.fullmatch(reading_topic("kpm33b", message.meter_id, message.kind))
    value_name = VALUE_TAGS[message.kind][1]
    groups = processor.per_phase.get(message.meter_id, ()) if message.kind == SECONDS else ()
    per_phase_names = {name for group in groups for _tag, name in PER_PHASE_FIELDS[group]}
    assert set(message.payload) == {"id", "time", value_name} | per_phase_names
    assert message.payload["id"] == message.meter_id
    iso = message.payload["time"]
    assert isinstance(iso, str) and ISO_TIME.fullmatch(iso)
    assert datetime.fromisoformat(iso).strftime("%Y%m%d%H%M%S") == message.time
    for name, value in message.payload.items():
        if name in ("id", "time"):
            continue
        assert value is None or (
            isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        )
    # What is published is strict JSON that reads back to the same payload.
    assert json.loads(encode_payload(message.payload), parse_constant=_no_constants) == message.payload


# --- properties ----------------------------------------------------------------------


@FAST
@given(st.sampled_from((SECONDS, MINUTES)), st.binary(max_size=300))
def test_process_never_raises_on_arbitrary_bytes(kind: str, payload: bytes) -> None:
    processor = MeterDataProcessor()

    assert_clean(processor.process(kind, payload, 0.0), processor)


@FAST
@given(st.sampled_from((SECONDS, MINUTES)), st.one_of(arbitrary_documents, meter_like_documents))
@example("seconds", {"id": "33B1225950027", "time": "20260112163900", "zyggl": 10**400})
@example("minutes", {"id": "33B1225950027", "time": "20260112163900", "zygsz": float("nan")})
@example("minutes", {"id": "33B1225950027", "time": "20260112163900", "zygsz": [[[[1.0]]]]})
def test_process_never_raises_on_arbitrary_json(kind: str, document: object) -> None:
    processor = MeterDataProcessor()

    assert_clean(processor.process(kind, encode(document), 0.0), processor)


@FAST
@given(st.lists(st.tuples(st.sampled_from((SECONDS, MINUTES)), payloads), max_size=8))
def test_a_stream_of_arbitrary_payloads_only_ever_gives_clean_messages(stream: list[tuple[str, bytes]]) -> None:
    processor = MeterDataProcessor(per_phase=PER_PHASE)

    for now, (kind, payload) in enumerate(stream):
        assert_clean(processor.process(kind, payload, float(now)), processor)
    assert all(reason in DROP_REASONS | {"part_expired", "part_overflow"} for reason in processor.drops)


@FAST
@given(st.lists(st.tuples(st.sampled_from((SECONDS, MINUTES)), meter_like_documents.map(encode)), max_size=8))
def test_a_stream_of_meter_like_payloads_only_ever_gives_clean_messages(stream: list[tuple[str, bytes]]) -> None:
    processor = MeterDataProcessor(per_phase=PER_PHASE)

    for now, (kind, payload) in enumerate(stream):
        assert_clean(processor.process(kind, payload, float(now)), processor)


energies = st.one_of(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.just(0.0),
                     st.integers(min_value=0, max_value=10**6))
readings = st.tuples(
    st.sampled_from(["20260112170000", "20260112171500", "20260112173000", "20260112174500", "20260112180000"]),
    st.sampled_from(["0", "1", "1", "1"]),
    st.one_of(energies, st.none()),  # None: the zygsz tag missing
    st.sampled_from([0.0, 0.011]),  # another register, zero or not
)


@FAST
@given(st.one_of(st.none(), energies), st.lists(readings, max_size=30))
def test_forwarded_energy_of_a_meter_never_decreases(
    restored: float | None, stream: list[tuple[str, str, float | None, float]],
) -> None:
    # Forwarded energy falls only where the guard accepted a counter reset, and then to the new count.
    memory = MeterMemory()
    if restored is not None:
        memory.restore_energy("33B1225950027", restored)
    processor = MeterDataProcessor(memory=memory)
    forwarded: list[float] = [] if restored is None else [restored]
    resets: list[float] = []

    for now, (meter_time, isend, energy, reactive) in enumerate(stream):
        document: dict[str, object] = {"id": "33B1225950027", "time": meter_time, "isend": isend, "zwgsz": reactive}
        if energy is not None:
            document["zygsz"] = energy
        outcome = processor.process(MINUTES, json.dumps(document).encode(), float(now))
        resets.extend(event.new for event in outcome.events if event.kind == EVENT_RESET)
        messages = [settled.message for settled in outcome.settled if settled.message is not None]
        for message in [*messages, outcome.message]:
            if message is not None and message.payload["active_energy"] is not None:
                forwarded.append(message.payload["active_energy"])  # type: ignore[arg-type]

    falls = [after for before, after in itertools.pairwise(forwarded) if after < before]
    assert falls == resets


@FAST
@given(
    st.integers(min_value=1, max_value=8),
    st.lists(
        st.tuples(
            st.sampled_from((SECONDS, MINUTES)),
            st.sampled_from(["33B1225950027", "33B1225950028", "33B1225950029", "33B1225950030"]),
            st.sampled_from(["20260112170000", "20260112171500", "20260112173000", "20050113170000"]),
            st.sampled_from(["0", "0", "0", "1"]),
            st.floats(min_value=0, max_value=200, allow_nan=False),
        ),
        max_size=60,
    ),
)
def test_assembler_never_holds_more_than_max_pending(
    max_pending: int, packets: list[tuple[str, str, str, str, float]],
) -> None:
    assembler = PacketAssembler(max_pending=max_pending, max_age=30.0)

    for now, (kind, meter_id, meter_time, isend, value) in enumerate(packets):
        packet = parse_packet(json.dumps({"id": meter_id, "time": meter_time, "isend": isend, "zygsz": value}).encode())
        merged, drops = assembler.add(kind, packet, float(now))
        assert len(assembler) <= max_pending
        assert set(drops) <= {"part_expired", "part_overflow"}
        assert merged is None or merged.keys() <= {"zygsz"}


@FAST
@given(st.lists(st.tuples(st.sampled_from((SECONDS, MINUTES)), meter_like_documents.map(encode)), max_size=20))
def test_processor_pending_parts_stay_within_their_bound(stream: list[tuple[str, bytes]]) -> None:
    processor = MeterDataProcessor()
    processor.assembler.max_pending = 3

    for now, (kind, payload) in enumerate(stream):
        processor.process(kind, payload, float(now))
        assert len(processor.assembler) <= 3


@FAST
@given(st.lists(st.tuples(st.sampled_from(["20260112170000", "20260112171500"]),
                          st.floats(min_value=0, max_value=100, allow_nan=False)), max_size=20))
def test_energy_decrease_drops_are_counted_once_each(stream: list[tuple[str, float]]) -> None:
    processor = MeterDataProcessor()
    decreases = 0

    for now, (meter_time, energy) in enumerate(stream):
        payload = json.dumps({"id": "33B1225950027", "time": meter_time, "zygsz": energy, "zwgsz": 1.0}).encode()
        outcome = processor.process(MINUTES, payload, float(now))
        decreases += outcome.reason == DROP_ENERGY_DECREASE
        decreases += sum(settled.reason == DROP_ENERGY_DECREASE for settled in outcome.settled)

    assert processor.drops[DROP_ENERGY_DECREASE] == decreases


meter_ids = st.text(alphabet=string.ascii_uppercase + string.digits, min_size=13, max_size=13)
outgoing_messages = st.builds(
    Outgoing, st.text(max_size=300), st.binary(max_size=2000), st.booleans(), st.integers(0, 65_535),
    st.booleans(), st.one_of(st.none(), st.tuples(meter_ids, st.floats(allow_nan=False),
                                                  st.text(alphabet=string.digits, min_size=14, max_size=14))))


@given(outgoing_messages)
def test_a_queued_message_is_unpacked_as_it_was_packed(message: Outgoing) -> None:
    packed = pack_outgoing(message)
    assert isinstance(packed, bytes)
    assert unpack_outgoing(packed) == message
