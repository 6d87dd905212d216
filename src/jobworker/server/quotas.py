"""Per-identity quotas: running jobs, open Logs/Wait streams, starts per second; and a reserve
of file descriptors no identity can take.

One :class:`Quotas` per daemon, used by :mod:`jobworker.server.service`. Every refusal is
:class:`~jobworker.errors.ResourceExhausted` with a message that names the quota and the
current use. Every slot taken is given back on every way out of its call (a context manager
for streams, a callback on the job's end for running jobs).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from jobworker.errors import InvalidArgument, ResourceExhausted

FD_RESERVE_FRACTION = 0.10
FD_RESERVE_MIN = 256
"""Of RLIMIT_NOFILE, what streams may not use, whoever asks: room for the daemon's own files,
new connections and the job starts (pipes, log files, cgroup fds)."""
FD_MEASURE_SECONDS = 0.1
FD_MEASURE_SLACK = 64
"""Counting /proc/self/fd costs O(open fds): a count is reused for up to FD_MEASURE_SECONDS,
plus one per stream opened since, unless that estimate comes within FD_MEASURE_SLACK of the
reserve, where every stream counts afresh."""
MAX_BUCKETS = 4096
"""Identities' start buckets kept; past it, full (idle) buckets are forgotten."""


def open_fds() -> int:
    """This process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


def fd_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fd_reserve(limit: int) -> int:
    return max(FD_RESERVE_MIN, math.ceil(limit * FD_RESERVE_FRACTION))


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class Quotas:
    """``None`` turns a quota off. ``clock`` (seconds, monotonic) drives the start buckets;
    ``open_fds`` and ``fd_limit`` measure the descriptor reserve (both injectable for tests).
    """

    max_running: int | None = None
    max_streams: int | None = None
    max_starts_per_second: float | None = None
    clock: Callable[[], float] = time.monotonic
    open_fds: Callable[[], int] = open_fds
    fd_limit: Callable[[], int] = fd_limit
    _running: dict[str, int] = field(default_factory=dict)
    _streams: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _fds_measured: int = 0
    _fds_at: float = -math.inf
    _opened_since: int = 0

    def __post_init__(self) -> None:
        for flag, value in (
            ("--max-running-per-user", self.max_running),
            ("--max-streams-per-user", self.max_streams),
        ):
            if value is not None and value < 1:
                raise InvalidArgument(f"{flag} must be at least 1, got {value}")
        rate = self.max_starts_per_second
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise InvalidArgument(
                f"--max-starts-per-second-per-user must be a positive number, got {rate}"
            )

    # -- running jobs ----------------------------------------------------------------------

    def running(self, identity: str) -> int:
        return self._running.get(identity, 0)

    def take_running(self, identity: str) -> bool:
        """Count one more running job of ``identity``, or raise :class:`ResourceExhausted`.
        Returns whether anything was counted (``False``: the quota is off, nothing to give
        back); the caller gives it back with :meth:`release_running` when the job has ended,
        or at once if its start failed."""
        if self.max_running is None:
            return False
        used = self._running.get(identity, 0)
        if used >= self.max_running:
            raise ResourceExhausted(
                f"{identity} has {used} running jobs, the most --max-running-per-user allows; "
                "stop one or wait for one to end"
            )
        self._running[identity] = used + 1
        return True

    def release_running(self, identity: str) -> None:
        _decrement(self._running, identity)

    # -- starts per second -----------------------------------------------------------------

    def take_start(self, identity: str) -> None:
        """One start of ``identity`` from its token bucket (up to ``max(1, rate)`` at once,
        then ``rate`` per second), or raise :class:`ResourceExhausted`."""
        rate = self.max_starts_per_second
        if rate is None:
            return
        burst = max(1.0, rate)
        now = self.clock()
        bucket = self._buckets.get(identity)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full_buckets(now, rate, burst)
            bucket = self._buckets[identity] = _Bucket(burst, now)
        else:
            bucket.tokens = min(burst, bucket.tokens + max(0.0, now - bucket.at) * rate)
            bucket.at = now
        if bucket.tokens < 1.0:
            wait = (1.0 - bucket.tokens) / rate
            raise ResourceExhausted(
                f"{identity} is starting jobs faster than --max-starts-per-second-per-user "
                f"{rate:g} allows; retry in {wait:.2g} s"
            )
        bucket.tokens -= 1.0

    def _forget_full_buckets(self, now: float, rate: float, burst: float) -> None:
        for name, b in list(self._buckets.items()):
            if b.tokens + (now - b.at) * rate >= burst:
                del self._buckets[name]

    # -- streams ---------------------------------------------------------------------------

    def streams(self, identity: str) -> int:
        return self._streams.get(identity, 0)

    @contextlib.contextmanager
    def stream(self, identity: str, method: str) -> Iterator[None]:
        """Hold one of ``identity``'s streams for the ``with`` block; raises
        :class:`ResourceExhausted` if it has its quota open already, or if the daemon's open
        fds have reached the reserve (whoever asks)."""
        used = self._streams.get(identity, 0)
        if self.max_streams is not None and used >= self.max_streams:
            raise ResourceExhausted(
                f"{identity} has {used} Logs/Wait streams open, the most "
                f"--max-streams-per-user allows; close one first ({method} refused)"
            )
        limit = self.fd_limit()
        reserve = fd_reserve(limit)
        in_use = self._fds_in_use(limit - reserve)
        if in_use >= limit - reserve:
            raise ResourceExhausted(
                f"the daemon has {in_use} of its {limit} file descriptors open and keeps "
                f"{reserve} in reserve, so no stream can be opened now ({method} refused); "
                "retry later"
            )
        self._streams[identity] = used + 1
        self._opened_since += 1
        try:
            yield
        finally:
            _decrement(self._streams, identity)

    def _fds_in_use(self, threshold: int) -> int:
        now = self.clock()
        estimate = self._fds_measured + self._opened_since
        if now - self._fds_at >= FD_MEASURE_SECONDS or estimate >= threshold - FD_MEASURE_SLACK:
            self._fds_measured, self._fds_at, self._opened_since = self.open_fds(), now, 0
        return self._fds_measured + self._opened_since


def _decrement(counts: dict[str, int], identity: str) -> None:
    left = counts.get(identity, 0) - 1
    if left > 0:
        counts[identity] = left
    else:
        counts.pop(identity, None)
