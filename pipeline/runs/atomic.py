"""Atomic file writes: a reader sees the old file or the complete new one, never half of one.

Votes, checkpoints and run records are all written this way, because a job may be killed at
any moment and resume must never read a torn file. Files get the permissions the umask allows
(`tempfile.mkstemp` alone would leave them private, 0600), so a run on shared storage stays
readable by its group.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process umask, read without changing it (os.umask can only be read by setting it,
    which races with other threads)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """Permissions of a new file, as open() would give it: 0o666 less the umask."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to a temporary file beside `path`; on success fsync and rename it onto `path`,
    on any error remove it (the old `path`, if any, stays untouched)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, file_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
