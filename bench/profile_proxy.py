"""Profile the proxy's hot path in-process: where a forwarded reading's CPU time goes.

    .venv/bin/python bench/profile_proxy.py [--messages 100000] [--meters 1000] [--top 25]

Three measurements, no broker involved:

1. ``MeterDataProcessor.process`` + ``encode_payload`` (the pure mapping);
2. the proxy's whole per-message path (``Proxy.handle_raw``: the mapping,
   availability, Home Assistant discovery, the outgoing queue, the counters
   and the energy journal), fed raw messages as paho hands them over, the
   queue emptied by the benchmark between batches;
3. the per-tick work with 100,000 meters online, and with 100,000 offline
   (``MeterAvailability.went_offline``), and the device list of 10,000 meters
   (``health.device_list_max_meters``' default): built in Python, which the
   interpreter interrupts every few ms for the network threads, then encoded
   in one C call, which it does not.

The first two print the time per message and cProfile's top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from payloads import RT_DATA, LoadBuilder, bench_meter_ids  # noqa: E402

import config_loader  # noqa: E402
import kpm33b_proxy  # noqa: E402
from data_mapping import MeterDataProcessor, encode_payload  # noqa: E402
from fleet import device_list, encode_device_list  # noqa: E402
from topics import MINUTES, SECONDS  # noqa: E402


def _readings(messages: int, meters: int) -> list:
    builder = LoadBuilder(bench_meter_ids(meters))
    return builder.rounds(0, max(1, messages // (2 * meters)))[:messages]


def _report(profile: cProfile.Profile, top: int) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(profile, stream=stream)
    stats.sort_stats("tottime").print_stats(top)
    return "\n".join(line for line in stream.getvalue().splitlines() if line.strip())


def profile_mapping(readings: list, top: int) -> None:
    """The pure mapping, timed without and then with the profiler."""
    kinds = {RT_DATA: SECONDS}
    work = [(kinds.get(r.topic, MINUTES), r.payload) for r in readings]

    def run() -> int:
        processor = MeterDataProcessor()
        forwarded = 0
        for now, (kind, payload) in enumerate(work):
            outcome = processor.process(kind, payload, float(now) * 1e-3)
            if outcome.message is not None:
                encode_payload(outcome.message.payload)
                forwarded += 1
        return forwarded

    started = time.perf_counter()
    forwarded = run()
    elapsed = time.perf_counter() - started
    print(f"\n== 1. MeterDataProcessor.process + encode_payload: {len(work)} messages, {forwarded} forwarded, "
          f"{elapsed * 1e6 / len(work):.1f} µs per message (no profiler)")
    profile = cProfile.Profile()
    profile.runcall(run)
    print(_report(profile, top))


def _proxy(state_dir: Path) -> kpm33b_proxy.Proxy:
    config = config_loader.Config(
        central_broker=config_loader.BrokerSettings(host="127.0.0.1", port=1, max_queued_messages=10_000_000),
    )
    proxy = kpm33b_proxy.Proxy(config, state_dir)
    for meter_id, floor in proxy.journal.open().items():
        proxy.memory.restore_energy(meter_id, floor.energy, floor.meter_time)
    return proxy


def profile_on_message(readings: list, top: int) -> None:
    """The proxy's per-message path, as paho's on_message enters it (warm: every meter already announced)."""
    messages = [(reading.topic, reading.payload) for reading in readings]
    meters = {reading.meter_id for reading in readings}
    with tempfile.TemporaryDirectory(prefix="kpm33b-bench-profile-") as state:
        proxy = _proxy(Path(state))
        # Round 0 (each meter's first readings) brings availability and discovery: not the steady state.
        warm, rest = messages[: 2 * len(meters)], messages[2 * len(meters):]

        def run(batch: list) -> None:
            handle_raw = proxy.handle_raw
            for topic, payload in batch:
                handle_raw(topic, payload)
            proxy.outgoing.discard(lambda _item: True)

        run(warm)
        started = time.perf_counter()
        half = len(rest) // 2
        run(rest[:half])
        elapsed = time.perf_counter() - started
        print(f"\n== 2. Proxy.handle_raw (steady state, {len(meters)} meters known): {half} messages, "
              f"{elapsed * 1e6 / half:.1f} µs per message (no profiler)")
        profile = cProfile.Profile()
        profile.runcall(run, rest[half:])
        print(_report(profile, top))
        proxy.journal.close()


def profile_tick(meters: int) -> None:
    """What the 0.5 s tick costs with many meters online."""
    with tempfile.TemporaryDirectory(prefix="kpm33b-bench-profile-") as state:
        proxy = _proxy(Path(state))
        now = time.monotonic()
        for meter_id in bench_meter_ids(meters):
            proxy.availability.seen(meter_id, now)
        started = time.perf_counter()
        proxy.availability.went_offline(now + 1)
        elapsed = time.perf_counter() - started
        print(f"\n== 3. MeterAvailability.went_offline with {meters} meters online: {elapsed * 1e3:.1f} ms per "
              f"tick (every {kpm33b_proxy.TICK_SECONDS} s, holding the GIL and the availability lock)")
        later = now + 10_000
        proxy.availability.went_offline(later)  # every meter silent for longer than its limit: now offline
        started = time.perf_counter()
        proxy.availability.went_offline(later + 1)
        elapsed = time.perf_counter() - started
        print(f"   with the {meters} meters offline: {elapsed * 1e3:.1f} ms per tick")
        listed = proxy.config.health.device_list_max_meters
        known = [(meter_id, time.time(), True) for meter_id in bench_meter_ids(listed)]
        started = time.perf_counter()
        entries = device_list(known, proxy.config.meters)
        built = time.perf_counter()
        payload = encode_device_list(entries)
        encoded = time.perf_counter()
        print(f"   device list of {listed:,} meters ({len(payload):,} bytes): built in {(built - started) * 1e3:.1f} "
              f"ms, encoded in {(encoded - built) * 1e3:.1f} ms (one call: the network threads wait that long)")
        proxy.journal.close()


def main() -> int:
    """Run the three profiles."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--meters", type=int, default=1_000)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    readings = _readings(args.messages, args.meters)
    profile_mapping(readings, args.top)
    profile_on_message(readings, args.top)
    profile_tick(100_000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
