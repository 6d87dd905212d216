"""The spawner is not a single point of failure: kill -9 it, and running jobs run on and stay
supervised, a new spawner is started, and the next start succeeds."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from jobworker import JobManager, JobSpec, JobState
from jobworker.manager import UNKNOWN_EXIT
from tests.conftest import wait_for


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_jobs_outlive_a_killed_spawner(manager: JobManager, tmp_path: Path) -> None:
    # One job that ends by itself once the gate opens (printing a known amount first), one
    # that must be stopped.
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.01; done; seq 1 20000; exit 3"
    ends = await manager.start(JobSpec(argv=("sh", "-c", script)))
    stopped = await manager.start(JobSpec(argv=("sleep", "600")))
    old = manager.spawner_pid
    os.kill(old, signal.SIGKILL)
    await wait_for(lambda: manager.spawner_pid != old, what="a new spawner")
    assert _alive(stopped.pid), "the job died with its spawner"

    # The next start succeeds, on the new spawner.
    fresh = await manager.start(JobSpec(argv=("sh", "-c", "echo fresh; exit 5")))
    assert (await manager.wait(fresh.id)).exit_code == 5

    gate.touch()
    # The orphaned job's end is seen and its output is complete; its exit code is not known.
    async with asyncio.timeout(20):
        final = await manager.wait(ends.id)
    assert final.state is JobState.EXITED, final
    assert final.exit_code is None and final.signal is None, final
    assert final.reason == UNKNOWN_EXIT
    out = b"".join([c async for c in manager.output(ends.id)])
    assert out == b"".join(b"%d\n" % i for i in range(1, 20001))

    # Stop still reaches the orphan.
    async with asyncio.timeout(20):
        final = await manager.stop(stopped.id, grace=0.5)
    assert final.state is JobState.STOPPED, final
    assert not _alive(stopped.pid)
    assert final.exit_code is None and UNKNOWN_EXIT in final.reason
