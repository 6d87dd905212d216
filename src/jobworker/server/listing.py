"""List's responses, built from each job's status as it was last sent (:class:`Listing`).

An ended job's status never changes again, and a daemon may retain 100 000 of them: a page of
500 must not convert 500 statuses to messages and serialize them again at every call. So each
job's status is kept as the bytes it takes on the wire as one element of
``ListResponse.jobs``, and a page is the concatenation of its jobs' bytes. Protocol buffers
define concatenated encodings to parse as one message whose repeated fields hold the elements
of each part in order, so the page is parsed back by protobuf itself (one C call), and
nothing here encodes by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from jobworker.api import convert
from jobworker.api.proto import pb
from jobworker.spec import JobState, JobStatus

KEPT_AT_LEAST = 4096
"""Entries kept before the first sweep for jobs that have gone (retention, rm)."""


class Listing:
    """Each listed job's wire form, for as long as the job is there.

    ``known(job_id)`` says whether the daemon still has the job. Entries of jobs that have
    gone are swept once the table has doubled since the last sweep, so the table never holds
    more than twice the listed jobs that remain (or :data:`KEPT_AT_LEAST`), and sweeping costs
    O(1) per entry added, amortized.
    """

    __slots__ = ("_entries", "_known", "_sweep_at")

    def __init__(self, known: Callable[[str], bool]) -> None:
        self._known = known
        self._entries: dict[str, tuple[JobStatus, pb.JobStatus | None, bytes]] = {}
        """id -> (the status encoded, its message while it runs, its bytes)."""
        self._sweep_at = KEPT_AT_LEAST

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._entries

    def response(self, statuses: Iterable[JobStatus], next_page_token: str = "") -> pb.ListResponse:
        response = pb.ListResponse.FromString(b"".join(map(self.wire, statuses)))
        if next_page_token:
            response.next_page_token = next_page_token
        return response

    def wire(self, status: JobStatus) -> bytes:
        """``status`` encoded as one element of ``ListResponse.jobs``."""
        entry = self._entries.get(status.id)
        if entry is not None:
            old, msg, wire = entry
            if old is status:
                return wire
            if msg is not None and old.state is status.state is JobState.RUNNING:
                # A running job's listing changes only in the bytes it has written so far.
                if msg.output_bytes == status.output_bytes:
                    return wire
                msg.output_bytes = status.output_bytes
                return self._keep(status, msg)
        return self._keep(status, convert.status_to_pb(status))

    def _keep(self, status: JobStatus, msg: pb.JobStatus) -> bytes:
        wire = pb.ListResponse(jobs=[msg]).SerializeToString()
        # An ended job's message is not needed again: its bytes are the whole entry.
        running = status.state is JobState.RUNNING
        self._entries[status.id] = (status, msg if running else None, wire)
        if len(self._entries) > self._sweep_at:
            self._sweep()
        return wire

    def _sweep(self) -> None:
        gone = [job_id for job_id in self._entries if not self._known(job_id)]
        for job_id in gone:
            del self._entries[job_id]
        self._sweep_at = max(KEPT_AT_LEAST, 2 * len(self._entries))
