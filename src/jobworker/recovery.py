"""What a manager finds when it opens: the records of earlier jobs, and cgroups left behind by a
manager that died. Jobs that were running are killed through their groups and marked lost."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from jobworker.cgroup.tree import CgroupTree
from jobworker.cgroup.watch import EventsWatcher
from jobworker.runtime import kill_until_empty
from jobworker.spec import JobSpec, JobState, JobStatus
from jobworker.store import Store

LOST_REASON = "the daemon stopped while the job was running; killed at restart"


async def recover(
    store: Store, tree: CgroupTree, watcher: EventsWatcher
) -> list[tuple[JobSpec, JobStatus]]:
    """Every recorded job, those that were running now lost; then every group with no running
    record (a start that crashed half-way, or a foreign leftover) killed and removed."""
    jobs: list[tuple[JobSpec, JobStatus]] = []
    for spec, record in store.load_all():
        status = record
        if record.state is JobState.RUNNING:
            status = await _mark_lost(store, tree, watcher, spec, record)
        jobs.append((spec, status))
    for name in tree.existing():
        await kill_group(tree, watcher, tree.group(name))
    return jobs


async def kill_group(tree: CgroupTree, watcher: EventsWatcher, group: Path) -> None:
    """Kill everything in ``group``, wait until it is empty, remove it."""
    watcher.watch(group)
    try:
        if tree.populated(group):
            await kill_until_empty(tree, watcher, group)
    finally:
        watcher.unwatch(group)
    await tree.remove(group)


async def _mark_lost(
    store: Store, tree: CgroupTree, watcher: EventsWatcher, spec: JobSpec, status: JobStatus
) -> JobStatus:
    group = tree.group(status.id)
    if group.exists():
        await kill_group(tree, watcher, group)
    store.repair(status.id)
    size = store.output_size(status.id)
    lost = replace(
        status,
        state=JobState.LOST,
        ended_at=datetime.now(UTC),
        reason=LOST_REASON,
        output_bytes=size,
    )
    store.save(spec, lost)
    return lost


def end_time(job: tuple[JobSpec, JobStatus]) -> datetime:
    """The order recovered jobs enter retention in."""
    status = job[1]
    return status.ended_at or status.started_at
