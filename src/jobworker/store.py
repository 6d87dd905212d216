"""Job records on disk: ``STATE/jobs/<id>/record.json`` beside ``output.log``.

A record is rewritten atomically (temp file + rename) when the job starts and when it ends, so
after any crash each record is either the running one or the final one. Everything is 0600 in
0700 directories: jobs and other users cannot read other jobs' output or specs.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from jobworker.errors import HostError
from jobworker.limits import IOLimit, Limits
from jobworker.spec import JobSpec, JobState, JobStatus, Usage

RECORD = "record.json"
LOG = "output.log"
_VERSION = 1


class Store:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.jobs = state_dir / "jobs"

    def setup(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.root, 0o700)
            self.jobs.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise HostError(f"cannot create the state directory {self.root}: {e.strerror}") from e

    def job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def log_path(self, job_id: str) -> Path:
        return self.jobs / job_id / LOG

    def create(self, job_id: str) -> int:
        """Make the job's directory and open its new log for writing; returns the fd."""
        d = self.job_dir(job_id)
        try:
            d.mkdir(mode=0o700)
            return os.open(d / LOG, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as e:
            self.discard(job_id)
            raise HostError(f"cannot create the job's log in {d}: {e.strerror}") from e

    def discard(self, job_id: str) -> None:
        """Remove everything of a job that never started."""
        d = self.job_dir(job_id)
        for name in (LOG, RECORD, RECORD + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()

    def save(self, spec: JobSpec, status: JobStatus) -> None:
        d = self.job_dir(status.id)
        tmp = d / (RECORD + ".tmp")
        data = json.dumps(
            {"version": _VERSION, "spec": spec_to_dict(spec), **status_to_dict(status)}
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(data)
            os.replace(tmp, d / RECORD)
        except OSError as e:
            raise HostError(f"cannot write the record of job {status.id}: {e.strerror}") from e

    def load_all(self) -> Iterator[tuple[JobSpec, JobStatus]]:
        """Every readable record; a directory without one (a start that crashed) is removed."""
        try:
            entries = sorted(self.jobs.iterdir())
        except FileNotFoundError:
            return
        for d in entries:
            with contextlib.suppress(FileNotFoundError):
                (d / (RECORD + ".tmp")).unlink()
            try:
                raw = json.loads((d / RECORD).read_text())
            except FileNotFoundError:
                self.discard(d.name)
                continue
            except (OSError, ValueError) as e:
                raise HostError(f"unreadable job record {d / RECORD}: {e}") from e
            yield spec_from_dict(raw["spec"]), status_from_dict(raw)


def _limits_from_dict(raw: dict[str, Any]) -> Limits:
    io = tuple(IOLimit(**x) for x in raw.get("io", ()))
    return Limits(**{**raw, "io": io})


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    return {
        "argv": list(spec.argv),
        "env": dict(spec.env),
        "cwd": spec.cwd,
        "owner": spec.owner,
        "limits": asdict(spec.limits),
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
    d = asdict(status)
    d["state"] = status.state.value
    d["started_at"] = status.started_at.isoformat()
    d["ended_at"] = status.ended_at.isoformat() if status.ended_at else None
    return d


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
