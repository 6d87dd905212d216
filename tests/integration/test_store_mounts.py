"""The store when ``STATE/jobs`` is a file system of its own (a bigger disk mounted there): the
pool (``STATE/pool``) cannot link into it, and a record must still be written after a restart."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobworker.spec import JobSpec, JobState, JobStatus
from jobworker.store import Store

SPEC = JobSpec(argv=("true",), owner="alice")


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    jobs = tmp_path / "state" / "jobs"
    jobs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "tmpfs", str(jobs)], check=True)
    try:
        yield tmp_path / "state"
    finally:
        subprocess.run(["umount", str(jobs)], check=True)


def test_a_job_on_another_file_system_is_recorded_and_recovered(state: Path) -> None:
    running = JobStatus(
        id="j1",
        state=JobState.RUNNING,
        argv=SPEC.argv,
        owner="alice",
        pid=0,
        started_at=datetime.now(UTC),
    )
    first = Store(state)
    first.setup()
    first._writer.submit(int).result()
    first.create("j1").close()  # the link fails (EXDEV): the pool is given up
    first.save(SPEC, running, new=True)
    assert os.listdir(first.pool) == []
    first.close()  # as if the daemon died with j1 running
    again = Store(state)
    again.setup()
    again._writer.submit(int).result()  # refilled: the pool does not know yet
    try:
        lost = replace(running, state=JobState.LOST, ended_at=datetime.now(UTC))
        again.save(SPEC, lost)  # what recovery does with it
        again.create("j2").close()
        assert [s.state for _, s in again.load_all() if s.id == "j1"] == [JobState.LOST]
        assert again.log_path("j2").exists()
    finally:
        again.close()
