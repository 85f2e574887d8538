"""RateLimitedLog: the rejections it did not log are always summarised, whatever the clock reads."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

import daemon
from daemon import (
    RateLimitedLog,
)

# Monotonic clock readings ``s`` for which ``(s + 60.0) - s < 60.0`` in floating point:
# ``s + 60`` lands in the next binade and is rounded down. A process started a few
# minutes after boot (a fresh CI machine) has its window start at such readings.
WINDOW = 60.0
ROUNDED_DOWN_STARTS = [5.1, 1000.1]


def test_the_start_values_do_round_down() -> None:
    for start in ROUNDED_DOWN_STARTS:
        assert (start + WINDOW) - start < WINDOW


def rejections_at(start: float, monkeypatch: pytest.MonkeyPatch, logger: logging.Logger) -> RateLimitedLog:
    """A RateLimitedLog whose clock stands still at ``start``."""
    monkeypatch.setattr(daemon, "time", SimpleNamespace(monotonic=lambda: start))
    return RateLimitedLog(logger, burst=1, window=WINDOW)


@pytest.mark.parametrize("start", ROUNDED_DOWN_STARTS)
def test_flush_summarises_the_suppressed_rejections_whatever_the_window_start(
        start: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.rate_limited")
    rejections = rejections_at(start, monkeypatch, logger)
    with caplog.at_level(logging.WARNING, logger="test.rate_limited"):
        rejections.warning("not_json", "rejected %d", 1)
        rejections.warning("not_json", "rejected %d", 2)
        rejections.warning("bad_time", "rejected %d", 3)
        rejections.flush()
    assert [record.getMessage() for record in caplog.records] == [
        "rejected 1",
        "2 more rejected messages not logged (bad_time 1, not_json 1)",
    ]


def test_flush_with_nothing_suppressed_logs_nothing_and_a_second_flush_repeats_nothing(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.rate_limited")
    rejections = rejections_at(1000.1, monkeypatch, logger)
    with caplog.at_level(logging.WARNING, logger="test.rate_limited"):
        rejections.flush()
        rejections.warning("not_json", "rejected %d", 1)
        rejections.warning("not_json", "rejected %d", 2)
        rejections.flush()
        rejections.flush()
    assert [record.getMessage() for record in caplog.records] == [
        "rejected 1",
        "1 more rejected messages not logged (not_json 1)",
    ]


def test_a_window_that_ends_by_the_clock_still_rolls(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr(daemon, "time", SimpleNamespace(monotonic=lambda: clock.now))
    logger = logging.getLogger("test.rate_limited")
    rejections = RateLimitedLog(logger, burst=1, window=WINDOW)
    with caplog.at_level(logging.WARNING, logger="test.rate_limited"):
        rejections.warning("not_json", "rejected %d", 1)
        rejections.warning("not_json", "rejected %d", 2)
        clock.now = 100.0 + WINDOW
        rejections.warning("not_json", "rejected %d", 3)
    assert [record.getMessage() for record in caplog.records] == [
        "rejected 1",
        "1 more rejected messages not logged (not_json 1)",
        "rejected 3",
    ]
