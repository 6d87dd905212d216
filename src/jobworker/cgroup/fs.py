"""The one gateway for cgroupfs I/O: every failure names the group, the file and the value."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from jobworker.errors import HostError, LimitUnavailable


def read(group: Path, name: str) -> str:
    try:
        with open(group / name) as f:
            return f.read()
    except OSError as e:
        raise HostError(f"cannot read {group / name}: {e.strerror}") from e


def read_optional(group: Path, name: str) -> str | None:
    """Read a file newer kernels or enabled controllers add; ``None`` when it is absent."""
    try:
        with open(group / name) as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostError(f"cannot read {group / name}: {e.strerror}") from e


def write(group: Path, name: str, value: str) -> None:
    """Write one value. A missing interface file means its controller is not enabled here."""
    path = group / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        controller = name.split(".", 1)[0]
        raise LimitUnavailable(
            f"cgroup controller {controller!r} is not available in {group} "
            f"(no {name}); a pure cgroup v2 host with {controller} delegated is needed"
        ) from e
    except OSError as e:
        raise HostError(f"cannot open {path} to write {value!r}: {e.strerror}") from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise HostError(f"cannot write {value!r} to {path}: {e.strerror}") from e
    finally:
        os.close(fd)


def parse_flat_keyed(text: str) -> dict[str, int]:
    """Parse ``key value`` lines (cgroup.events, memory.events, cpu.stat, pids.events)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key and value:
            try:
                out[key] = int(value)
            except ValueError:
                continue
    return out


def is_busy(e: OSError) -> bool:
    return e.errno == errno.EBUSY
