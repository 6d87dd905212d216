"""Job records on disk: ``STATE/jobs/<id>.json`` beside the job's output, ``<id>.log`` (its
stdout), ``<id>.err`` (its stderr) and ``<id>.idx`` (the index that interleaves them; the
format: :mod:`jobworker.outlog`).

The record is created when the job starts and replaced atomically when it ends (a temp file
renamed over it), so after any crash each
record is either the running one or the final one. The final write is durable: the log (its
files that are not empty), the new record and the directory are synced (``fdatasync``), so a
power cut after a job's end loses neither its output nor its outcome (the start record is not
synced: one lost or cut short reads as a job lost while running). The writer thread takes the
records asked for meanwhile as one batch: each one's files are synced, the directory once for
the batch, and no :meth:`Store.save_async` returns before the directory sync that follows its
rename. Flat files, no directory per job: on slow
disks every metadata operation shows in the start latency. Everything is 0600 in a 0700
directory: jobs and other users cannot read other jobs' output or specs.

Recovery never deletes a log: a log whose record is missing or unreadable is a ``lost`` job
with its output kept.

A start's four files (the logs, the index, the record) come from a pool of empty files that
the writer thread makes ahead (:mod:`jobworker.storepool`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jobworker._dirlock import lock_directory
from jobworker.errors import HostError
from jobworker.limits import IOLimit, Limits
from jobworker.outlog import ERR, IDX, LogFiles, LogPaths, repair
from jobworker.spec import JobSpec, JobState, JobStatus, Network, Sandbox, TerminalSize, Usage
from jobworker.storepool import FilePool

RECORD = ".json"
LOG = ".log"
TMP = ".json.tmp"
_VERSION = 1
UNKNOWN_COMMAND = "<unknown>"
"""argv[0] of a job recovered from a log whose record could not be read."""

log = logging.getLogger(__name__)


_Work = Callable[[], bool]
"""A write for the writer thread; returns whether the directory must be synced after it."""
_Queued = tuple[_Work, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class Store:
    def __init__(self, state_dir: Path, *, fsync: Callable[[int], None] = os.fdatasync) -> None:
        """``fsync`` makes the final record durable (tests pass one that records its fds)."""
        self.root = state_dir
        self.jobs = state_dir / "jobs"
        self.pool = state_dir / "pool"
        self._fsync = fsync
        self._lock_fd = -1
        # One thread writes records, in the order asked: on slow disks a create+write+rename
        # takes about half a millisecond that the event loop should spend serving, and each
        # sync a millisecond or more. What is asked while it works waits in _queue, and is
        # written as one batch with one directory sync (_drain).
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobworker-store")
        self._queue: collections.deque[_Queued] = collections.deque()
        self._queue_lock = threading.Lock()
        self._draining = False
        self._pool = FilePool(self.pool, self._writer)

    def setup(self) -> None:
        """Create the state directory and lock it (flock) against a second manager."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            self.jobs.mkdir(mode=0o700, exist_ok=True)
            self.pool.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create the state directory {self.root}: {e.strerror}") from e
        self._lock_fd = lock_directory(
            self.root, f"state directory {self.root} is in use by another jobworker manager"
        )
        self._writer.submit(int).result()  # start the writer thread now, not mid-run
        self._pool.adopt()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def log_path(self, job_id: str) -> Path:
        """The job's stdout (and all its output, for a job from before streams were apart)."""
        return self.jobs / (job_id + LOG)

    def log_paths(self, job_id: str) -> LogPaths:
        base = self.jobs / job_id
        return LogPaths(self.log_path(job_id), Path(f"{base}{ERR}"), Path(f"{base}{IDX}"))

    def output_size(self, job_id: str) -> int:
        """Bytes of output on disk (both streams)."""
        size = 0
        paths = self.log_paths(job_id)
        for path in (paths.out, paths.err):
            with contextlib.suppress(OSError):
                size += path.stat().st_size
        return size

    def repair(self, job_id: str) -> None:
        """Index what a job wrote but a crash left unindexed (see :func:`outlog.repair`)."""
        try:
            repair(self.log_paths(job_id))
        except OSError as e:
            log.warning("job %s: its output index could not be repaired: %s", job_id, e)

    def record_path(self, job_id: str) -> Path:
        return self.jobs / (job_id + RECORD)

    def create(self, job_id: str) -> LogFiles:
        """Create the job's logs and index and open them for writing."""
        fds: list[int] = []
        paths = self.log_paths(job_id)
        try:
            for path in (paths.out, paths.err, paths.idx):
                fds.append(self._pool.open_new(path))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise HostError(f"cannot create the job's log {path}: {e.strerror}") from e
        return LogFiles(*fds)

    def remove(self, job_id: str) -> None:
        """Remove an ended job's record and log, for good (the directory is fsynced)."""
        self.discard(job_id)
        try:
            self._sync_dir()
        except OSError as e:
            raise HostError(f"cannot sync {self.jobs} after removing job {job_id}: {e}") from e

    async def remove_async(self, job_id: str) -> None:
        """:meth:`remove` on the writer thread, in order with the records it writes (the
        directory sync shared with its batch)."""
        await self._enqueue(functools.partial(self._discard_batched, job_id))

    def _discard_batched(self, job_id: str) -> bool:
        self.discard(job_id)
        return True

    def discard(self, job_id: str) -> None:
        """Remove everything of a job that never started."""
        for suffix in (LOG, ERR, IDX, RECORD, TMP):
            with contextlib.suppress(FileNotFoundError):
                (self.jobs / (job_id + suffix)).unlink()

    def save(self, spec: JobSpec, status: JobStatus, *, new: bool = False) -> None:
        """Write the record: ``new`` creates it in place (one cut short by a crash reads as a
        start that never completed); otherwise it is replaced atomically. The record of an
        ended job is durable when this returns: the log, the record and the directory are
        synced."""
        if self._write(spec, status, new):
            try:
                self._sync_dir()
            except OSError as e:
                raise HostError(f"cannot write the record of job {status.id}: {e.strerror}") from e

    def _write(self, spec: JobSpec, status: JobStatus, new: bool) -> bool:
        """:meth:`save` but the directory sync; returns whether one is needed."""
        data = json.dumps(
            {"version": _VERSION, "spec": spec_to_dict(spec), **status_to_dict(status)}
        )
        final = self.record_path(status.id)
        path = final if new else self.jobs / (status.id + TMP)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_TRUNC
        durable = status.state.ended
        try:
            if durable:
                self._sync_log(status.id)
            fd = self._pool.open_new(path) if new else os.open(path, flags, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
                if durable:
                    f.flush()
                    self._fsync(f.fileno())
            if not new:
                os.replace(path, final)
        except OSError as e:
            raise HostError(f"cannot write the record of job {status.id}: {e.strerror}") from e
        return durable

    def _sync_log(self, job_id: str) -> None:
        paths = self.log_paths(job_id)
        for path in (paths.out, paths.err, paths.idx):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                # An empty file has no data to sync; that it exists is made durable by the
                # directory sync that follows (on a journaling file system such as ext4 or
                # xfs, with its inode: created long before, in an earlier transaction).
                if os.fstat(fd).st_size:
                    self._fsync(fd)
            finally:
                os.close(fd)

    def _sync_dir(self) -> None:
        """The renamed record's (and the log's) directory entry."""
        fd = os.open(self.jobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    async def save_async(self, spec: JobSpec, status: JobStatus, *, new: bool = False) -> None:
        """:meth:`save` in the store's writer thread; records are written in call order, and
        an ended job's is durable when this returns."""
        await self._enqueue(functools.partial(self._write, spec, status, new))

    def _enqueue(self, work: _Work) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._queue_lock:
            self._queue.append((work, loop, fut))
            idle = not self._draining
            self._draining = True
        if idle:
            try:
                self._writer.submit(self._drain)
            except BaseException:
                with self._queue_lock:
                    self._queue.clear()
                    self._draining = False
                raise
        return fut

    def _drain(self) -> None:
        """The writer thread: everything queued, batch after batch, until the queue is empty.
        A batch's directory sync comes after all its renames and removals and before any of
        its futures is resolved."""
        while True:
            with self._queue_lock:
                batch = list(self._queue)
                self._queue.clear()
                if not batch:
                    self._draining = False
                    return
            results: list[BaseException | None] = []
            synced: list[int] = []
            for i, (work, _loop, _fut) in enumerate(batch):
                try:
                    if work():
                        synced.append(i)
                    results.append(None)
                except BaseException as e:  # handed to the caller
                    results.append(e)
            if synced:
                try:
                    self._sync_dir()
                except OSError as e:
                    for i in synced:
                        results[i] = HostError(f"cannot sync {self.jobs}: {e.strerror}")
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], Any]]] = {}
            for (_work, loop, fut), result in zip(batch, results, strict=True):
                by_loop.setdefault(loop, []).append((fut, result))
            for loop, settled in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, settled)

    def load_all(self) -> Iterator[tuple[JobSpec, JobStatus]]:
        """Every job with a log. One whose record is missing or unreadable (a start record
        cut short, a disk error) is yielded as ``lost``, its log kept, and that lost record is
        written in place of the bad one. Temp files of an interrupted replace are removed (the
        record they were to replace is still there). No log is ever removed here."""
        try:
            names = sorted(os.listdir(self.jobs))
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(TMP):
                with contextlib.suppress(FileNotFoundError):
                    (self.jobs / name).unlink()
                continue
            if not name.endswith(LOG):
                continue
            job_id = name.removesuffix(LOG)
            raw: object = None
            try:
                text = self.record_path(job_id).read_bytes()
            except FileNotFoundError:
                problem = "the job's record is missing"
            except OSError as e:
                problem = f"the job's record could not be read ({e.strerror})"
            else:
                try:
                    raw = json.loads(text)
                    loaded = _from_record(raw)
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    problem = f"the job's record is unreadable ({type(e).__name__}: {e})"
                else:
                    yield loaded
                    continue
            yield self._lost(job_id, problem, raw)

    def _lost(self, job_id: str, problem: str, raw: object) -> tuple[JobSpec, JobStatus]:
        """A lost job for a log without a usable record: what the record still tells (owner,
        command, start time) if it parsed at all, the log's size as its output."""
        salvage: dict[str, Any] = raw if isinstance(raw, dict) else {}
        owner = salvage.get("owner")
        owner = owner if isinstance(owner, str) else ""
        argv: tuple[str, ...] = (UNKNOWN_COMMAND,)
        if isinstance(salvage.get("argv"), list) and all(
            isinstance(a, str) for a in salvage["argv"]
        ):
            argv = tuple(salvage["argv"]) or argv
        try:
            spec = JobSpec(argv=argv, owner=owner)
        except ValueError:
            spec = JobSpec(argv=(UNKNOWN_COMMAND,))
        self.repair(job_id)
        size = self.output_size(job_id)
        try:
            mtime = datetime.fromtimestamp(self.log_path(job_id).stat().st_mtime, UTC)
        except OSError:
            mtime = datetime.now(UTC)
        try:
            started_at = datetime.fromisoformat(salvage["started_at"])
        except (KeyError, TypeError, ValueError):
            started_at = mtime  # unknown: the log's last write stands in
        status = JobStatus(
            id=job_id,
            state=JobState.LOST,
            argv=spec.argv,
            owner=spec.owner,
            pid=0,
            started_at=started_at,
            ended_at=datetime.now(UTC),
            reason=f"{problem}; found at restart, its output is kept",
            output_bytes=size,
        )
        try:
            self.save(spec, status)
        except HostError as e:
            log.warning("job %s: %s", job_id, e)
        return spec, status


def _settle(settled: list[tuple[asyncio.Future[None], BaseException | None]]) -> None:
    for fut, error in settled:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _from_record(raw: Any) -> tuple[JobSpec, JobStatus]:
    return spec_from_dict(raw["spec"]), status_from_dict(raw)


_LIMIT_FIELDS = tuple(f.name for f in fields(Limits) if f.name != "io")
_IO_FIELDS = tuple(f.name for f in fields(IOLimit))
_USAGE_FIELDS = tuple(f.name for f in fields(Usage))
# Hand-written rather than dataclasses.asdict: asdict deep-copies, and records are written on
# every start and end (it showed in the churn profile).


def _limits_to_dict(limits: Limits) -> dict[str, Any]:
    d: dict[str, Any] = {n: getattr(limits, n) for n in _LIMIT_FIELDS}
    d["io"] = [{n: getattr(x, n) for n in _IO_FIELDS} for x in limits.io]
    return d


def _limits_from_dict(raw: dict[str, Any]) -> Limits:
    io = tuple(IOLimit(**x) for x in raw.get("io", ()))
    return Limits(**{**raw, "io": io})


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    return {
        "argv": list(spec.argv),
        "env": dict(spec.env),
        "cwd": spec.cwd,
        "owner": spec.owner,
        "limits": _limits_to_dict(spec.limits),
        "sandbox": None if spec.sandbox is None else {"network": spec.sandbox.network.value},
        "timeout": spec.timeout,
        "stdin": spec.stdin,
        "terminal": None if spec.terminal is None else [spec.terminal.rows, spec.terminal.cols],
    }


def spec_from_dict(raw: dict[str, Any]) -> JobSpec:
    return JobSpec(
        argv=tuple(raw["argv"]),
        env=raw["env"],
        cwd=raw["cwd"],
        owner=raw["owner"],
        limits=_limits_from_dict(raw["limits"]),
        sandbox=None if raw.get("sandbox") is None else Sandbox(Network(raw["sandbox"]["network"])),
        timeout=raw.get("timeout"),
        stdin=bool(raw.get("stdin", False)),
        terminal=None if raw.get("terminal") is None else TerminalSize(*raw["terminal"]),
    )


def status_to_dict(status: JobStatus) -> dict[str, Any]:
    usage = status.usage
    return {
        "id": status.id,
        "state": status.state.value,
        "argv": list(status.argv),
        "owner": status.owner,
        "pid": status.pid,
        "started_at": status.started_at.isoformat(),
        "ended_at": status.ended_at.isoformat() if status.ended_at else None,
        "exit_code": status.exit_code,
        "signal": status.signal,
        "reason": status.reason,
        "oom_killed": status.oom_killed,
        "limits": _limits_to_dict(status.limits),
        "usage": {n: getattr(usage, n) for n in _USAGE_FIELDS} if usage else None,
        "output_bytes": status.output_bytes,
    }


def status_from_dict(raw: dict[str, Any]) -> JobStatus:
    return JobStatus(
        id=raw["id"],
        state=JobState(raw["state"]),
        argv=tuple(raw["argv"]),
        owner=raw["owner"],
        pid=raw["pid"],
        started_at=datetime.fromisoformat(raw["started_at"]),
        ended_at=datetime.fromisoformat(raw["ended_at"]) if raw["ended_at"] else None,
        exit_code=raw["exit_code"],
        signal=raw["signal"],
        reason=raw["reason"],
        oom_killed=raw["oom_killed"],
        limits=_limits_from_dict(raw["limits"]),
        usage=Usage(**raw["usage"]) if raw["usage"] else None,
        output_bytes=raw["output_bytes"],
    )
