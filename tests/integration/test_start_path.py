"""What a start waits for, and what it leaves on disk, once it has returned."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from jobworker import JobManager, JobSpec, JobState


async def test_start_record_is_written_before_the_start_returns_without_the_writer(
    manager: JobManager, tmp_path: Path
) -> None:
    """The start record is written with the start's other files, before the spawn: a start
    waits neither for the store's writer thread (here held busy, as by a batch of synced end
    records) nor for a second write after the spawn."""
    release = threading.Event()
    busy = manager._store._writer.submit(release.wait, 30)
    try:
        st = await asyncio.wait_for(manager.start(JobSpec(argv=("/bin/true",))), 10)
        record = json.loads((tmp_path / "state" / "jobs" / f"{st.id}.json").read_text())
        assert record["state"] == JobState.RUNNING.value
        assert record["argv"] == ["/bin/true"]
        assert record["pid"] == 0, "the pid is not known before the spawn"
        assert st.pid > 0
    finally:
        release.set()
        await asyncio.wrap_future(busy)
    final = await manager.wait(st.id)
    record = json.loads((tmp_path / "state" / "jobs" / f"{st.id}.json").read_text())
    assert record["state"] == final.state.value == JobState.EXITED.value
    assert record["pid"] == st.pid, "the final record has the real pid"
