"""Removing ended jobs: the owner or an admin may, a viewer may not, another user cannot even
see it; a running job is refused (FAILED_PRECONDITION, told apart from a missing controller);
the record and the log are gone, on disk and after a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobworker import JobNotFound, LimitUnavailable, PermissionDenied
from jobworker.errors import JobRunning
from jobworker.server.daemon import Daemon
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect


async def test_remove_an_ended_job(daemon: Daemon, connect: Connect, tmp_path: Path) -> None:
    alice = connect("alice")
    job = await alice.start(["echo", "bye"])
    await alice.wait(job.id)
    jobs = tmp_path / "state" / "jobs"
    assert {p.name for p in jobs.iterdir()} == {
        f"{job.id}{suffix}" for suffix in (".log", ".err", ".idx", ".json")
    }
    await alice.remove(job.id)
    assert list(jobs.iterdir()) == []
    with pytest.raises(JobNotFound):
        await alice.status(job.id)
    assert await alice.list() == []


async def test_a_running_job_is_refused_and_kept(daemon: Daemon, connect: Connect) -> None:
    alice = connect("alice")
    job = await alice.start(["sleep", "600"])
    with pytest.raises(JobRunning, match="still running") as e:
        await alice.remove(job.id)
    assert not isinstance(e.value, LimitUnavailable)  # same code, another class
    assert (await alice.status(job.id)).id == job.id
    await alice.stop(job.id)
    await alice.remove(job.id)


async def test_who_may_remove(daemon: Daemon, connect: Connect) -> None:
    alice, bob, vera, admin = (connect(n) for n in ("alice", "bob", "vera", "root"))
    jobs = []
    for _ in range(2):
        job = await alice.start(["true"])
        await alice.wait(job.id)
        jobs.append(job.id)
    with pytest.raises(JobNotFound):
        await bob.remove(jobs[0])  # another user cannot know it exists
    with pytest.raises(PermissionDenied):
        await vera.remove(jobs[0])  # a viewer sees it, may not remove it
    assert {s.id for s in await alice.list()} == set(jobs)
    await admin.remove(jobs[0])
    await alice.remove(jobs[1])
    assert await alice.list() == []
