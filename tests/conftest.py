"""Shared pytest fixtures: real brokers on free ports, a fake systemd, and nothing a test started outlives it."""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from broker import Mosquitto  # noqa: E402
from daemons import FakeSystemd, ProxyStandIn, config_dict, stop_leftovers, write_config  # noqa: E402

from config_loader import load_config  # noqa: E402
from config_sender import ConfigSender  # noqa: E402


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


@pytest.fixture
def central(central_broker: Mosquitto) -> Iterator[ProxyStandIn]:
    """Stands in for the proxy on the central broker: marks meters online, as the config sender discovers them."""
    stand_in = ProxyStandIn(central_broker.port)
    yield stand_in
    stand_in.close()


@pytest.fixture
def start_sender(internal_broker: Mosquitto, central_broker: Mosquitto, tmp_path: Path,
                 caplog: pytest.LogCaptureFixture,
                 request: pytest.FixtureRequest) -> Iterator[Callable[..., ConfigSender]]:
    """Start in-process config senders on the test brokers; all stopped at the end of the test.

    ``sections`` and ``meters`` (the meters section's keys) write a new configuration; without them the
    configuration already in ``tmp_path`` is used (a test may have edited it).
    """
    caplog.set_level(logging.DEBUG, logger="config_sender")
    started: list[ConfigSender] = []
    prefix = request.node.module.__name__.removeprefix("test_").replace("_", "-")

    def start(retry_delays: tuple[float, ...] = (10.0, 60.0, 300.0), sections: dict[str, Any] | None = None,
              **meters: Any) -> ConfigSender:
        path = tmp_path / "config.yaml"
        if meters or sections or not path.exists():
            write_config(tmp_path, config_dict(internal_broker.port, central_broker.port, sections=sections,
                                               **meters))
        sender = ConfigSender(load_config(path, {}), path, environ={}, retry_delays=retry_delays,
                              client_id_prefix=f"test-{prefix}-{len(started)}")
        sender.start()
        started.append(sender)
        assert sender.wait_ready(10), "sender did not connect and subscribe to both brokers"
        return sender

    yield start
    for sender in started:
        sender.stop()
