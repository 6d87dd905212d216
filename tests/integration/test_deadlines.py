"""Deadlines: a job that runs past its timeout is stopped (SIGTERM, grace, SIGKILL) with
"deadline exceeded" in its reason; in the library, through the daemon (the request's field,
--max-runtime, the policy's [runtime] table), through a real workerd and through the CLI."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker import JobManager, JobSpec, JobState
from jobworker.store import Store, spec_from_dict
from tests.conftest import cgroup2_usable, new_threads

DEAF = ("sh", "-c", 'trap "" TERM; sleep 600')
"""Ignores SIGTERM (so does its sleep, which inherits the ignored disposition): only the SIGKILL
after the grace ends it."""


@pytest.fixture
async def quick(tmp_path: Path, cgroup_name: str) -> AsyncIterator[JobManager]:
    """A manager whose stop grace is 0.2 s; leaves no cgroup or thread."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=0.2)
    parent = mgr.cgroup_parent
    try:
        yield mgr
    finally:
        await mgr.close()
    assert not parent.exists()
    assert not new_threads(threads_before)
    assert not mgr._deadlines, "a deadline timer outlived its job"


# -- the library ------------------------------------------------------------------------------


async def test_a_job_past_its_deadline_is_killed_after_the_grace(
    quick: JobManager, tmp_path: Path
) -> None:
    started = await quick.start(JobSpec(argv=DEAF, timeout=0.5))
    final = await asyncio.wait_for(quick.wait(started.id), 10)
    assert final.state is JobState.STOPPED
    assert final.signal == signal.SIGKILL  # SIGTERM was ignored: the grace ran out
    assert final.exit_code is None
    assert final.reason == "stopped: deadline exceeded (timeout 0.5s)"
    assert final.ended_at is not None
    ran = (final.ended_at - final.started_at).total_seconds()
    assert ran >= 0.5 + 0.2, f"ended after {ran:.3f}s, before the deadline and the grace"
    assert not quick._deadlines
    # The final record keeps the timeout and the reason.
    record = json.loads(Store(tmp_path / "state").record_path(started.id).read_text())
    assert spec_from_dict(record["spec"]).timeout == 0.5
    assert record["reason"] == final.reason


async def test_a_job_that_ends_in_time_is_untouched_and_its_timer_cancelled(
    quick: JobManager,
) -> None:
    st = await quick.start(JobSpec(argv=("sh", "-c", "exit 3"), timeout=600))
    assert st.id in quick._deadlines
    final = await asyncio.wait_for(quick.wait(st.id), 10)
    assert (final.state, final.exit_code, final.reason) == (JobState.EXITED, 3, "")
    assert st.id not in quick._deadlines
    untimed = await quick.start(JobSpec(argv=("true",)))
    assert untimed.id not in quick._deadlines
    await quick.wait(untimed.id)


async def test_a_stop_before_the_deadline_keeps_its_own_reason(quick: JobManager) -> None:
    st = await quick.start(JobSpec(argv=DEAF, timeout=600))
    final = await asyncio.wait_for(quick.stop(st.id, reason="stopped by alice"), 10)
    assert (final.state, final.reason) == (JobState.STOPPED, "stopped by alice")
    assert st.id not in quick._deadlines


async def test_a_job_that_honours_sigterm_ends_at_its_deadline(quick: JobManager) -> None:
    st = await quick.start(JobSpec(argv=("sleep", "600"), timeout=0.3))
    final = await asyncio.wait_for(quick.wait(st.id), 10)
    assert (final.state, final.signal) == (JobState.STOPPED, signal.SIGTERM)
    assert final.reason == "stopped: deadline exceeded (timeout 0.3s)"
