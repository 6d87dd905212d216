"""Faults of the cgroup layer on the real tree: lost inotify events, no cgroup.kill."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from inotify_simple import Event, INotify, flags

from jobworker import JobManager, JobSpec, JobState
from jobworker.cgroup import fs, tree, watch
from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.errors import HostError
from tests.conftest import cgroup2_usable, wait_for


class OverflowingInotify:
    """A real inotify whose every batch of events reads as one queue overflow (wd -1): the
    kernel dropped the events, among them the job's ``populated 0``."""

    def __init__(self) -> None:
        self._real = INotify(nonblocking=True)
        self.overflows = 0

    def fileno(self) -> int:
        return int(self._real.fileno())

    def add_watch(self, path: str | Path, mask: int) -> int:
        return int(self._real.add_watch(path, mask))

    def rm_watch(self, wd: int) -> None:
        self._real.rm_watch(wd)

    def read(self, timeout: int | None = None) -> list[Event]:
        if not self._real.read(timeout=timeout):
            return []
        self.overflows += 1
        return [Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name="")]

    def close(self) -> None:
        self._real.close()


@pytest.fixture
async def overflowing(
    tmp_path: Path, cgroup_name: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[JobManager, OverflowingInotify]]:
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    ino = OverflowingInotify()
    monkeypatch.setattr("jobworker.manager.EventsWatcher", lambda: watch.EventsWatcher(ino))
    mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=1.0)
    parent = mgr.cgroup_parent
    try:
        yield mgr, ino
    finally:
        await asyncio.wait_for(mgr.close(), 20)
    assert not parent.exists()


async def test_a_job_ends_when_its_populated_event_is_lost_in_an_overflow(
    overflowing: tuple[JobManager, OverflowingInotify],
) -> None:
    """The main process exits leaving a child, so the manager waits on cgroup.events for the
    group to empty; that event arrives only as IN_Q_OVERFLOW. The job still ends."""
    mgr, ino = overflowing
    st = await mgr.start(JobSpec(argv=("sh", "-c", "sleep 0.2 & echo started")))
    final = await asyncio.wait_for(mgr.wait(st.id), 10)
    assert final.state is JobState.EXITED and final.exit_code == 0
    assert ino.overflows >= 1
    assert not (mgr.cgroup_parent / st.id).exists()


# -- no cgroup.kill (Linux < 5.14): the freeze + SIGKILL fallback ---------------------------

# Every process ignores SIGTERM (SIG_IGN survives exec); some leave the session, some are
# double-forked orphans. Each prints its pid; the main one waits for the test's go.
ESCAPERS = """
trap "" TERM
setsid sleep 1000 & echo $!
( sleep 1000 & echo $! )
setsid sh -c 'sleep 1000 & echo $!; exec sleep 1000' & echo $!
echo $$
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.fixture
def pids() -> Iterator[list[int]]:
    """Pids a test saw; any still alive at the end is killed (and the test fails)."""
    seen: list[int] = []
    yield seen
    survivors = [p for p in seen if alive(p)]
    for p in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    assert survivors == []


@pytest.fixture
def no_cgroup_kill(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """cgroupfs as on a kernel without cgroup.kill; returns the names of files written."""
    written: list[str] = []
    real_write = fs.write

    def write(group: Path, name: str, value: str) -> None:
        written.append(name)
        if name == "cgroup.kill":
            raise HostError(f"{group / name} does not exist: this kernel lacks cgroup.kill")
        real_write(group, name, value)

    monkeypatch.setattr(fs, "write", write)
    return written


@pytest.fixture
async def fallback(
    tmp_path: Path, cgroup_name: str, monkeypatch: pytest.MonkeyPatch, no_cgroup_kill: list[str]
) -> AsyncIterator[JobManager]:
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    cls = functools.partial(tree.CgroupTree, use_cgroup_kill=False)
    monkeypatch.setattr("jobworker.manager.CgroupTree", cls)
    mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=1.0)
    parent = mgr.cgroup_parent
    try:
        yield mgr
    finally:
        await asyncio.wait_for(mgr.close(), 20)
    assert not parent.exists()
    assert "cgroup.kill" not in no_cgroup_kill


async def started_escapers(mgr: JobManager, script: str, pids: list[int], state: Path) -> str:
    st = await mgr.start(JobSpec(argv=("sh", "-c", script)))
    log = state / "jobs" / f"{st.id}.log"  # the output so far, without following
    await wait_for(lambda: len(log.read_bytes().split()) == 5, what="five pids printed")
    pids.extend(int(x) for x in log.read_bytes().split())
    assert all(alive(p) for p in pids)
    return st.id


async def test_fallback_kills_what_the_main_process_leaves(
    fallback: JobManager, pids: list[int], tmp_path: Path, no_cgroup_kill: list[str]
) -> None:
    go = tmp_path / "go"
    job_id = await started_escapers(
        fallback, ESCAPERS + f"while [ ! -e {go} ]; do sleep 0.01; done\n", pids, tmp_path / "state"
    )
    go.touch()
    final = await asyncio.wait_for(fallback.wait(job_id), 20)
    assert (final.state, final.exit_code, final.reason) == (JobState.EXITED, 0, "")
    assert [p for p in pids if alive(p)] == []
    assert not (fallback.cgroup_parent / job_id).exists()
    assert "cgroup.freeze" in no_cgroup_kill


async def test_fallback_kills_a_job_that_ignores_sigterm(
    fallback: JobManager, pids: list[int], tmp_path: Path
) -> None:
    job_id = await started_escapers(
        fallback, ESCAPERS + "exec sleep 1000\n", pids, tmp_path / "state"
    )
    final = await asyncio.wait_for(fallback.stop(job_id, grace=0.1), 20)
    assert (final.state, final.signal) == (JobState.STOPPED, signal.SIGKILL)
    assert [p for p in pids if alive(p)] == []
    assert not (fallback.cgroup_parent / job_id).exists()


async def test_kill_until_empty_without_cgroup_kill(
    cgroup_name: str, pids: list[int], no_cgroup_kill: list[str]
) -> None:
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    cg = tree.CgroupTree(own_cgroup_dir(), cgroup_name, use_cgroup_kill=False)
    cg.setup()
    group = cg.create("g")
    watcher = watch.EventsWatcher()
    watcher.watch(group)
    proc = subprocess.Popen(
        ["sh", "-c", "read go; " + ESCAPERS + "exec sleep 1000"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        fs.write(group, "cgroup.procs", str(proc.pid))
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        await wait_for(lambda: len(cg.subtree_procs(group)) == 5, what="five processes")
        pids.extend(cg.subtree_procs(group))
        assert cg.populated(group)
        await asyncio.wait_for(cg.kill_until_empty(group, lambda: watcher.changed(group)), 20)
        assert not cg.populated(group)
        assert [p for p in pids if alive(p)] == []
        assert await asyncio.to_thread(proc.wait, 10) == -signal.SIGKILL
        proc.stdout.close()
    finally:
        watcher.unwatch(group)
        watcher.close()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        leftovers = cg.subtree_procs(group)  # only when the test already failed: no leaks
        pids.extend(p for p in leftovers if p not in pids)
        for p in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        await wait_for(lambda: not cg.populated(group), what="leftovers killed")
        await cg.remove(group)
        cg.teardown()
    assert not cg.parent.exists()
    assert "cgroup.kill" not in no_cgroup_kill
