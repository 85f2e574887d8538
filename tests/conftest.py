"""Shared pytest fixtures: real brokers on free ports, paths to the captures."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from broker import Mosquitto  # noqa: E402
from daemons import DaemonProcess  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture
def internal_broker() -> Iterator[Mosquitto]:
    """An internal (meter-side) broker for one test."""
    broker = Mosquitto().start()
    yield broker
    broker.cleanup()


@pytest.fixture
def central_broker() -> Iterator[Mosquitto]:
    """A central (consumer-side) broker for one test."""
    broker = Mosquitto().start()
    yield broker
    broker.cleanup()


@pytest.fixture(autouse=True)
def kill_leftover_daemons() -> Iterator[None]:
    """Whatever a test did, no daemon it started outlives it."""
    yield
    while DaemonProcess.started:
        daemon = DaemonProcess.started.pop()
        if daemon.alive():
            daemon.kill()


@pytest.fixture
def cleanup() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Register a clean-up step; they run in reverse order, even when the test fails."""
    steps: list[Callable[[], object]] = []
    yield steps.append
    for step in reversed(steps):
        try:
            step()
        except Exception as error:  # the other steps must still run
            print(f"clean-up step failed: {error!r}")
