"""What the manager's table keeps of an ended job: one compact record (id, spec, final status),
no events, tasks, pump, group or stdin; and every query of the job answers as before, also for
the jobs a restarted manager recovers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jobworker import JobManager, JobSpec, JobState
from jobworker.errors import JobRunning, StdinClosed
from jobworker.runtime import EndedJob, Job
from tests.conftest import cgroup2_usable, wait_for


def entry(m: JobManager, job_id: str) -> object:
    return m._jobs[job_id]


def assert_compact(record: object) -> None:
    assert type(record) is EndedJob
    assert not hasattr(record, "__dict__")
    # Nothing but the spec and the status lives in the record itself (the id is the status's).
    assert EndedJob.__slots__ == ("spec", "status")
    assert record.id == record.status.id
    for name in ("ended", "kill_moved", "group", "pump", "input", "task", "stopping"):
        assert name not in EndedJob.__slots__


async def test_an_ended_job_is_kept_as_a_compact_record(manager: JobManager) -> None:
    running = await manager.start(JobSpec(argv=("/bin/cat",), stdin=True, owner="alice"))
    first = await manager.start(JobSpec(argv=("/bin/echo", "hi"), owner="alice"))
    assert type(entry(manager, running.id)) is Job
    await manager.wait(first.id)
    await wait_for(lambda: type(entry(manager, first.id)) is EndedJob, what="the job retired")
    assert_compact(entry(manager, first.id))
    final = manager.status(first.id)
    assert final.state is JobState.EXITED and final.exit_code == 0 and final.output_bytes == 3
    assert (await manager.wait(first.id)) is final
    assert (await manager.stop(first.id)) is final
    assert manager.spec(first.id).argv == ("/bin/echo", "hi")
    assert b"".join([b async for b in manager.output(first.id)]) == b"hi\n"
    assert b"".join([b async for b in manager.output(first.id, follow=True)]) == b"hi\n"
    with pytest.raises(StdinClosed):
        manager.input(first.id)
    # Retiring keeps the job's place in the listing order.
    assert [s.id for s in manager.list()] == [running.id, first.id]
    page, _ = manager.list_page(None, 10, "alice")
    assert [s.id for s in page] == [running.id, first.id]
    with pytest.raises(JobRunning):
        await manager.remove(running.id)
    stopped = await manager.stop(running.id)
    assert stopped.state is JobState.STOPPED
    await wait_for(lambda: type(entry(manager, running.id)) is EndedJob, what="the stop retired")
    await manager.remove(first.id)
    assert [s.id for s in manager.list()] == [running.id]


async def test_recovered_jobs_are_compact_records(tmp_path: Path, cgroup_name: str) -> None:
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "state"
    async with await JobManager.open(state, cgroup_name=cgroup_name) as m:
        job = await m.start(JobSpec(argv=("/bin/echo", "again")))
        before = await m.wait(job.id)
    async with await JobManager.open(state, cgroup_name=cgroup_name) as m:
        assert_compact(entry(m, job.id))
        assert m.status(job.id) == before
        assert (await asyncio.wait_for(m.wait(job.id), 5)) == before
        assert b"".join([b async for b in m.output(job.id, follow=True)]) == b"again\n"
