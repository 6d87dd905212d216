"""Runtime handles of one job (fds, futures, tasks), kept apart from the values callers see, and
the stop procedure that runs as a task of its own once a stop has begun."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from jobworker.cgroup.tree import CgroupTree
from jobworker.cgroup.watch import EventsWatcher
from jobworker.errors import HostError, StdinClosed
from jobworker.output import OutputPump
from jobworker.spec import JobSpec, JobStatus
from jobworker.terminal import JobInput

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 1.0
"""How long to wait for a freeze before signalling anyway (a task in D state delays it)."""

_ENDED = asyncio.Event()
_ENDED.set()
"""What every ended job's ``ended`` and ``kill_moved`` become (:meth:`Job.release`): one shared,
set event. An event holds a deque; thousands of retained jobs each keeping two, scattered among
the allocations of the jobs after them, fragmented the daemon's heap (RSS grew 7 MiB over
100 000 churned jobs with 10 000 retained)."""

SendSignal = Callable[[int, int], None]
"""``os.kill``: injectable, so a test can make a process refuse SIGTERM (EPERM)."""


class Job:
    """One job's runtime state; :meth:`snapshot` is all a caller ever sees of it."""

    __slots__ = (
        "ended",
        "group",
        "id",
        "input",
        "kill_at",
        "kill_moved",
        "pump",
        "spec",
        "status",
        "stop_reason",
        "stopping",
        "task",
    )

    def __init__(self, spec: JobSpec, status: JobStatus) -> None:
        self.id = status.id
        self.spec = spec
        self.status = status
        self.group: Path | None = None
        self.pump: OutputPump | None = None
        self.input: JobInput | None = None
        """The job's stdin (pipe or terminal), if it has one; closed when the job ends."""
        self.stop_reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopping: asyncio.Task[None] | None = None
        """The one stop procedure of this job, owned by the manager, never by a caller."""
        self.kill_at: float | None = None
        """Loop time at which the stop escalates to ``cgroup.kill``; only ever moves earlier."""
        self.kill_moved = asyncio.Event()
        self.ended = asyncio.Event()
        if status.state.ended:
            self.ended.set()

    def release(self) -> None:
        """Drop what only a running job needs, once it has ended and its supervision is done:
        its events (their waiters were woken by ``set``), its tasks, its closed stdin. What is
        left of a retained job is its id, spec, status and the stop reason."""
        if not self.ended.is_set():  # supervision cut short (the manager is closing)
            return
        self.ended = self.kill_moved = _ENDED
        self.task = self.stopping = None
        if self.input is not None and self.input.closed:
            self.input = None

    def open_input(self) -> JobInput:
        """The stdin of a job started with ``stdin`` or a ``terminal``; :class:`StdinClosed`
        for a job without one, or whose stdin is closed (it has ended)."""
        if self.input is None or self.input.closed:
            raise StdinClosed(f"job {self.id} has no open stdin (start it with stdin or a tty)")
        return self.input

    def snapshot(self) -> JobStatus:
        """The status with the current output size. The same object while nothing changed,
        so callers can cache what they derive from it (List converts thousands)."""
        if self.pump is not None and self.pump.size != self.status.output_bytes:
            self.status = replace(self.status, output_bytes=self.pump.size)
        return self.status

    def escalate_by(self, when: float) -> None:
        """Have the stop reach ``cgroup.kill`` no later than loop time ``when``."""
        if self.kill_at is None or when < self.kill_at:
            self.kill_at = when
            self.kill_moved.set()


class EndedJob:
    """What the manager's table keeps of a job once it has ended and its supervision is done
    (or it was recovered from its record): its spec and final status, one small object in
    place of the runtime :class:`Job`. The attributes a running job's callers read are class
    constants here: the shared set event, no group, pump, stdin or task."""

    __slots__ = ("spec", "status")

    ended = _ENDED
    kill_moved = _ENDED
    group: Path | None = None
    pump: OutputPump | None = None
    input: JobInput | None = None
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Task[None] | None = None

    def __init__(self, spec: JobSpec, status: JobStatus) -> None:
        assert status.state.ended, "only an ended job is retired"
        self.spec = spec
        self.status = status

    @property
    def id(self) -> str:
        """The status's: two slots, not three (48 bytes an entry, not 64)."""
        return self.status.id

    def snapshot(self) -> JobStatus:
        return self.status

    def open_input(self) -> JobInput:
        raise StdinClosed(f"job {self.id} has no open stdin (start it with stdin or a tty)")


AnyJob = Job | EndedJob
"""A table entry: a job that may still run, or an ended one's compact record."""


async def run_stop(job: Job, tree: CgroupTree, watcher: EventsWatcher, send: SendSignal) -> None:
    """SIGTERM to every process, the grace period, then ``cgroup.kill``; returns when the job
    has ended. Runs as the manager's task, so the escalation happens whatever becomes of the
    caller that asked for the stop (cancelled, timed out, disconnected)."""
    loop = asyncio.get_running_loop()
    group = job.group
    if group is not None:
        try:
            # A sandbox's init is not the job's: it forwards SIGTERM to the main process,
            # which gets its own below, so signalling the init too would deliver it twice.
            init = job.status.pid if job.spec.sandbox is not None else None
            await _terminate(job.id, group, tree, watcher, send, init)
        except HostError as e:
            # The job may end meanwhile and its group be removed under the freeze (GroupGone).
            log.debug("job %s: SIGTERM round cut short: %s", job.id, e)
    ended = asyncio.ensure_future(job.ended.wait())
    try:
        while not job.ended.is_set():
            assert job.kill_at is not None, "stop() sets the deadline before starting us"
            remaining = job.kill_at - loop.time()
            if remaining <= 0:
                _kill(job, tree)
                await ended
                break
            job.kill_moved.clear()
            moved = asyncio.ensure_future(job.kill_moved.wait())
            try:
                await asyncio.wait({ended, moved}, timeout=remaining, return_when="FIRST_COMPLETED")
            finally:
                moved.cancel()
    finally:
        ended.cancel()


def _kill(job: Job, tree: CgroupTree) -> None:
    group = job.group
    if group is None:  # ended between the check and now
        return
    try:
        tree.kill(group)
    except HostError as e:
        if group.exists():
            log.error("job %s: cgroup.kill failed: %s", job.id, e)


async def _terminate(
    job_id: str,
    group: Path,
    tree: CgroupTree,
    watcher: EventsWatcher,
    send: SendSignal,
    skip: int | None = None,
) -> None:
    """SIGTERM to every process in the group, frozen so none can fork or exit meanwhile
    (no pid can be reused between reading cgroup.procs and kill). A process that refuses the
    signal (EPERM: a setuid program under a non-root manager) is left to ``cgroup.kill``.
    ``skip``: a sandbox's init, which is not the job's and ends with its main process."""
    tree.freeze(group, True)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FREEZE_TIMEOUT):
                while tree.events(group).get("frozen") != 1:
                    await watcher.changed(group)
        refused = 0
        for pid in tree.procs(group):
            if pid == skip:
                continue
            try:
                send(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except PermissionError:
                refused += 1
        if refused:
            log.warning(
                "job %s: %d process(es) refused SIGTERM (EPERM); cgroup.kill after the grace",
                job_id,
                refused,
            )
    finally:
        tree.freeze(group, False)


async def kill_until_empty(tree: CgroupTree, watcher: EventsWatcher, group: Path) -> None:
    """SIGKILL everything in ``group`` and return once it is empty (woken by its
    ``cgroup.events``; without ``cgroup.kill`` the fallback sweeps until nothing is left)."""
    await tree.kill_until_empty(group, lambda: watcher.changed(group))
