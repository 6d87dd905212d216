"""The one gateway for cgroupfs I/O: every failure names the group, the file and the value.

A file that is not there means one of two different things, told apart by looking at the group
directory: the group itself is gone (:class:`GroupGone`: the job ended and its group was
removed) or the group exists without that file (a controller not enabled there, which is
:class:`LimitUnavailable`, or a core ``cgroup.*`` file this kernel does not have).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from jobworker.errors import GroupGone, HostError, LimitUnavailable

KERNEL_FEATURES = {
    "cgroup.freeze": "5.2",
    "cgroup.kill": "5.14",
}
"""Core interface files newer than cgroup v2 itself (4.5), with the Linux version adding them."""


def group_gone(group: Path) -> bool:
    """Whether the group directory no longer exists (checked after an ENOENT)."""
    return not os.path.isdir(group)


def _gone(group: Path, name: str, doing: str) -> GroupGone:
    return GroupGone(f"cannot {doing} {group / name}: the cgroup {group} no longer exists")


def _missing_file(group: Path, name: str) -> HostError | LimitUnavailable:
    """The error for a file absent from a group that exists."""
    if name.startswith("cgroup."):
        since = KERNEL_FEATURES.get(name)
        need = f" (it needs Linux {since} or later)" if since else ""
        return HostError(f"{group / name} does not exist: this kernel lacks {name}{need}")
    controller = name.split(".", 1)[0]
    return LimitUnavailable(
        f"cgroup controller {controller!r} is not available in {group} "
        f"(no {name}); a pure cgroup v2 host with {controller} delegated is needed"
    )


def read(group: Path, name: str) -> str:
    """Read one file. Raises :class:`GroupGone` when the group no longer exists and
    :class:`HostError` for anything else (a missing file in an existing group included)."""
    try:
        with open(group / name) as f:
            return f.read()
    except FileNotFoundError as e:
        if group_gone(group):
            raise _gone(group, name, "read") from e
        raise HostError(f"cannot read {group / name}: {e.strerror}") from e
    except OSError as e:
        raise HostError(f"cannot read {group / name}: {e.strerror}") from e


def read_optional(group: Path, name: str) -> str | None:
    """Read a file newer kernels or enabled controllers add; ``None`` when it is absent from a
    group that exists, :class:`GroupGone` when the group itself is gone."""
    try:
        with open(group / name) as f:
            return f.read()
    except FileNotFoundError as e:
        if group_gone(group):
            raise _gone(group, name, "read") from e
        return None
    except OSError as e:
        raise HostError(f"cannot read {group / name}: {e.strerror}") from e


def write(group: Path, name: str, value: str) -> None:
    """Write one value. A missing interface file in an existing group means its controller is
    not enabled here (:class:`LimitUnavailable`) or, for a core ``cgroup.*`` file, that this
    kernel lacks it (:class:`HostError` naming the version); a missing group is
    :class:`GroupGone`."""
    path = group / name
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError as e:
        if group_gone(group):
            raise _gone(group, name, f"write {value!r} to") from e
        raise _missing_file(group, name) from e
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
