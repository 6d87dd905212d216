"""Find where this process may create cgroups: pure parsers over ``/proc/self/mountinfo`` and
``/proc/self/cgroup`` text, plus one function that reads the real files.

Never assumes ``/sys/fs/cgroup``: on hybrid hosts the v2 tree is e.g. ``/sys/fs/cgroup/unified``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from jobworker.errors import HostError


@dataclass(frozen=True, slots=True)
class Mount:
    root: str
    """The path inside the cgroup filesystem that is mounted (``/`` unless bind/namespaced)."""
    mount_point: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_cgroup2_mounts(mountinfo: str) -> list[Mount]:
    """All cgroup2 mounts in mountinfo text, in order (see proc(5))."""
    mounts: list[Mount] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fstype = right.split(" ", 1)[0]
        if fstype != "cgroup2":
            continue
        fields = left.split(" ")
        if len(fields) < 5:
            continue
        mounts.append(Mount(root=_unescape(fields[3]), mount_point=_unescape(fields[4])))
    return mounts


def parse_own_cgroup(proc_self_cgroup: str) -> str:
    """The unified (v2) hierarchy path of this process: the ``0::PATH`` line."""
    for line in proc_self_cgroup.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            # A process whose group was removed shows " (deleted)" after the path.
            return path.removesuffix(" (deleted)")
    raise HostError("no cgroup v2 entry (0::) in /proc/self/cgroup: is cgroup2 mounted?")


def resolve_own_group(mounts: list[Mount], own: str) -> Path:
    """The directory of this process's own cgroup, through a mount that contains it."""
    own_path = PurePosixPath(own)
    for mount in mounts:
        root = PurePosixPath(mount.root)
        if own_path == root or root in own_path.parents:
            return Path(mount.mount_point) / own_path.relative_to(root)
    raise HostError(
        f"this process's cgroup {own!r} is not visible through any cgroup2 mount "
        f"({[m.mount_point for m in mounts] or 'none found'})"
    )


def own_cgroup_dir(
    mountinfo_path: str = "/proc/self/mountinfo", cgroup_path: str = "/proc/self/cgroup"
) -> Path:
    """Directory of the cgroup this process lives in: the subtree it was delegated."""
    try:
        with open(mountinfo_path) as f:
            mountinfo = f.read()
        with open(cgroup_path) as f:
            own = f.read()
    except OSError as e:
        raise HostError(f"cannot read {e.filename}: {e.strerror}") from e
    return resolve_own_group(parse_cgroup2_mounts(mountinfo), parse_own_cgroup(own))
