"""Faults of the cgroup layer on the real tree: lost inotify events, no cgroup.kill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from inotify_simple import Event, INotify, flags

from jobworker import JobManager, JobSpec, JobState
from jobworker.cgroup import watch
from tests.conftest import cgroup2_usable


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
