"""The jobworker part of the cgroup tree: a parent group inside the delegated subtree, one child
group per job, and the operations a job's lifecycle needs (kill, freeze, events, removal)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from jobworker._dirlock import lock_directory
from jobworker.cgroup import fs
from jobworker.errors import GroupGone, HostError

_RMDIR_BACKOFF = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0)
SWEEP_ROUNDS = 32
"""Kill fallback: reads of cgroup.procs per sweep (each SIGKILLs the pids not yet signalled)."""
PARENT_MODE = 0o711
"""The manager's parent group: the daemon's user may do anything; others may pass through to
a file they know the name of, but not list the job groups."""
GROUP_MODE = 0o700
"""A job group: the daemon's user only. The job's process is placed in it by the spawner (root,
or the daemon's user) or by the forked child before it drops its credentials, so the job
itself needs no access; other accounts cannot list it or read its ``cgroup.procs`` (which pids
run which job) or its usage."""
SWEEP_RECHECK = 0.05
"""Kill fallback: how long :meth:`CgroupTree.kill_until_empty` waits for the group to empty
before sweeping again."""


class CgroupTree:
    """Owns ``<delegated>/<name>`` and the job groups below it.

    ``delegated`` is the directory of the cgroup this process was given (see
    :func:`jobworker.cgroup.discovery.own_cgroup_dir`); tests pass a group of their own.
    """

    def __init__(
        self, delegated: Path, name: str = "jobworker", *, use_cgroup_kill: bool | None = None
    ) -> None:
        """``use_cgroup_kill``: kill groups through ``cgroup.kill`` (Linux 5.14+), or, when
        ``False``, by the freeze-and-SIGKILL fallback; ``None`` (default) uses ``cgroup.kill``
        when the kernel has it."""
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid cgroup name {name!r}")
        self.delegated = delegated
        self.parent = delegated / name
        self._lock_fd = -1
        self._use_cgroup_kill = use_cgroup_kill

    def setup(self) -> None:
        """Create the parent group (or adopt a leftover one) and lock it for this process.

        The lock (flock on the directory) keeps a second manager from sharing the group: it
        would kill the first one's jobs as leftovers and remove the group from under it.
        """
        try:
            self.parent.mkdir(mode=PARENT_MODE, exist_ok=True)
            # chmod, not only mkdir's mode: the umask would narrow it, and a leftover group
            # from an older version may be wider.
            self.parent.chmod(PARENT_MODE)
        except OSError as e:
            raise HostError(f"cannot create cgroup {self.parent}: {e.strerror}") from e
        if self._use_cgroup_kill is None:  # the root group has none, but this one is no root
            self._use_cgroup_kill = (self.parent / "cgroup.kill").exists()
        self._lock_fd = lock_directory(
            self.parent,
            f"cgroup {self.parent} is in use by another jobworker manager; "
            "give each one its own cgroup name",
        )

    def teardown(self) -> None:
        """Remove the parent group if it is empty (leftover job groups keep it); unlock."""
        try:
            self.parent.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise HostError(f"cannot remove cgroup {self.parent}: {e.strerror}") from e
        finally:
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def group(self, job_id: str) -> Path:
        return self.parent / job_id

    def create(self, job_id: str) -> Path:
        """Make the job's group, mode :data:`GROUP_MODE` whatever the umask."""
        path = self.group(job_id)
        try:
            path.mkdir(mode=GROUP_MODE)
        except OSError as e:
            raise HostError(f"cannot create cgroup {path}: {e.strerror}") from e
        try:
            path.chmod(GROUP_MODE)  # mkdir's mode is narrowed by the umask, never widened
        except OSError as e:
            with contextlib.suppress(OSError):
                path.rmdir()
            raise HostError(f"cannot set the mode of cgroup {path}: {e.strerror}") from e
        return path

    def existing(self) -> list[str]:
        """Names of job groups present now (recovery after a crash)."""
        try:
            return sorted(p.name for p in self.parent.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []

    @staticmethod
    def events(group: Path) -> dict[str, int]:
        return fs.parse_flat_keyed(fs.read(group, "cgroup.events"))

    @staticmethod
    def populated(group: Path) -> bool:
        return CgroupTree.events(group).get("populated", 0) == 1

    @staticmethod
    def procs(group: Path) -> list[int]:
        return [int(p) for p in fs.read(group, "cgroup.procs").split()]

    def uses_cgroup_kill(self, group: Path) -> bool:
        """Whether :meth:`kill` writes ``cgroup.kill`` (else it runs the fallback)."""
        if self._use_cgroup_kill is None:
            self._use_cgroup_kill = (group / "cgroup.kill").exists()
        return self._use_cgroup_kill

    def kill(self, group: Path) -> None:
        """SIGKILL every process in the group and below: atomically with ``cgroup.kill``
        (Linux 5.14+), else by one bounded :meth:`sweep` (no waiting, safe on the event loop).

        A sweep cannot catch a child whose fork was under way as its parent was killed; such a
        survivor is caught by the next sweep, which :meth:`kill_until_empty` runs until the
        group is empty. Raises :class:`GroupGone` when the group no longer exists.
        """
        if self.uses_cgroup_kill(group):
            fs.write(group, "cgroup.kill", "1")
        else:
            self.sweep(group)

    @staticmethod
    def sweep(group: Path) -> bool:
        """The fallback for kernels without ``cgroup.kill``: freeze the group (so its processes
        stop forking), SIGKILL every pid in its and its descendants' ``cgroup.procs`` (a fatal
        signal ends a frozen task), read them again and kill the new ones, until a read shows
        no pid not yet signalled or :data:`SWEEP_ROUNDS` reads were made; then thaw.

        Returns whether the last read found the subtree empty. Never sleeps.
        """
        signalled: set[int] = set()
        CgroupTree.freeze(group, True)
        try:
            for _ in range(SWEEP_ROUNDS):
                pids = CgroupTree.subtree_procs(group)
                fresh = [p for p in pids if p not in signalled]
                for pid in fresh:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                signalled.update(fresh)
                if not fresh:
                    return not pids
            return False
        finally:
            CgroupTree.freeze(group, False)

    @staticmethod
    def subtree_procs(group: Path) -> list[int]:
        """The pids of the group and of every group below it (a job may make its own)."""
        pids = CgroupTree.procs(group)
        for dirpath, dirnames, _ in os.walk(group):
            for d in dirnames:
                with contextlib.suppress(GroupGone):
                    pids += CgroupTree.procs(Path(dirpath) / d)
        return pids

    async def kill_until_empty(self, group: Path, changed: Callable[[], Awaitable[None]]) -> None:
        """:meth:`kill`, then wait until the group is empty (``populated 0``). ``changed``
        waits for the next change of the group's cgroup.events (the manager passes
        ``lambda: watcher.changed(group)``). With the fallback, a group still populated after
        a change or :data:`SWEEP_RECHECK` seconds is swept again, so no survivor is left.
        """
        self.kill(group)
        while self.populated(group):
            if self.uses_cgroup_kill(group):
                await changed()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed(), SWEEP_RECHECK)
            if self.populated(group):
                self.sweep(group)

    @staticmethod
    def freeze(group: Path, frozen: bool) -> None:
        fs.write(group, "cgroup.freeze", "1" if frozen else "0")

    @staticmethod
    def try_remove(group: Path) -> bool:
        """rmdir once; ``False`` on EBUSY (tasks still leaving), ``True`` when gone."""
        try:
            group.rmdir()
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno == errno.EBUSY:
                return False
            raise HostError(f"cannot remove cgroup {group}: {e.strerror}") from e
        return True

    @staticmethod
    async def remove(group: Path) -> None:
        """rmdir, retrying while the kernel still reports the group busy.

        An emptied group can be EBUSY for a moment while exiting tasks finish leaving it.
        """
        for delay in _RMDIR_BACKOFF:
            if CgroupTree.try_remove(group):
                return
            await asyncio.sleep(delay)
        if not CgroupTree.try_remove(group):
            raise HostError(f"cgroup {group} stayed busy; it was not removed")


def open_procs(group: Path) -> int:
    """An fd on the group's cgroup.procs, for a child to write itself into before exec."""
    try:
        return os.open(group / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HostError(f"cannot open {group}/cgroup.procs: {e.strerror}") from e
