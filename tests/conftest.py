"""Shared pytest fixtures: real brokers on free ports, a fake systemd, and nothing a test started outlives it."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from broker import Mosquitto  # noqa: E402
from daemons import FakeSystemd, stop_leftovers  # noqa: E402


@pytest.fixture
def internal_broker() -> Iterator[Mosquitto]:
    """An internal (meter-side) broker for one test."""
    broker = Mosquitto().start()
    yield broker
    stop_leftovers()  # before the broker goes: a client of a broker that is gone waits in vain
    broker.cleanup()


@pytest.fixture
def central_broker() -> Iterator[Mosquitto]:
    """A central (consumer-side) broker for one test."""
    broker = Mosquitto().start()
    yield broker
    stop_leftovers()  # before the broker goes: a client of a broker that is gone waits in vain
    broker.cleanup()


@pytest.fixture(autouse=True)
def nothing_outlives_the_test() -> Iterator[None]:
    """Whatever a test did, no daemon, simulated meter or MQTT client it started outlives it."""
    yield
    stop_leftovers()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX socket paths are limited to 107 bytes."""
    directory = Path(tempfile.mkdtemp(prefix="sdn-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def systemd(socket_dir: Path) -> Iterator[tuple[FakeSystemd, dict[str, str]]]:
    """A fake systemd notification socket, and the environment that points a service to it."""
    path = str(socket_dir / "notify")
    fake = FakeSystemd(path)
    yield fake, {"NOTIFY_SOCKET": path}
    fake.close()


@pytest.fixture
def cleanup() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Register a clean-up step; they run in reverse order, even when the test fails."""
    steps: list[Callable[[], object]] = []
    yield steps.append
    stop_leftovers()  # the steps may stop brokers: nothing of the test may still use them
    for step in reversed(steps):
        try:
            step()
        except Exception as error:  # the other steps must still run
            print(f"clean-up step failed: {error!r}")
