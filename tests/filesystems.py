"""A small real file system for tests that need a full disk (ENOSPC) or a read-only one."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(mount_point: Path, size: str = "256k") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``mount_point`` (created) for the block; skips the test without root."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazy: a daemon a failing test left running must not keep the mount.
        subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def fill_up(directory: Path) -> Path:
    """Write a file in ``directory`` until its file system is full (ENOSPC); the file's path."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\x00" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def remount_read_only(mount_point: Path) -> None:
    """Make a mounted tmpfs read-only (EROFS for every write)."""
    subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], check=True)
