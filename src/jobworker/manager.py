"""The job manager: the library's public face for running jobs.

One manager owns a state directory and a group in the cgroup tree. It is asyncio-native; all
methods must be called from the loop that opened it. Runtime handles (fds, futures, the
supervising task) live in :class:`Job`; callers only ever see :class:`JobStatus` snapshots.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from jobworker.cgroup import controllers
from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.cgroup.tree import CgroupTree
from jobworker.cgroup.watch import EventsWatcher
from jobworker.ending import UNKNOWN_EXIT, supervise
from jobworker.ending import now as _now
from jobworker.errors import HostError, JobNotFound, JobRunning, ShuttingDown
from jobworker.jobtable import JobTable, PageKey
from jobworker.outlog import Chunk
from jobworker.output import PumpThread
from jobworker.outread import Query, data_of, read_chunks
from jobworker.recovery import end_time, recover
from jobworker.retention import Removal, Retention, RetentionIndex
from jobworker.runtime import AnyJob, EndedJob, Job, SendSignal, run_stop
from jobworker.spawn.keeper import SpawnerKeeper
from jobworker.spec import DEADLINE_REASON, Credentials, JobSpec, JobState, JobStatus
from jobworker.starting import abandon_start, lookup_in_child, masked, prepare, raise_nofile_limit
from jobworker.store import Store
from jobworker.terminal import JobInput
from jobworker.units import format_duration

__all__ = ["DEFAULT_STOP_GRACE", "UNKNOWN_EXIT", "JobManager", "PageKey"]

log = logging.getLogger(__name__)

DEFAULT_STOP_GRACE = 2.0


class JobManager:
    """Starts, tracks, stops and streams jobs. Get one with :meth:`open`."""

    def __init__(
        self,
        *,
        _token: object,
        store: Store,
        tree: CgroupTree,
        spawner: SpawnerKeeper,
        watcher: EventsWatcher,
        pumps: PumpThread,
        available: frozenset[str],
        stop_grace: float,
        credentials: Credentials,
        max_log_bytes: int | None,
        hidden_paths: tuple[str, ...] = (),
        job_nofile: int | None = None,
        retention: Retention | None = None,
        clock: Callable[[], datetime] = _now,
        on_removed: Callable[[Removal], None] | None = None,
    ) -> None:
        if _token is not _OPEN:
            raise TypeError("use `await JobManager.open(...)` to create a JobManager")
        self._store = store
        self._tree = tree
        self._spawner = spawner
        self._watcher = watcher
        self._pumps = pumps
        self._available = available
        self._stop_grace = stop_grace
        self._credentials = credentials
        self._max_log_bytes = max_log_bytes
        self._hidden = hidden_paths
        """Masked in every sandbox: the state dir and the paths :meth:`open` was given."""
        self._job_nofile = job_nofile
        """Every job's RLIMIT_NOFILE soft limit: ours before :func:`raise_nofile_limit`."""
        self._send_signal: SendSignal = os.kill
        self._host_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobworker-start")
        self._host_io.submit(int).result()  # start its thread now, not in the first start
        self._jobs = JobTable()
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._starting: set[asyncio.Future[JobStatus]] = set()
        self._deadlines: dict[str, asyncio.TimerHandle] = {}
        """Job id -> the timer of its deadline (:attr:`JobSpec.timeout`), until the job ends."""
        self._retention = RetentionIndex(retention) if retention is not None else None
        self._clock = clock
        self._on_removed = on_removed
        self._sweeper: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        state_dir: Path,
        *,
        cgroup_root: Path | None = None,
        cgroup_name: str = "jobworker",
        stop_grace: float = DEFAULT_STOP_GRACE,
        credentials: Credentials | None = None,
        max_log_bytes: int | None = None,
        hidden_paths: Sequence[Path] = (),
        retention: Retention | None = None,
        clock: Callable[[], datetime] = _now,
        on_removed: Callable[[Removal], None] | None = None,
    ) -> JobManager:
        """Create the cgroup parent and state dir, start the spawner, recover old records.

        ``cgroup_root`` is the delegated group to work in (default: this process's own, from
        /proc/self/cgroup and mountinfo). Records of jobs that were running when a previous
        manager died are marked lost and their cgroups killed and removed.

        ``credentials``: who jobs run as unless :meth:`start` says otherwise (default: this
        process's own user). ``max_log_bytes``: a job whose output goes past it is stopped,
        with the reason in its status (default: no cap). ``hidden_paths``: files and
        directories masked in every sandboxed job (besides the state dir, always masked): an
        empty read-only tmpfs over a directory, ``/dev/null`` over a file.

        ``retention``: which ended jobs are removed (record and log), when a job ends and on a
        periodic sweep; see :mod:`jobworker.retention` (default: every job is kept).
        ``clock``: the time that ages are measured against (tests pass one they move).
        ``on_removed``: called with each :class:`~jobworker.retention.Removal` retention makes.
        """
        if max_log_bytes is not None and max_log_bytes <= 0:
            raise ValueError("max_log_bytes must be positive")
        async with contextlib.AsyncExitStack() as undo:
            store = Store(state_dir)
            store.setup()
            undo.callback(store.close)
            tree = CgroupTree(cgroup_root or own_cgroup_dir(), cgroup_name)
            tree.setup()
            undo.callback(tree.teardown)
            job_nofile = raise_nofile_limit()
            available = controllers.enable(tree.delegated, tree.parent)
            # After enable, which may move this process (and so its children) into a leaf.
            spawner = await SpawnerKeeper.start()
            undo.push_async_callback(spawner.close)
            watcher = EventsWatcher()
            undo.callback(watcher.close)
            pumps = PumpThread()
            undo.push_async_callback(pumps.close)
            self = cls(
                _token=_OPEN,
                store=store,
                tree=tree,
                spawner=spawner,
                watcher=watcher,
                pumps=pumps,
                available=available,
                stop_grace=stop_grace,
                credentials=credentials or Credentials(),
                max_log_bytes=max_log_bytes,
                hidden_paths=masked(state_dir, hidden_paths),
                job_nofile=job_nofile,
                retention=retention,
                clock=clock,
                on_removed=on_removed,
            )
            undo.callback(self._host_io.shutdown)
            recovered = await recover(store, tree, watcher)
            for spec, status in recovered:
                self._jobs[status.id] = EndedJob(spec, status)
            if self._retention is not None:
                for _, status in sorted(recovered, key=end_time):
                    self._retained(status, status.ended_at or status.started_at)
                self._sweeper = asyncio.create_task(self._sweep(), name="retention sweep")
            undo.pop_all()
        return self

    @property
    def spawner_pid(self) -> int:
        return self._spawner.current.pid

    @property
    def available_controllers(self) -> frozenset[str]:
        return self._available

    @property
    def cgroup_parent(self) -> Path:
        return self._tree.parent

    # -- queries ---------------------------------------------------------------------------

    def _get(self, job_id: str) -> AnyJob:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def status(self, job_id: str) -> JobStatus:
        """A snapshot; a running job's usage is read live from its cgroup."""
        job = self._get(job_id)
        status = job.snapshot()
        if status.state is JobState.RUNNING and job.group is not None:
            try:
                return replace(status, usage=controllers.read_usage(job.group))
            except HostError:
                pass  # the group is being removed right now
        return status

    def spec(self, job_id: str) -> JobSpec:
        return self._get(job_id).spec

    def list(self) -> list[JobStatus]:
        """Every known job, oldest first (live usage omitted: ask :meth:`status`)."""
        return [j.snapshot() for j in self._jobs.values()]

    def list_page(
        self, after: PageKey | None, limit: int, owner: str | None = None
    ) -> tuple[builtins.list[JobStatus], PageKey | None]:
        """Up to ``limit`` jobs in :func:`page_key` order (oldest first), those after ``after``
        (``None``: from the first), only ``owner``'s if given; and the key to pass as ``after``
        for the next page, ``None`` when there is none. Costs O(log n + limit): no other job is
        looked at. A job that starts meanwhile comes last, so a listing page by page sees
        every job that existed throughout, once (unless the clock went back)."""
        return self._jobs.page(after, limit, owner)

    async def remove(self, job_id: str) -> None:
        """Forget an ended job: its record and log are deleted (readers that have the log open
        read on to its end). Raises :class:`JobRunning` for a job that has not ended."""
        job = self._get(job_id)
        if not job.ended.is_set():
            raise JobRunning(f"job {job_id} is still running; stop it first")
        del self._jobs[job_id]
        if self._retention is not None:
            self._retention.discard(job_id)
        await self._store.remove_async(job_id)

    async def wait(self, job_id: str) -> JobStatus:
        job = self._get(job_id)
        await job.ended.wait()
        return job.status

    def output(self, job_id: str, offset: int = 0, follow: bool = False) -> AsyncIterator[bytes]:
        """The job's bytes (both streams as received) from ``offset``: what exists now, or
        with ``follow`` until the job has ended and every byte is delivered."""
        return data_of(self.chunks(job_id, Query(offset=offset, follow=follow)))

    def chunks(self, job_id: str, query: Query) -> AsyncIterator[Chunk]:
        """A view of the job's output, with streams and times: see :class:`.outread.Query`."""
        job = self._get(job_id)
        return read_chunks(self._store.log_paths(job.id), job.pump, query)

    def input(self, job_id: str) -> JobInput:
        """The job's stdin (see :meth:`Job.open_input`): write to it, resize its terminal."""
        return self._get(job_id).open_input()

    # -- start -----------------------------------------------------------------------------

    async def start(self, spec: JobSpec, credentials: Credentials | None = None) -> JobStatus:
        """Start a job, as ``credentials`` (default: the manager's). Raises
        :class:`SpawnError` (nothing is left behind), :class:`LimitUnavailable`,
        :class:`ShuttingDown` or :class:`HostError`.

        Cancelling the caller does not cancel a start under way: once the request may have
        reached the spawner, the job is started and tracked like any other (a half-cancelled
        start would leave a process nobody supervises).
        """
        if self._closing:
            raise ShuttingDown("the job manager is shutting down; no new jobs are accepted")
        task = asyncio.ensure_future(self._start(spec, credentials or self._credentials))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)
        return await asyncio.shield(task)

    async def _start(self, spec: JobSpec, creds: Credentials) -> JobStatus:
        controllers.check(spec.limits, self._available)
        env = spec.full_env()
        job_id = str(uuid.uuid4())
        # Path checks, the log file, mkdir and the limit writes touch the host's filesystems:
        # off the loop, so a hung mount stalls this start and not every other call.
        lookup = lookup_in_child(spec, creds)
        record = JobStatus(
            id=job_id,
            state=JobState.RUNNING,
            argv=spec.argv,
            owner=spec.owner,
            pid=0,
            started_at=_now(),
            limits=spec.limits,
        )
        prep = await asyncio.get_running_loop().run_in_executor(
            self._host_io, prepare, self._store, self._tree, job_id, spec, env, lookup, record
        )
        group = prep.group
        # Pumped from before the spawn: the job's first bytes are taken in the order written.
        refused = functools.partial(self._on_output_refused, job_id)
        pump = self._pumps.add(*prep.output, refused, self._max_log_bytes)
        try:
            self._watcher.watch(group)
            try:  # the spawner gets its own copies of these
                spawner = await self._spawner.live()
                spawned = await spawner.spawn(
                    prep.path,
                    spec.argv,
                    env,
                    spec.cwd,
                    prep.procs_fd,
                    prep.stdout_w,
                    prep.stderr_w,
                    creds,
                    self._fast(spec, creds),
                    sandbox=spec.sandbox,
                    hidden=self._hidden,
                    lookup=lookup,
                    nofile=self._job_nofile,
                    stdin_fd=prep.stdin_r,
                    tty=spec.terminal is not None,
                )
            finally:
                prep.close_spawner_fds()
        except BaseException:
            await abandon_start(self._store, self._tree, self._watcher, job_id, prep, pump)
            raise
        status = replace(record, pid=spawned.pid, started_at=_now())
        job = Job(spec, status)
        job.group, job.pump = group, pump
        job.input = JobInput(prep.input_w, spec.terminal is not None) if spec.stdin else None
        self._jobs[job_id] = job
        if pump.refused is not None:  # before the job was known
            self._on_output_refused(job_id, pump.refused)
        job.task = asyncio.create_task(self._supervise(job, spawned.exit_status))
        if spec.timeout is not None:
            self._deadlines[job_id] = asyncio.get_running_loop().call_later(
                spec.timeout, self._on_deadline, job
            )
        return status

    def _fast(self, spec: JobSpec, creds: Credentials) -> bool:
        """Whether the spawner may posix_spawn from inside the job's group. Not when the job
        runs as someone else (posix_spawn cannot switch), and not when the group's limits could
        catch the spawner during its moment inside: pids.max counts it, a tight cpu.max
        throttles it, and memory.max with memory.oom.group could OOM-kill it with the job."""
        limits = spec.limits
        return (
            self._spawner.fast
            and spec.sandbox is None
            and creds.uid < 0
            and creds.gid < 0
            and limits.memory is None
            and limits.cpu is None
            and (limits.pids is None or limits.pids >= 2)
        )

    def _on_output_refused(self, job_id: str, reason: str) -> None:
        job = self._jobs.get(job_id)
        if job is None:
            return  # not started yet: checked once it is
        log.warning("job %s: %s; stopping it", job.id, reason)
        if isinstance(job, Job) and not job.ended.is_set():
            self._begin_stop(job, None, reason)

    def _on_deadline(self, job: Job) -> None:
        self._deadlines.pop(job.id, None)
        if job.ended.is_set():  # pragma: no cover - the timer is cancelled when the job ends
            return
        assert job.spec.timeout is not None
        reason = f"stopped: {DEADLINE_REASON} (timeout {format_duration(job.spec.timeout)})"
        log.info("job %s: %s", job.id, reason)
        self._begin_stop(job, None, reason)

    # -- the end of a job ------------------------------------------------------------------

    async def _supervise(self, job: Job, exit_status: asyncio.Future[int]) -> None:
        """Runs for the life of one job: a task (not a thread) woken by events only."""
        await supervise(job, exit_status, self._tree, self._watcher, self._store, self._deadlines)
        try:
            if self._retention is not None:
                ended = job.status.ended_at  # the clock's own copy only if it is not ours
                self._retained(
                    job.status, ended if ended and self._clock is _now else self._clock()
                )
                await self._apply_retention()
        finally:
            job.release()
            if job.ended.is_set():
                self._jobs.retire(job)

    # -- retention -------------------------------------------------------------------------

    def _retained(self, status: JobStatus, ended_at: datetime) -> None:
        """Index an ended job; ``ended_at`` in the clock's time (ages are measured with it)."""
        assert self._retention is not None
        if status.state.ended and status.id in self._jobs:
            self._retention.add(status.id, status.owner, ended_at, status.output_bytes)

    async def _apply_retention(self) -> None:
        """Remove the ended jobs past the retention limits, oldest first: O(1) per job
        removed. Not while closing: the jobs stopped by the shutdown are kept for the next
        manager (whose first sweep applies the limits)."""
        if self._retention is None or self._closing:
            return
        for removal in self._retention.due(self._clock()):
            if removal.job_id not in self._jobs:
                continue
            del self._jobs[removal.job_id]  # not pop(): the table keeps its order on del
            log.debug("job %s: removed by retention (%s)", removal.job_id, removal.reason)
            if self._on_removed is not None:
                try:
                    self._on_removed(removal)
                except Exception:
                    log.exception("the on_removed callback failed")
            try:
                await self._store.remove_async(removal.job_id)
            except HostError as e:
                log.error("job %s: not removed by retention: %s", removal.job_id, e)

    async def _sweep(self) -> None:
        """The periodic sweep (for jobs that age past ``max_age`` while none ends)."""
        assert self._retention is not None
        while True:
            await self._apply_retention()
            await asyncio.sleep(self._retention.policy.sweep_interval)

    # -- stop ------------------------------------------------------------------------------

    async def stop(
        self, job_id: str, grace: float | None = None, reason: str = "stopped on request"
    ) -> JobStatus:
        """SIGTERM every process of the job, wait ``grace`` seconds, then ``cgroup.kill``;
        returns the final status.

        Once begun, a stop runs to its end in a task of the manager's: cancelling the caller
        only stops its waiting. A second stop joins the first (one SIGTERM round per job) and
        can only bring the kill forward. Stopping an ended job returns its final status.
        """
        job = self._get(job_id)
        if isinstance(job, Job) and not job.ended.is_set():
            self._begin_stop(job, grace, reason)
            await job.ended.wait()
        return job.status

    def _begin_stop(self, job: Job, grace: float | None, reason: str) -> None:
        if job.stop_reason is None:
            job.stop_reason = reason
        grace = self._stop_grace if grace is None else grace
        job.escalate_by(asyncio.get_running_loop().time() + grace)
        if job.stopping is None:
            job.stopping = asyncio.create_task(
                run_stop(job, self._tree, self._watcher, self._send_signal),
                name=f"stop {job.id}",
            )
            self._tasks.add(job.stopping)
            job.stopping.add_done_callback(self._stop_done)

    def _stop_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a stop failed", exc_info=task.exception())

    # -- recovery and shutdown -------------------------------------------------------------

    async def close(self) -> None:
        """Stop every running job, remove their cgroups and stop the spawner. Logs and records
        stay. Idempotent."""
        if self._closing:
            await asyncio.gather(*(j.ended.wait() for j in self._jobs.values()))
            return
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        # Starts under way finish first, so their jobs are among those stopped below.
        await asyncio.gather(*self._starting, return_exceptions=True)
        running = [j.id for j in self._jobs.values() if not j.ended.is_set()]
        await asyncio.gather(
            *(self.stop(i, reason="stopped: the job manager shut down") for i in running)
        )
        tasks = [j.task for j in self._jobs.values() if j.task is not None]
        await asyncio.gather(*tasks, *self._tasks, return_exceptions=True)
        self._watcher.close()
        await self._pumps.close()
        await self._spawner.close()
        self._host_io.shutdown(wait=True)
        self._tree.teardown()
        self._store.close()

    async def __aenter__(self) -> JobManager:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


_OPEN = object()
