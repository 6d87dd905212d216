"""The facade the job manager uses for resource control: enable controllers for the jobworker
subtree, refuse limits the host cannot enforce, apply limits to a job group and read its usage.

Each controller lives in its own module (:mod:`.cpu`, :mod:`.memory`, :mod:`.io`, :mod:`.pids`)
with the same shape: ``apply(group, limits)`` writes only what was asked for, ``stats(group)``
reads its counters. Adding a controller means adding a module and a line to :func:`apply`,
:func:`read_usage` and :data:`WANTED`.
"""

from __future__ import annotations

import errno
from pathlib import Path

from jobworker.cgroup import cpu, fs, io, memory, pids
from jobworker.cgroup.devices import resolve_device
from jobworker.errors import HostError, InvalidArgument, LimitUnavailable
from jobworker.limits import Limits
from jobworker.spec import Usage

WANTED = ("cpu", "memory", "io", "pids")
"""Controllers jobworker enables for its jobs, in the order written to subtree_control."""
DAEMON_LEAF = "daemon"
"""Leaf group the daemon moves itself into when the "no internal processes" rule requires it."""

_ENABLE_ATTEMPTS = 20
"""Writes of cgroup.subtree_control tried while it reports EBUSY, each after moving the
processes that appeared (no sleep between them: see :func:`_enable_on`)."""


def _split(text: str | None) -> frozenset[str]:
    return frozenset(text.split()) if text else frozenset()


def _is_root(group: Path) -> bool:
    # Only the root cgroup lacks cgroup.type; the "no internal processes" rule spares it.
    return not (group / "cgroup.type").exists()


def _procs(group: Path) -> list[int]:
    return [int(p) for p in fs.read(group, "cgroup.procs").split()]


def _evacuate(delegated: Path) -> None:
    """Move every process of ``delegated`` (this daemon, its spawner) into ``delegated/daemon``."""
    leaf = delegated / DAEMON_LEAF
    try:
        leaf.mkdir(exist_ok=True)
    except OSError as e:
        raise HostError(f"cannot create cgroup {leaf}: {e.strerror}") from e
    for pid in _procs(delegated):
        try:
            fs.write(leaf, "cgroup.procs", str(pid))
        except HostError as e:
            # The process exited between listing and moving it.
            if not (isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ESRCH):
                raise


def _enable_on(group: Path, names: list[str], delegated: Path) -> None:
    """Write ``+name ...`` to the group's subtree_control, retrying on EBUSY.

    EBUSY means a process appeared in ``delegated`` (forked by one we moved before its move
    landed); it is moved too and the write retried at once. There is nothing to wait for: the
    kernel serialises a move against a fork, so a process forked before the move is already
    listed in cgroup.procs when the next attempt lists it. The loop never sleeps (it runs on
    the event loop, in :meth:`JobManager.open`) and is bounded by :data:`_ENABLE_ATTEMPTS`: a
    group where processes keep appearing faster than they are moved is an error, not a wait.
    """
    value = " ".join(f"+{n}" for n in names)
    for _ in range(_ENABLE_ATTEMPTS):
        try:
            fs.write(group, "cgroup.subtree_control", value)
            return
        except HostError as e:
            cause = e.__cause__
            if not (isinstance(cause, OSError) and cause.errno == errno.EBUSY):
                raise
            if group == delegated and not _is_root(delegated):
                _evacuate(delegated)
    raise HostError(
        f"cannot enable {value!r} in {group}/cgroup.subtree_control: it stayed busy through "
        f"{_ENABLE_ATTEMPTS} attempts (processes keep appearing in the group)"
    )


def enable(delegated: Path, parent: Path) -> frozenset[str]:
    """Let the job groups under ``parent`` (= ``delegated/<name>``) have cpu/memory/io/pids.

    Uses only the controllers ``delegated`` offers (``cgroup.controllers``); when there are
    none (a hybrid host, where cgroup v1 owns them) nothing is changed and the empty set is
    returned. Outside the root cgroup the processes of ``delegated`` are moved into the leaf
    ``delegated/daemon`` first, as the kernel refuses to enable controllers for the children of
    a group that holds processes. Returns the controllers the job groups will have.

    Raises :class:`HostError` when cgroupfs refuses (names the file and value).
    """
    available = _split(fs.read(delegated, "cgroup.controllers"))
    names = [n for n in WANTED if n in available]
    if not names:
        return frozenset()
    enabled = _split(fs.read(delegated, "cgroup.subtree_control"))
    if not set(names) <= enabled:
        if not _is_root(delegated) and _procs(delegated):
            _evacuate(delegated)
        _enable_on(delegated, names, delegated)
    _enable_on(parent, names, delegated)
    return frozenset(names) & _split(fs.read(parent, "cgroup.subtree_control"))


def _needed(limits: Limits) -> list[tuple[str, str]]:
    """(field, controller) for every limit that is set."""
    out: list[tuple[str, str]] = []
    if limits.cpu is not None:
        out.append(("cpu", "cpu"))
    if limits.cpu_weight is not None:
        out.append(("cpu_weight", "cpu"))
    if limits.memory is not None:
        out.append(("memory", "memory"))
    if limits.io:
        out.append(("io", "io"))
    if limits.pids is not None:
        out.append(("pids", "pids"))
    return out


def check(limits: Limits, available: frozenset[str], *, sysfs: Path = Path("/sys")) -> None:
    """Refuse, before anything is created, limits this host cannot enforce.

    Raises :class:`LimitUnavailable` naming the controller and why it is missing, and
    :class:`InvalidArgument` for an io limit on a device that does not exist.
    """
    for field, controller in _needed(limits):
        if controller in available:
            continue
        if not available:
            why = (
                "this host's cgroup v2 tree offers none of cpu/memory/io/pids to jobworker "
                "(on a hybrid host cgroup v1 owns them; a pure cgroup v2 host is needed)"
            )
        else:
            why = f"it is not delegated to jobworker (available: {', '.join(sorted(available))})"
        raise LimitUnavailable(
            f"the {field} limit needs the cgroup v2 {controller!r} controller, "
            f"which is unavailable: {why}"
        )
    for limit in limits.io:
        try:
            resolve_device(limit.device, sysfs=sysfs)
        except InvalidArgument as e:
            raise InvalidArgument(f"io: {e}") from e


def apply(group: Path, limits: Limits, *, sysfs: Path = Path("/sys")) -> None:
    """Write the limits that are set into a fresh job group (before any process joins it).

    Raises :class:`LimitUnavailable` when a controller's file is missing in the group.
    """
    cpu.apply(group, limits)
    memory.apply(group, limits)
    io.apply(group, limits, sysfs=sysfs)
    pids.apply(group, limits)


def read_usage(group: Path) -> Usage:
    """Usage figures of a job group. Files a kernel or host lacks count as zero / ``None``
    (``memory.peak`` is 5.19+; a hybrid host has only ``cpu.stat``)."""
    c = cpu.stats(group)
    m = memory.stats(group)
    i = io.stats(group)
    p = pids.stats(group)
    return Usage(
        cpu_user_usec=c.get("user_usec", 0),
        cpu_system_usec=c.get("system_usec", 0),
        memory_current=m.get("current", 0),
        memory_peak=m.get("peak"),
        io_read_bytes=i.get("rbytes", 0),
        io_write_bytes=i.get("wbytes", 0),
        nr_throttled=c.get("nr_throttled", 0),
        pids_current=p.get("current", 0),
    )


def oom_killed(group: Path) -> bool:
    """Whether the kernel OOM-killed a process of this group (its own ``oom_kill`` count)."""
    return memory.events(group).get("oom_kill", 0) > 0
