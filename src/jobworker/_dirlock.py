"""An exclusive lock on a directory, held for a process's life by an open fd (flock)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from jobworker.errors import HostError


def lock_directory(path: Path, in_use: str) -> int:
    """Open ``path`` and flock it; the fd holds the lock until closed. Raises
    :class:`HostError` with ``in_use`` when another process holds it, or naming the OS error."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise HostError(f"cannot open {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HostError(in_use) from None
    return fd
