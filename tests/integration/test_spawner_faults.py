"""The spawner under faults: a fork that fails for want of processes fails that one start and
the spawner keeps serving."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest

from jobworker import ResourceExhausted
from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.cgroup.tree import CgroupTree, open_procs
from jobworker.spawn import Spawned, Spawner, describe_wait_status
from jobworker.spec import Credentials
from tests.conftest import cgroup2_usable, open_fds, wait_for


@pytest.fixture
async def tree(cgroup_name: str) -> AsyncIterator[CgroupTree]:
    """A parent group of this test's own; whatever is left in its job groups is killed."""
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    t = CgroupTree(own_cgroup_dir(), cgroup_name)
    t.setup()
    try:
        yield t
    finally:
        for name in t.existing():
            group = t.group(name)
            if t.populated(group):
                t.kill(group)
                await wait_for(partial(empty, group), what=f"{group} to empty")
            await t.remove(group)
        t.teardown()
    assert not t.parent.exists()


def empty(group: Path) -> bool:
    return not CgroupTree.populated(group)


def unused_uid() -> int:
    """A uid no process runs as, so RLIMIT_NPROC (per real uid) counts the spawner alone."""
    taken = set()
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit():
                taken.add(os.stat(f"/proc/{entry}").st_uid)
    uid = 40000 + uuid.uuid4().int % 20000
    while uid in taken:
        uid += 1
    return uid


@contextlib.contextmanager
def nproc_soft_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
    resource.setrlimit(resource.RLIMIT_NPROC, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NPROC, (soft, hard))


def other_users_python(uid: int) -> str:
    """An interpreter that ``uid`` may run (this one may live under root's 0700 home): the
    spawner script needs only the standard library."""
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and _executable_by(uid, candidate):
            return candidate
    pytest.skip(f"no python interpreter that uid {uid} may execute")


def _executable_by(uid: int, path: str) -> bool:
    """Every directory on the way searchable, and the file executable, for others."""
    real = Path(os.path.realpath(path))
    if not real.is_file() or not real.stat().st_mode & 0o001:
        return False
    return all(d.stat().st_mode & 0o001 for d in real.parents) and uid != 0


async def spawn(
    spawner: Spawner, group: Path, *argv: str, fast: bool = False, cwd: str = "/"
) -> Spawned:
    procs_fd = open_procs(group)
    out_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        path = shutil.which(argv[0]) or argv[0]
        return await spawner.spawn(
            path, argv, {"PATH": "/usr/bin:/bin"}, cwd, procs_fd, out_fd, Credentials(), fast
        )
    finally:
        os.close(procs_fd)
        os.close(out_fd)


def still_running(pid: int) -> bool:
    """Whether our child ``pid`` has not exited (it is left unreaped either way)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


async def give_home(spawner: Spawner) -> None:
    fd = open_procs(own_cgroup_dir(cgroup_path=f"/proc/{spawner.pid}/cgroup"))
    try:
        await spawner.set_home(fd)
    finally:
        os.close(fd)


# -- out of processes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast", "action"), [(False, "fork"), (True, "posix_spawn")], ids=["fork", "posix_spawn"]
)
async def test_a_fork_out_of_processes_fails_that_start_and_the_spawner_keeps_serving(
    tree: CgroupTree, fast: bool, action: str
) -> None:
    # A real EAGAIN from the kernel, without exhausting the host: the spawner runs as a uid of
    # its own (root ignores RLIMIT_NPROC) with an NPROC limit of 2, itself and one job. (The
    # jobs' cgroup.procs fds were opened by root, so it may still move them into groups.)
    uid = unused_uid()
    python = other_users_python(uid)
    fds_before = open_fds()
    with nproc_soft_limit(2):  # inherited by the spawner; root, this process, ignores it
        spawner = await Spawner.start(
            _test_options={"user": uid, "group": uid, "extra_groups": [], "executable": python}
        )
    try:
        if fast:
            await give_home(spawner)
        assert os.stat(f"/proc/{spawner.pid}").st_uid == uid
        first = tree.create("first")
        running = await spawn(spawner, first, "sleep", "1000", fast=fast)
        starved = tree.create("starved")
        with pytest.raises(ResourceExhausted) as caught:
            await spawn(spawner, starved, "/bin/true", fast=fast)
        assert str(caught.value) == (
            f"cannot start the job: {action} failed: Resource temporarily unavailable "
            "(EAGAIN: out of processes)"
        )
        assert still_running(spawner.pid)
        assert tree.procs(starved) == []
        # Room again once the first job has ended: the same spawner starts the next one.
        tree.kill(first)
        assert describe_wait_status(await running.exit_status) == (None, signal.SIGKILL)
        spawned = await spawn(spawner, tree.create("next"), "/bin/sh", "-c", "exit 7", fast=fast)
        assert describe_wait_status(await spawned.exit_status) == (7, None)
    finally:
        await spawner.close()
    assert open_fds() == fds_before
