"""sd_notify.SystemdNotifier against a fake systemd notification socket."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import wait_for
from daemons import FakeSystemd

from sd_notify import SystemdNotifier


@pytest.fixture
def abstract_systemd() -> Iterator[tuple[FakeSystemd, dict[str, str]]]:
    name = f"kpm33b-test-{uuid.uuid4().hex}"
    fake = FakeSystemd(b"\0" + name.encode())
    yield fake, {"NOTIFY_SOCKET": "@" + name}
    fake.close()


def test_ready_status_and_stopping_reach_the_socket(systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, environ = systemd
    notifier = SystemdNotifier(environ)
    assert notifier.enabled
    assert notifier.ready("Forwarding 3 meters")
    assert notifier.status("Central broker away,\nqueueing")
    assert notifier.ready()
    assert notifier.stopping()

    wait_for(lambda: len(fake.received()) == 4, timeout=5)
    assert fake.received() == [
        "READY=1\nSTATUS=Forwarding 3 meters",
        "STATUS=Central broker away, queueing",
        "READY=1",
        "STOPPING=1",
    ]
    notifier.close()


def test_abstract_socket_address_is_supported(abstract_systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, environ = abstract_systemd
    notifier = SystemdNotifier(environ)
    assert notifier.ready()
    assert notifier.status("running")
    wait_for(lambda: fake.received() == ["READY=1", "STATUS=running"], timeout=5)
    notifier.close()


@pytest.mark.parametrize("fixture", ["systemd", "abstract_systemd"])
def test_watchdog_pings_at_half_the_interval_only_while_healthy(fixture: str, request: pytest.FixtureRequest) -> None:
    fake, environ = request.getfixturevalue(fixture)
    notifier = SystemdNotifier({**environ, "WATCHDOG_USEC": "200000"})
    assert notifier.watchdog_interval() == pytest.approx(0.1)

    healthy = threading.Event()
    healthy.set()
    checks = {"healthy": 0, "unhealthy": 0}

    def is_healthy() -> bool:
        result = healthy.is_set()
        checks["healthy" if result else "unhealthy"] += 1
        return result

    started = time.monotonic()
    thread = notifier.start_watchdog(is_healthy)
    assert thread is not None and thread.daemon
    wait_for(lambda: len(fake.times_of("WATCHDOG=1")) >= 5, timeout=5)
    pings = fake.times_of("WATCHDOG=1")
    # The first ping at once, then one every 0.1 s: never faster, and (on a
    # loaded CI machine) not much slower either.
    assert pings[0] - started < 0.1
    gaps = [later - earlier for earlier, later in itertools.pairwise(pings)]
    assert min(gaps) >= 0.05, gaps
    assert sum(gaps) / len(gaps) < 0.2, gaps

    healthy.clear()
    wait_for(lambda: checks["unhealthy"] >= 3, timeout=5)
    notifier.stop_watchdog()
    assert not thread.is_alive()
    # Exactly one ping per passing check, none for the failing ones.
    wait_for(lambda: len(fake.times_of("WATCHDOG=1")) >= checks["healthy"], timeout=2)
    assert len(fake.times_of("WATCHDOG=1")) == checks["healthy"]
    notifier.close()


def test_watchdog_resumes_when_the_check_passes_again(systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, environ = systemd
    notifier = SystemdNotifier({**environ, "WATCHDOG_USEC": "200000"})
    answers = iter([False, False, True])
    notifier.start_watchdog(lambda: next(answers, True))
    wait_for(lambda: len(fake.times_of("WATCHDOG=1")) >= 2, timeout=5)
    notifier.close()


def test_failing_health_check_counts_as_unhealthy(systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    fake, environ = systemd
    notifier = SystemdNotifier({**environ, "WATCHDOG_USEC": "200000"})
    calls: list[int] = []

    def broken() -> bool:
        calls.append(1)
        raise RuntimeError("network loop state unavailable")

    notifier.start_watchdog(broken)
    wait_for(lambda: len(calls) >= 3, timeout=5)
    notifier.close()
    assert fake.times_of("WATCHDOG=1") == []


def test_watchdog_of_another_process_is_ignored(systemd: tuple[FakeSystemd, dict[str, str]]) -> None:
    _, environ = systemd
    mine = SystemdNotifier({**environ, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4242"}, pid=4242)
    assert mine.watchdog_interval() == pytest.approx(0.1)
    other = SystemdNotifier({**environ, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "4243"}, pid=4242)
    assert other.watchdog_interval() is None
    assert other.start_watchdog(lambda: True) is None


@pytest.mark.parametrize("usec", ["", "0", "-5", "soon"])
def test_no_watchdog_without_a_valid_interval(systemd: tuple[FakeSystemd, dict[str, str]], usec: str) -> None:
    _, environ = systemd
    notifier = SystemdNotifier({**environ, "WATCHDOG_USEC": usec})
    assert notifier.watchdog_interval() is None
    assert notifier.start_watchdog(lambda: True) is None


def test_nothing_happens_without_notify_socket(
    systemd: tuple[FakeSystemd, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, environ = systemd
    # The process environment is not consulted: only the mapping handed in.
    monkeypatch.setenv("NOTIFY_SOCKET", environ["NOTIFY_SOCKET"])
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    notifier = SystemdNotifier({"WATCHDOG_USEC": "200000"})
    assert not notifier.enabled
    assert notifier.ready("up") is False
    assert notifier.status("up") is False
    assert notifier.stopping() is False
    assert notifier.watchdog() is False
    assert notifier.watchdog_interval() is None
    assert notifier.start_watchdog(lambda: True) is None
    notifier.close()
    # A control message proves the fake socket works, and that nothing came before it.
    assert SystemdNotifier(environ).status("control")
    wait_for(lambda: fake.received() == ["STATUS=control"], timeout=5)


def test_send_errors_never_raise(socket_dir: Path) -> None:
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(socket_dir / "missing"), "WATCHDOG_USEC": "200000"})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False
    thread = notifier.start_watchdog(lambda: True)
    assert thread is not None
    notifier.close()
    assert not thread.is_alive()
