"""The configuration watcher on a real file system: edits, renames, symlinks, re-pointed links.

Each test waits for the change notice with a deadline; what must *not* be
noticed is checked with ``check()``, which is synchronous, so no test waits
for something to not happen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import wait_for
from watchdog.observers.polling import PollingObserver

from config_watch import ConfigWatcher, directories_to_watch, file_signature, link_chain, names_that_matter


class Notices:
    """Counts ``on_change`` calls (made on the watcher's thread)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.count += 1

    def reached(self, count: int) -> bool:
        with self._lock:
            return self.count >= count


Watch = Callable[..., tuple[ConfigWatcher, Notices]]


@pytest.fixture
def watch() -> Iterator[Watch]:
    """Start watchers for a test; all are stopped at its end."""
    started: list[ConfigWatcher] = []

    def start(path: Path, **options: Any) -> tuple[ConfigWatcher, Notices]:
        notices = Notices()
        watcher = ConfigWatcher(path, notices, **options)
        assert watcher.start()
        started.append(watcher)
        return watcher, notices

    yield start
    for watcher in started:
        watcher.stop()


def repoint(link: Path, target: str) -> None:
    """``ln -sfn target link``: a new link renamed over the old one, atomically."""
    fresh = link.with_name(f".{link.name}.new")
    fresh.symlink_to(target)
    os.replace(fresh, link)


def test_link_chain_and_directories_follow_every_link(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    (tmp_path / "releases").mkdir()
    (tmp_path / "releases" / "r1.yaml").write_text("a: 1\n")
    (tmp_path / "site" / "current.yaml").symlink_to("../releases/r1.yaml")
    (tmp_path / "config.yaml").symlink_to("site/current.yaml")

    assert link_chain(tmp_path / "config.yaml") == [
        tmp_path / "config.yaml", tmp_path / "site" / "current.yaml", tmp_path / "releases" / "r1.yaml"]
    assert directories_to_watch(tmp_path / "config.yaml") == {
        str(tmp_path), str(tmp_path / "site"), str(tmp_path / "releases")}
    signature = file_signature(tmp_path / "config.yaml")
    assert signature is not None
    assert signature.links == ("site/current.yaml", "../releases/r1.yaml")
    assert signature.target == str(tmp_path / "releases" / "r1.yaml")
    assert signature.size == 5


def test_missing_file_and_link_loop_have_no_signature(tmp_path: Path) -> None:
    assert file_signature(tmp_path / "absent.yaml") is None
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    assert file_signature(tmp_path / "loop.yaml") is None
    assert directories_to_watch(tmp_path / "loop.yaml") == {str(tmp_path)}


def test_edit_in_place_and_atomic_rename_are_noticed(tmp_path: Path, watch: Watch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    _watcher, notices = watch(path)
    with path.open("r+") as file:
        file.write("a: 2\n")
    wait_for(lambda: notices.reached(1), timeout=5)
    (tmp_path / ".config.yaml.swp").write_text("a: 3\n")
    os.replace(tmp_path / ".config.yaml.swp", path)
    wait_for(lambda: notices.reached(2), timeout=5)


def test_chain_of_links_target_edit_and_repointing_are_noticed_and_the_watch_moves(
        tmp_path: Path, watch: Watch) -> None:
    for release in ("r1", "r2"):
        (tmp_path / release).mkdir()
        (tmp_path / release / "settings.yaml").write_text(f"release: {release}\n")
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "current.yaml").symlink_to("../r1/settings.yaml")
    link = tmp_path / "config.yaml"
    link.symlink_to("site/current.yaml")
    watcher, notices = watch(link)
    assert str(tmp_path / "r1") in watcher.directories

    (tmp_path / "r1" / "settings.yaml").write_text("release: r1 edited\n")
    wait_for(lambda: notices.reached(1), timeout=5)

    repoint(tmp_path / "site" / "current.yaml", "../r2/settings.yaml")  # the middle link
    wait_for(lambda: notices.reached(2), timeout=5)
    wait_for(lambda: str(tmp_path / "r2") in watcher.directories, timeout=5)
    assert str(tmp_path / "r1") not in watcher.directories

    (tmp_path / "r2" / "settings.yaml").write_text("release: r2 edited\n")
    wait_for(lambda: notices.reached(3), timeout=5)
    # The old target is no longer the configuration: editing it changes nothing.
    (tmp_path / "r1" / "settings.yaml").write_text("release: r1 edited again\n")
    assert not watcher.check()


def test_swapped_directory_link_is_noticed(tmp_path: Path, watch: Watch) -> None:
    """The Kubernetes ConfigMap layout: config.yaml -> ..data/config.yaml, ..data -> ..v1, then -> ..v2."""
    for version in ("..v1", "..v2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "config.yaml").write_text(f"version: {version}\n")
    (tmp_path / "..data").symlink_to("..v1")
    link = tmp_path / "config.yaml"
    link.symlink_to("..data/config.yaml")
    watcher, notices = watch(link)

    repoint(tmp_path / "..data", "..v2")
    wait_for(lambda: notices.reached(1), timeout=5)
    wait_for(lambda: str(tmp_path / "..v2") in watcher.directories, timeout=5)
    (tmp_path / "..v2" / "config.yaml").write_text("version: v2 edited\n")
    wait_for(lambda: notices.reached(2), timeout=5)


def test_other_files_in_the_directory_are_not_a_change(tmp_path: Path, watch: Watch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    watcher, notices = watch(path)
    (tmp_path / "other.yaml").write_text("b: 1\n")
    path.read_text()
    assert not watcher.check()
    path.write_text("a: 2\n")
    wait_for(lambda: notices.reached(1), timeout=5)
    assert not watcher.check()


def test_removed_file_is_a_change_and_so_is_its_return(tmp_path: Path, watch: Watch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    _watcher, notices = watch(path)
    path.unlink()
    wait_for(lambda: notices.reached(1), timeout=5)
    path.write_text("a: 1\n")
    wait_for(lambda: notices.reached(2), timeout=5)


class _NoInotify(PollingObserver):
    """An observer that cannot watch anything, like inotify with its watch limit reached."""

    def schedule(self, *_args: object, **_kwargs: object) -> object:
        raise OSError(28, "inotify watch limit reached")


def test_falls_back_to_polling_when_inotify_cannot_be_used(tmp_path: Path, watch: Watch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    watcher, notices = watch(path, observer_types=(_NoInotify, PollingObserver))
    assert watcher.observer_name == "PollingObserver"
    path.write_text("a: 22\n")
    wait_for(lambda: notices.reached(1), timeout=10)


def test_no_working_observer_is_reported_and_start_returns_false(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    watcher = ConfigWatcher(path, Notices(), observer_types=(_NoInotify,))
    assert not watcher.start()
    assert watcher.observer_name is None
    watcher.stop()


def write_until(path: Path, stop: threading.Event, limit: float = 10.0) -> threading.Thread:
    """Append to ``path`` every 20 ms until ``stop`` is set (or ``limit`` seconds passed)."""

    def run() -> None:
        with path.open("a") as file:
            while not stop.wait(0.02):
                file.write("x\n")
                file.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    threading.Timer(limit, stop.set).start()
    return thread


def test_a_busy_file_beside_the_configuration_neither_delays_nor_triggers_checks(
        tmp_path: Path, watch: Watch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    stop = threading.Event()
    writer = write_until(tmp_path / "daemon.log", stop)  # a log file in the same directory
    try:
        watcher, notices = watch(path)
        assert str(tmp_path / "daemon.log") not in watcher._handler.names
        path.write_text("a: 2\n")
        wait_for(lambda: notices.reached(1), timeout=3)
    finally:
        stop.set()
        writer.join()


def test_a_configuration_written_without_pause_is_still_checked_within_a_second_or_so(
        tmp_path: Path, watch: Watch) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    _watcher, notices = watch(path)
    stop = threading.Event()
    writer = write_until(path, stop)
    try:
        wait_for(lambda: notices.reached(1), timeout=3)
        assert not stop.is_set()  # noticed while the writes went on
    finally:
        stop.set()
        writer.join()


def test_names_that_matter_are_the_links_the_target_and_directory_links_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "config.yaml").write_text("a: 1\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "config.yaml").symlink_to("..data/config.yaml")
    directories = directories_to_watch(tmp_path / "config.yaml")
    assert directories == {str(tmp_path), str(tmp_path / "..v1")}
    assert names_that_matter(tmp_path / "config.yaml", directories) == {
        str(tmp_path / "config.yaml"), str(tmp_path / "..data"), str(tmp_path / "..v1"),
        str(tmp_path / "..v1" / "config.yaml")}
