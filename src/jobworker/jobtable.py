"""The manager's jobs by id, with the ordered index that serves its ``list_page``."""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from datetime import UTC, datetime, timedelta

from jobworker.runtime import AnyJob, EndedJob, Job
from jobworker.spec import JobStatus

PageKey = tuple[int, str]
"""Where a job sits in :meth:`JobManager.list_page`'s order: (started_at in microseconds since
the epoch, id)."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def page_key(status: JobStatus) -> PageKey:
    started = status.started_at
    if started.tzinfo is None:
        started = started.replace(tzinfo=UTC)
    return (started - _EPOCH) // _MICROSECOND, status.id


class JobTable(dict[str, AnyJob]):
    """The manager's jobs by id, and the same ordered by :func:`page_key`, all and per owner
    (sorted lists: a page is a bisect and a slice). A job that arrives out of order (recovery
    reads records in file-name order) is appended and its list sorted once, at the next page or
    removal: a restart with 100 000 records costs one sort, not 100 000 insertions. Only
    ``[]=`` and ``del`` keep the order: the manager uses nothing else to change its jobs."""

    __slots__ = ("_by_owner", "_order", "_unsorted")

    def __init__(self) -> None:
        super().__init__()
        self._order: list[PageKey] = []
        self._by_owner: dict[str, list[PageKey]] = {}
        self._unsorted: list[list[PageKey]] = []

    def __setitem__(self, job_id: str, job: AnyJob) -> None:
        if job_id in self:
            del self[job_id]
        super().__setitem__(job_id, job)
        key = page_key(job.status)
        for keys in (self._order, self._by_owner.setdefault(job.spec.owner, [])):
            if keys and key < keys[-1] and not any(k is keys for k in self._unsorted):
                self._unsorted.append(keys)
            keys.append(key)

    def retire(self, job: Job) -> None:
        """Put the compact record of ``job``, which has ended, in its place (same id, same page
        key, same place in the table's order); nothing if it is no longer in the table."""
        if self.get(job.id) is job:
            super().__setitem__(job.id, EndedJob(job.spec, job.status))

    def _sorted(self) -> None:
        for keys in self._unsorted:
            keys.sort()
        self._unsorted.clear()

    def __delitem__(self, job_id: str) -> None:
        job = self[job_id]
        super().__delitem__(job_id)
        self._sorted()
        key = page_key(job.status)
        owned = self._by_owner[job.spec.owner]
        for keys in (self._order, owned):
            i = bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                del keys[i]
        if not owned:
            del self._by_owner[job.spec.owner]

    def page(
        self, after: PageKey | None, limit: int, owner: str | None
    ) -> tuple[list[JobStatus], PageKey | None]:
        self._sorted()
        keys = self._order if owner is None else self._by_owner.get(owner, [])
        start = 0 if after is None else bisect_right(keys, after)
        chosen = keys[start : start + limit + 1]
        more = len(chosen) > limit
        del chosen[limit:]
        return [self[k[1]].snapshot() for k in chosen], (chosen[-1] if more and chosen else None)
