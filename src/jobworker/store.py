"""Job records on disk: ``STATE/jobs/<id>.json`` beside ``STATE/jobs/<id>.log``.

The record is created when the job starts and replaced atomically (temp file + rename) when it
ends, so after any crash each record is either the running one or the final one. Flat files, no
directory per job: on slow disks every metadata operation shows in the start latency.
Everything is 0600 in a 0700 directory: jobs and other users cannot read other jobs' output or
specs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any

from jobworker._dirlock import lock_directory
from jobworker.errors import HostError
from jobworker.limits import IOLimit, Limits
from jobworker.spec import JobSpec, JobState, JobStatus, Usage

RECORD = ".json"
LOG = ".log"
TMP = ".json.tmp"
_VERSION = 1


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.jobs = state_dir / "jobs"
        self._lock_fd = -1
        # One thread writes records, in the order asked: on slow disks a create+write+rename
        # takes about half a millisecond that the event loop should spend serving.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobworker-store")

    def setup(self) -> None:
        """Create the state directory and lock it (flock) against a second manager."""
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            self.jobs.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create the state directory {self.root}: {e.strerror}") from e
        self._lock_fd = lock_directory(
            self.root, f"state directory {self.root} is in use by another jobworker manager"
        )
        self._writer.submit(int).result()  # start the writer thread now, not mid-run

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def log_path(self, job_id: str) -> Path:
        return self.jobs / (job_id + LOG)

    def record_path(self, job_id: str) -> Path:
        return self.jobs / (job_id + RECORD)

    def create(self, job_id: str) -> int:
        """Create the job's log and open it for writing; returns the fd."""
        path = self.log_path(job_id)
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise HostError(f"cannot create the job's log {path}: {e.strerror}") from e

    def discard(self, job_id: str) -> None:
        """Remove everything of a job that never started."""
        for suffix in (LOG, RECORD, TMP):
            with contextlib.suppress(FileNotFoundError):
                (self.jobs / (job_id + suffix)).unlink()

    def save(self, spec: JobSpec, status: JobStatus, *, new: bool = False) -> None:
        """Write the record: ``new`` creates it in place (one cut short by a crash reads as a
        start that never completed); otherwise it is replaced atomically."""
        data = json.dumps(
            {"version": _VERSION, "spec": spec_to_dict(spec), **status_to_dict(status)}
        )
        final = self.record_path(status.id)
        path = final if new else self.jobs / (status.id + TMP)
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if new else os.O_TRUNC)
        try:
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
            if not new:
                os.replace(path, final)
        except OSError as e:
            raise HostError(f"cannot write the record of job {status.id}: {e.strerror}") from e

    async def save_async(self, spec: JobSpec, status: JobStatus, *, new: bool = False) -> None:
        """:meth:`save` in the store's writer thread; records are written in call order."""
        await asyncio.get_running_loop().run_in_executor(
            self._writer, functools.partial(self.save, spec, status, new=new)
        )

    def load_all(self) -> Iterator[tuple[JobSpec, JobStatus]]:
        """Every record. A log whose record is missing or unparsable (only a start record can
        be cut short: final ones are renamed into place) is removed with it, and so are the
        temp files of an interrupted replace."""
        try:
            names = sorted(os.listdir(self.jobs))
        except FileNotFoundError:
            return
        for name in names:
            if name.endswith(TMP):
                with contextlib.suppress(FileNotFoundError):
                    (self.jobs / name).unlink()
            if not name.endswith(LOG):
                continue
            job_id = name.removesuffix(LOG)
            try:
                raw = json.loads(self.record_path(job_id).read_text())
            except (FileNotFoundError, ValueError):
                self.discard(job_id)
                continue
            except OSError as e:
                raise HostError(f"cannot read {self.record_path(job_id)}: {e.strerror}") from e
            yield spec_from_dict(raw["spec"]), status_from_dict(raw)


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
    }


def spec_from_dict(raw: dict[str, Any]) -> JobSpec:
    return JobSpec(
        argv=tuple(raw["argv"]),
        env=raw["env"],
        cwd=raw["cwd"],
        owner=raw["owner"],
        limits=_limits_from_dict(raw["limits"]),
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
