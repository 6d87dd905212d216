"""How a job's end is seen and recorded, by the task that supervises it for its whole life."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime

from jobworker.cgroup import controllers
from jobworker.cgroup.tree import CgroupTree
from jobworker.cgroup.watch import EventsWatcher
from jobworker.errors import HostError, JobworkerError
from jobworker.runtime import Job, kill_until_empty
from jobworker.spawn import SpawnerDied, describe_wait_status
from jobworker.spec import JobState, Usage
from jobworker.store import Store

log = logging.getLogger("jobworker.manager")  # the records read as before the split

UNKNOWN_EXIT = (
    "exit status unknown: the spawner died while the job ran; its end was seen through its cgroup"
)
EOF_TIMEOUT = 2.0
"""After the cgroup is empty, how long a pipe writer outside it may keep the output open."""


def now() -> datetime:
    """The wall-clock time job records carry."""
    return datetime.now(UTC)


async def supervise(
    job: Job,
    exit_status: asyncio.Future[int],
    tree: CgroupTree,
    watcher: EventsWatcher,
    store: Store,
    deadlines: dict[str, asyncio.TimerHandle],
) -> None:
    """Waits for the job's end (its main process's exit status, then its cgroup empty and its
    output drained), removes its group and writes its final record. ``deadlines``: the
    manager's, the job's timer is cancelled from it."""
    group = job.group
    assert group is not None and job.pump is not None
    exit_code: int | None = None
    sig: int | None = None
    reason = ""
    orphaned = False
    try:
        status = await exit_status
        exit_code, sig = describe_wait_status(status)
    except SpawnerDied:
        # Its processes run on, re-parented: the job ends when its cgroup is empty, and
        # how its main process ended cannot be known.
        orphaned = True
        reason = UNKNOWN_EXIT
    except HostError as e:
        reason = str(e)
    if job.input is not None:  # its main process is gone: writers learn at once
        job.input.close()
    usage: Usage | None = None
    oom = False
    try:
        if orphaned:
            while tree.populated(group):
                await watcher.changed(group)
        elif tree.populated(group):
            # A job has ended when its cgroup is empty: kill what its main process left.
            await kill_until_empty(tree, watcher, group)
    except JobworkerError as e:
        log.exception("job %s: killing what is left failed", job.id)
        reason = reason or str(e)
    if not await job.pump.wait_eof(EOF_TIMEOUT):
        log.warning("job %s: output still held open outside its cgroup", job.id)
        await job.pump.abandon()
    try:
        usage = controllers.read_usage(group)
        oom = controllers.oom_killed(group)
    except JobworkerError as e:
        log.exception("job %s: cleanup failed", job.id)
        reason = reason or str(e)
    finally:
        watcher.unwatch(group)
    try:
        await tree.remove(group)
    except HostError as e:
        log.error("job %s: %s", job.id, e)
    job.group = None
    if job.stop_reason is not None:
        state = JobState.STOPPED
        reason = job.stop_reason + (f" ({UNKNOWN_EXIT})" if orphaned else "")
    else:
        state = JobState.EXITED
    if job.pump.discarded:
        reason += f" ({job.pump.discarded} further bytes of output were discarded)"
    job.status = replace(
        job.status,
        state=state,
        ended_at=now(),
        exit_code=exit_code,
        signal=sig,
        reason=reason,
        oom_killed=oom,
        usage=usage,
        output_bytes=job.pump.size,
    )
    pump, job.pump = job.pump, None
    try:
        await store.save_async(job.spec, job.status)
    except Exception:
        log.exception("job %s: final record not written", job.id)
    finally:
        deadline = deadlines.pop(job.id, None)
        if deadline is not None:
            deadline.cancel()
        job.ended.set()
        pump.finish()
