"""Block devices on the host, as the io controller names them: the whole disk's ``MAJ:MIN``."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from jobworker.errors import InvalidArgument
from jobworker.limits import Limits

_MAJMIN_RE = re.compile(r"(\d+):(\d+)")


def resolve_limits(limits: Limits, *, sysfs: Path = Path("/sys")) -> Limits:
    """The same limits with every io device as its whole disk's ``MAJ:MIN``."""
    if not limits.io:
        return limits
    return replace(
        limits,
        io=tuple(replace(i, device=resolve_device(i.device, sysfs=sysfs)) for i in limits.io),
    )


def resolve_device(
    device: str,
    *,
    sysfs: Path = Path("/sys"),
    device_number: Callable[[str], tuple[int, int]] | None = None,
) -> str:
    """``MAJ:MIN`` of the whole disk for a block device path or ``MAJ:MIN``.

    A partition resolves to its disk (io.max only takes whole disks): the kernel's
    ``/sys/dev/block/MAJ:MIN`` of a partition has a ``partition`` file and lives in its disk's
    directory. ``device_number`` maps a path to (major, minor); the default stats it.
    Raises :class:`InvalidArgument` for a path that is not a block device or an unknown number.
    """
    m = _MAJMIN_RE.fullmatch(device.strip())
    if m is not None:
        major, minor = int(m.group(1)), int(m.group(2))
    elif device.startswith("/"):
        major, minor = (device_number or _device_number)(device)
    else:
        raise InvalidArgument(
            f"io device {device!r} must be a block device path (/dev/...) or MAJ:MIN"
        )
    node = sysfs / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        shown = device if m is not None else f"{device} ({major}:{minor})"
        raise InvalidArgument(f"io device {shown} is not a known block device (no {node})")
    if (node / "partition").exists():
        disk = node.resolve().parent
        try:
            text = (disk / "dev").read_text().strip()
        except OSError as e:
            raise InvalidArgument(
                f"io device {device!r} is a partition whose disk cannot be found ({disk}/dev)"
            ) from e
        if _MAJMIN_RE.fullmatch(text) is None:
            raise InvalidArgument(f"io device {device!r}: unexpected {disk}/dev content {text!r}")
        return text
    return f"{major}:{minor}"


def _device_number(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidArgument(f"io device {path!r}: {e.strerror}") from e
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgument(f"io device {path!r} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)
