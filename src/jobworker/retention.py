"""Retention: which ended jobs a long-running manager forgets, and when.

A manager that runs for months must not keep every job it ever ran: each ended job costs a
record, a log on disk and a little memory. :class:`Retention` is the policy (any limit may be
``None``, meaning none); :class:`RetentionIndex` is the bookkeeping, kept up to date as jobs end
and are removed, so that picking what to remove costs O(1) per job removed, never a scan of
every job:

* ended jobs in one ordered dict, oldest end first (jobs end in time order; recovered ones are
  added sorted by their end before any new one ends);
* per owner, the same order and the total of their logs' bytes.

Limits, each applied oldest end first:

``max_jobs`` (reason ``count``)
    At most this many ended jobs are kept.
``max_age`` (reason ``age``)
    A job that ended longer ago than this is removed (checked when a job ends and on the
    manager's periodic sweep, every ``sweep_interval`` seconds).
``max_log_bytes_per_owner`` (reason ``log_bytes``)
    The ended jobs of one owner keep at most this many bytes of logs between them.

Running jobs are never counted nor removed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

AGE = "age"
COUNT = "count"
LOG_BYTES = "log_bytes"
REASONS = (AGE, COUNT, LOG_BYTES)
"""Why a job was removed: the values of :attr:`Removal.reason`."""

DEFAULT_SWEEP_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class Retention:
    """How many ended jobs, how old and how many log bytes per owner a manager keeps."""

    max_age: timedelta | None = None
    max_jobs: int | None = None
    max_log_bytes_per_owner: int | None = None
    sweep_interval: float = DEFAULT_SWEEP_INTERVAL
    """Seconds between the manager's sweeps for jobs past ``max_age``."""

    def __post_init__(self) -> None:
        if self.max_age is not None and self.max_age <= timedelta(0):
            raise ValueError("max_age must be positive")
        if self.max_jobs is not None and self.max_jobs < 1:
            raise ValueError("max_jobs must be at least 1")
        if self.max_log_bytes_per_owner is not None and self.max_log_bytes_per_owner < 1:
            raise ValueError("max_log_bytes_per_owner must be positive")
        if self.sweep_interval <= 0:
            raise ValueError("sweep_interval must be positive")


@dataclass(frozen=True, slots=True)
class Removal:
    job_id: str
    reason: str


@dataclass(slots=True)
class _Owner:
    jobs: OrderedDict[str, int] = field(default_factory=OrderedDict)
    """Job id -> log bytes, oldest end first."""
    log_bytes: int = 0


class RetentionIndex:
    """The ended jobs a manager keeps, oldest end first; see the module docstring."""

    def __init__(self, policy: Retention) -> None:
        self.policy = policy
        self._ended: OrderedDict[str, tuple[datetime, str]] = OrderedDict()
        """Job id -> (end time, owner), oldest end first."""
        self._owners: dict[str, _Owner] = {}
        self._over: set[str] = set()
        """Owners whose log bytes may be past the limit since the last :meth:`due`."""

    def __len__(self) -> int:
        return len(self._ended)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ended

    def log_bytes(self, owner: str) -> int:
        o = self._owners.get(owner)
        return o.log_bytes if o else 0

    def add(self, job_id: str, owner: str, ended_at: datetime, log_bytes: int) -> None:
        """A job has ended (call in end order; :meth:`due` then says what to remove)."""
        self.discard(job_id)
        self._ended[job_id] = (ended_at, owner)
        o = self._owners.get(owner)
        if o is None:
            o = self._owners[owner] = _Owner()
        o.jobs[job_id] = log_bytes
        o.log_bytes += log_bytes
        limit = self.policy.max_log_bytes_per_owner
        if limit is not None and o.log_bytes > limit:
            self._over.add(owner)

    def discard(self, job_id: str) -> None:
        """The job is gone (removed on request, or by :meth:`due`); O(1)."""
        entry = self._ended.pop(job_id, None)
        if entry is None:
            return
        owner = entry[1]
        o = self._owners[owner]
        o.log_bytes -= o.jobs.pop(job_id)
        if not o.jobs:
            del self._owners[owner]
            self._over.discard(owner)

    def due(self, now: datetime) -> list[Removal]:
        """The jobs to remove now, oldest end first per limit; they are dropped from the index
        (the caller removes them). Costs O(1) per job returned, plus one per owner whose logs
        grew past the limit."""
        out: list[Removal] = []
        policy = self.policy
        if policy.max_jobs is not None:
            while len(self._ended) > policy.max_jobs:
                out.append(self._pop_oldest(COUNT))
        if policy.max_age is not None:
            cutoff = now - policy.max_age
            while self._ended:
                job_id, (ended_at, _) = next(iter(self._ended.items()))
                if ended_at >= cutoff:
                    break
                out.append(self._pop(job_id, AGE))
        limit = policy.max_log_bytes_per_owner
        if limit is not None:
            for owner in list(self._over):
                o = self._owners.get(owner)
                while o is not None and o.log_bytes > limit:
                    out.append(self._pop(next(iter(o.jobs)), LOG_BYTES))
                    o = self._owners.get(owner)
        self._over.clear()
        return out

    def _pop_oldest(self, reason: str) -> Removal:
        return self._pop(next(iter(self._ended)), reason)

    def _pop(self, job_id: str, reason: str) -> Removal:
        self.discard(job_id)
        return Removal(job_id, reason)
