"""The jobworker part of the cgroup tree: a parent group inside the delegated subtree, one child
group per job, and the operations a job's lifecycle needs (kill, freeze, events, removal)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from jobworker._dirlock import lock_directory
from jobworker.cgroup import fs
from jobworker.errors import HostError

_RMDIR_BACKOFF = (0.001, 0.005, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0)


class CgroupTree:
    """Owns ``<delegated>/<name>`` and the job groups below it.

    ``delegated`` is the directory of the cgroup this process was given (see
    :func:`jobworker.cgroup.discovery.own_cgroup_dir`); tests pass a group of their own.
    """

    def __init__(self, delegated: Path, name: str = "jobworker") -> None:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"invalid cgroup name {name!r}")
        self.delegated = delegated
        self.parent = delegated / name
        self._lock_fd = -1

    def setup(self) -> None:
        """Create the parent group (or adopt a leftover one) and lock it for this process.

        The lock (flock on the directory) keeps a second manager from sharing the group: it
        would kill the first one's jobs as leftovers and remove the group from under it.
        """
        try:
            self.parent.mkdir(exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create cgroup {self.parent}: {e.strerror}") from e
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
        path = self.group(job_id)
        try:
            path.mkdir()
        except OSError as e:
            raise HostError(f"cannot create cgroup {path}: {e.strerror}") from e
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

    @staticmethod
    def kill(group: Path) -> None:
        """SIGKILL every process in the group and below, atomically (Linux 5.14+)."""
        fs.write(group, "cgroup.kill", "1")

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
