"""The spawner under faults: a fork that fails for want of processes fails that one start and
the spawner keeps serving; signals to the daemon's process group do not reach it; its death
fails what is in flight with :class:`SpawnerDied` (promptly) and leaves its jobs running."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path

import pytest

from jobworker import JobManager, ResourceExhausted
from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.cgroup.tree import CgroupTree, open_procs
from jobworker.spawn import Spawned, Spawner, SpawnerDied, describe_wait_status
from jobworker.spec import Credentials
from tests.conftest import cgroup2_usable, open_fds, wait_for

PR_SET_CHILD_SUBREAPER = 36


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


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make this process the subreaper of the spawner's orphans (for the test's length), so a
    test can see where a dead spawner's jobs went and reap them itself."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def empty(group: Path) -> bool:
    return not CgroupTree.populated(group)


def unused_uid() -> int:
    """A uid no task has as its real, effective, saved or filesystem uid, so RLIMIT_NPROC
    (which counts the tasks, threads included, of a real uid) counts the spawner's alone."""
    taken: set[int] = set()
    for status in Path("/proc").glob("[0-9]*/task/[0-9]*/status"):
        with contextlib.suppress(OSError):
            for line in status.read_text().splitlines():
                if line.startswith("Uid:"):
                    taken.update(int(u) for u in line.split()[1:])
    uid = 40000 + uuid.uuid4().int % 20000
    while uid in taken:
        uid += 1
    return uid


# Becomes the spawner's process: drops to the uid under the NPROC limit, then execs the
# spawner's interpreter with the spawner's own arguments (the shebang's path stands in for
# argv[0]). Root, and not Popen(user=...) in this process, does the switch, because Popen
# forks (not vforks) for user=, and in the child of a fork of this process, once gRPC has
# run in it (the in-process daemon tests), gRPC's fork handler restarts its thread pool;
# setreuid() then moves every one of those threads to the uid, and execve() fails with
# EAGAIN for the spawner itself, over the limit before its first job. Nor is the limit set
# in this process, whose other threads (gRPC's) would hand it to whatever they start.
LAUNCHER = """#!{launcher_python} -IS
import os, resource, sys
uid, limit, python = {uid!r}, {limit!r}, {python!r}
resource.setrlimit(resource.RLIMIT_NPROC, (limit, resource.getrlimit(resource.RLIMIT_NPROC)[1]))
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.execv(python, [python, *sys.argv[1:]])
"""


def nproc_limited_launcher(directory: Path, uid: int, limit: int, python: str) -> Path:
    """An executable that runs the spawner's command line as ``uid`` (and its group, with no
    others) with a soft RLIMIT_NPROC of ``limit``, from a fresh single-threaded process."""
    path = directory / "as-uid-with-nproc-limit"
    path.write_text(
        LAUNCHER.format(launcher_python=sys.executable, uid=uid, limit=limit, python=python)
    )
    path.chmod(0o700)
    return path


def argv_of(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [os.fsdecode(arg) for arg in f.read().split(b"\0")[:-1]] or [""]


def real_uid_and_nproc_soft_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
    with open(f"/proc/{pid}/limits") as f:
        limit = next(int(line.split()[2]) for line in f if line.startswith("Max processes"))
    return uid, limit


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
            path,
            argv,
            {"PATH": "/usr/bin:/bin"},
            cwd,
            procs_fd,
            out_fd,
            out_fd,
            Credentials(),
            fast,
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


def proc_state(pid: int) -> tuple[str, int]:
    """(state letter, parent pid) from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


# -- out of processes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast", "action"), [(False, "fork"), (True, "posix_spawn")], ids=["fork", "posix_spawn"]
)
async def test_a_fork_out_of_processes_fails_that_start_and_the_spawner_keeps_serving(
    tree: CgroupTree, tmp_path: Path, fast: bool, action: str
) -> None:
    # A real EAGAIN from the kernel, without exhausting the host: the spawner runs as a uid of
    # its own (root ignores RLIMIT_NPROC) with an NPROC limit of 2, itself and one job. (The
    # jobs' cgroup.procs fds were opened by root, so it may still move them into groups.)
    uid = unused_uid()
    python = other_users_python(uid)
    launcher = nproc_limited_launcher(tmp_path, uid, 2, python)
    fds_before = open_fds()
    spawner = await Spawner.start(_test_options={"executable": str(launcher)})
    try:
        # Popen returned once the launcher ran; the spawner proper comes with its exec.
        await wait_for(
            lambda: not spawner.alive or argv_of(spawner.pid)[0] == python,
            what="the launcher to exec the spawner",
        )
        assert spawner.alive
        if fast:
            await give_home(spawner)
        assert os.stat(f"/proc/{spawner.pid}").st_uid == uid
        assert real_uid_and_nproc_soft_limit(spawner.pid) == (uid, 2)
        assert os.listdir(f"/proc/{spawner.pid}/task") == [str(spawner.pid)]
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


async def test_spawner_gone_raises_spawner_died_on_the_next_spawn(tree: CgroupTree) -> None:
    spawner = await Spawner.start()
    try:
        os.kill(spawner.pid, signal.SIGKILL)
        died = await asyncio.wait_for(spawner.wait_dead(), 10)
        assert isinstance(died, SpawnerDied)
        assert not spawner.alive
        with pytest.raises(SpawnerDied):
            await spawn(spawner, tree.create("late"), "/bin/true")
    finally:
        await spawner.close()
    assert tree.procs(tree.group("late")) == []


# -- its own session ------------------------------------------------------------------------


async def test_the_spawner_has_a_session_and_process_group_of_its_own(
    manager: JobManager,
) -> None:
    pid = manager.spawner_pid
    assert os.getsid(pid) == pid
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) != os.getsid(0)
    assert os.getpgid(pid) != os.getpgid(0)


# The daemon's part, in a process of its own: a manager with a running job, and handlers for
# SIGTERM and SIGHUP that stop it gracefully (as the daemon does).
DAEMON = """
import asyncio, json, signal, sys
from pathlib import Path
from jobworker import JobManager, JobSpec

async def main(state, name):
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    for s in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(s, got.set)
    mgr = await JobManager.open(Path(state), cgroup_name=name, stop_grace=10.0)
    try:
        st = await mgr.start(JobSpec(argv=("sleep", "1000")))
        print(json.dumps({"spawner": mgr.spawner_pid, "job": st.pid}), flush=True)
        await got.wait()
    finally:
        await mgr.close()
    final = mgr.status(st.id)
    print(json.dumps({"signal": final.signal, "reason": final.reason}), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
async def test_a_signal_to_the_daemons_process_group_leaves_the_graceful_stop_in_charge(
    tmp_path: Path, cgroup_name: str, sig: signal.Signals
) -> None:
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        DAEMON,
        str(state),
        cgroup_name,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own group, so the test signals that group, not pytest
    )
    assert proc.stdout is not None
    try:
        json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))  # the job is running
        os.killpg(proc.pid, sig)
        ended = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # The spawner lived through the signal: it saw the job die of the graceful stop's
        # SIGTERM and reported it (a dead spawner leaves the exit status unknowable).
        assert ended == {"signal": signal.SIGTERM, "reason": "stopped: the job manager shut down"}
        assert os.getpgid(0) != proc.pid  # (the signal went to the daemon's group, not ours)
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # Whatever the daemon left (if it failed), a manager on the same state recovers: it
        # kills leftover jobs' groups and removes them.
        mgr = await JobManager.open(state, cgroup_name=cgroup_name)
        parent = mgr.cgroup_parent
        await mgr.close()
    assert not parent.exists()


# -- its death --------------------------------------------------------------------------------


async def test_when_the_spawner_dies_its_jobs_live_on_and_their_exit_status_is_spawner_died(
    tree: CgroupTree, subreaper: None
) -> None:
    spawner = await Spawner.start()
    try:
        group = tree.create("orphan")
        spawned = await spawn(spawner, group, "sleep", "1000")
        assert spawner.alive
        spawner_pid = spawner.pid
        os.kill(spawner_pid, signal.SIGKILL)
        with pytest.raises(SpawnerDied):
            await asyncio.wait_for(spawned.exit_status, 10)
        assert not spawner.alive
        assert isinstance(await spawner.wait_dead(), SpawnerDied)
        # The job lives on, re-parented to the nearest subreaper (this test).
        await wait_for(
            lambda: proc_state(spawned.pid)[1] == os.getpid(), what="the job's re-parenting"
        )
        assert proc_state(spawned.pid)[0] != "Z"
        assert tree.procs(group) == [spawned.pid]
        tree.kill(group)
        _pid, status = os.waitpid(spawned.pid, 0)
        assert describe_wait_status(status) == (None, signal.SIGKILL)
    finally:
        await spawner.close()


async def test_a_spawn_in_flight_when_the_spawner_dies_raises_spawner_died_promptly(
    tree: CgroupTree, subreaper: None
) -> None:
    # Hold the start between fork and exec: the forked child enters a frozen group and stops
    # there, so the spawner is still waiting for it to exec when it is killed.
    group = tree.create("frozen")
    tree.freeze(group, True)
    spawner = await Spawner.start()
    try:
        task = asyncio.create_task(spawn(spawner, group, "/bin/true"))
        await wait_for(lambda: tree.procs(group) != [], what="the forked child in its group")
        assert not task.done()
        os.kill(spawner.pid, signal.SIGKILL)
        # Promptly: the bound is a safety net (the old spawner's child held the socket open
        # until exec, so the daemon saw no EOF and waited for ever).
        with pytest.raises(SpawnerDied):
            await asyncio.wait_for(task, 10)
        assert not spawner.alive
        (child,) = tree.procs(group)
        # (The spawner's socket closes before its children are handed to us: wait for that.)
        await wait_for(lambda: proc_state(child)[1] == os.getpid(), what="the re-parenting")
        tree.kill(group)
        _pid, status = os.waitpid(child, 0)
        assert describe_wait_status(status) == (None, signal.SIGKILL)
    finally:
        await spawner.close()
