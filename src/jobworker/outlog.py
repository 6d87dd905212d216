"""A job's output on disk: its stdout, its stderr, and the receive index that interleaves them.

Three files per job, beside its record:

``<id>.log``
    The job's stdout, byte for byte (the name every earlier version used for the one log of
    stdout and stderr together: such a log, with no index beside it, reads as stdout).
``<id>.err``
    Its stderr, byte for byte.
``<id>.idx``
    The receive index: one fixed-size :data:`RECORD` per batch of bytes the daemon took from
    one stream (a pump wake-up: up to ``BATCH_SPLICES`` splices), in the order it took them:
    when (µs since the epoch, UTC, never decreasing), how many bytes of each stream came
    before, how many bytes, which stream. It is the log's framing, kept out of band so both
    byte files stay plain (spliced, never copied through Python, readable with ``cat``).

Offsets. The *merged* view is every byte of both streams in the order received; its offset
counts the bytes of both streams before (``out_off + err_off`` of a record). The *stdout* and
*stderr* views are one stream's bytes; their offsets are byte offsets in that file. A chunk's
offset is always in the view it was read from, so a reader resumes in the same view with the
offset after its last byte, with no loss or repetition.

Lookups. The records are fixed-size and every field that a lookup keys on (either stream's
offset, the merged offset, the time) never decreases along the file, so finding where an
offset or a time falls is a binary search of O(log n) record reads; ``tail`` reads the view
backwards from its end. Nothing ever reads a log from its start to answer an offset, a time
or a tail, however large the log: reads are O(log records + what is sent + the lines
counted).
"""

from __future__ import annotations

import contextlib
import enum
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

OUT = ".log"
ERR = ".err"
IDX = ".idx"
SUFFIXES = (OUT, ERR, IDX)

RECORD = struct.Struct("<QQQIB3x")
"""time_us, out_off, err_off, length, stream: 32 bytes."""
BLOCK_RECORDS = 128
"""Records per index read (4 KiB)."""
TAIL_BLOCK = 64 * 1024
"""Bytes per backward read while counting lines for a tail."""


@dataclass(frozen=True, slots=True)
class LogPaths:
    out: Path
    err: Path
    idx: Path


@dataclass(frozen=True, slots=True)
class LogFiles:
    """A job's three files, open for writing: its stdout, its stderr, its receive index."""

    out: int
    err: int
    idx: int

    def close(self) -> None:
        for fd in (self.out, self.err, self.idx):
            with contextlib.suppress(OSError):
                os.close(fd)


class Stream(enum.IntEnum):
    STDOUT = 1
    STDERR = 2


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes of one stream, as read from a view: ``offset`` is data[0]'s offset in that view
    (the merged one when no stream was asked for); ``time_us`` is when the daemon received
    data[0] (µs since the epoch, UTC)."""

    offset: int
    data: bytes
    stream: Stream
    time_us: int


@dataclass(frozen=True, slots=True)
class Run:
    """One index record: ``length`` bytes of ``stream`` received at ``time_us``, after
    ``out_off`` bytes of stdout and ``err_off`` of stderr."""

    time_us: int
    out_off: int
    err_off: int
    length: int
    stream: Stream

    def pack(self) -> bytes:
        return RECORD.pack(self.time_us, self.out_off, self.err_off, self.length, self.stream)

    @property
    def file_off(self) -> int:
        """Offset of the run's first byte in its stream's file."""
        return self.out_off if self.stream is Stream.STDOUT else self.err_off

    def start(self, view: Stream | None) -> int:
        """Offset in ``view`` of the first byte of ``view`` at or after this run's start."""
        if view is None:
            return self.out_off + self.err_off
        return self.out_off if view is Stream.STDOUT else self.err_off

    def end(self, view: Stream | None) -> int:
        """Offset in ``view`` just after this run (for a run of the other stream: its start)."""
        if view is None or view is self.stream:
            return self.start(view) + self.length
        return self.start(view)


def unpack(data: bytes, at: int = 0) -> Run:
    t, o, e, n, s = RECORD.unpack_from(data, at)
    return Run(t, o, e, n, Stream(s) if s in (1, 2) else Stream.STDOUT)


class Index:
    """The records of one job's index, read through an fd with a one-block cache.

    ``count`` is how many records may be read (a running job's: what its pump has published).
    A log with no index file (written before streams were kept apart) reads as one record
    covering the whole file as stdout, at the file's modification time."""

    def __init__(self, fd: int, count: int, legacy: Run | None = None) -> None:
        self._fd = fd
        self.count = count if legacy is None else 1
        self._legacy = legacy
        self._block = -1
        self._valid = 0
        self._data = b""
        self.newest: Run | None = None
        """Record ``count - 1`` when known without reading the file (a running job's pump
        publishes it with the count): set it together with ``count``."""

    def get(self, i: int) -> Run:
        if self._legacy is not None:
            return self._legacy
        if i == self.count - 1 and self.newest is not None:
            return self.newest
        block, at = divmod(i, BLOCK_RECORDS)
        # Only records below the count when the block was read are trusted: the file goes on
        # past them (zeros allocated ahead, records written since).
        if block != self._block or at >= self._valid:
            size = BLOCK_RECORDS * RECORD.size
            self._data = os.pread(self._fd, size, block * size)
            self._block = block
            self._valid = min(len(self._data) // RECORD.size, self.count - block * BLOCK_RECORDS)
        if at >= self._valid:
            raise OSError(f"the job's output index ends before record {i}")
        return unpack(self._data, at * RECORD.size)

    def last(self) -> Run | None:
        return self.get(self.count - 1) if self.count else None

    def end(self, view: Stream | None) -> int:
        """The view's size: its offset after the last record."""
        last = self.last()
        return 0 if last is None else last.end(view)

    def bisect(self, key: Callable[[Run], int], value: int) -> int:
        """The first record whose ``key`` is greater than ``value`` (``count`` if none); the
        key must never decrease along the index."""
        lo, hi = 0, self.count
        while lo < hi:
            mid = (lo + hi) // 2
            if key(self.get(mid)) > value:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def find(self, view: Stream | None, offset: int) -> int:
        """The record holding ``view``'s byte at ``offset`` (``count`` at or past the end)."""
        return self.bisect(lambda r: r.end(view), offset)

    def since(self, view: Stream | None, time_us: int) -> int:
        """The view's offset of the first byte received at or after ``time_us``."""
        i = self.bisect(lambda r: r.time_us, time_us - 1)
        return self.end(view) if i >= self.count else self.get(i).start(view)


def tail_start(
    index: Index, view: Stream | None, lines: int, fds: dict[Stream, int], end: int | None = None
) -> int:
    """The view's offset where its last ``lines`` lines begin (a last line without its
    ``\\n`` counts as one), reading backwards from the view's end ``end`` (default: the end
    of the index): only the bytes of those lines are read, and the index records they span."""
    end = index.end(view) if end is None else end
    if lines <= 0 or end == 0:
        return end
    need = lines
    first = True
    for vstart, fd, fstart, length in _segments_back(index, view, fds, end):
        pos = length
        while pos > 0:
            k = min(TAIL_BLOCK, pos)
            pos -= k
            block = os.pread(fd, k, fstart + pos)
            if len(block) != k:
                return 0  # the file is shorter than its index says: show it all
            hi = k
            if first:
                first = False
                if block.endswith(b"\n"):
                    hi -= 1  # the last line's own end
            while True:
                at = block.rfind(b"\n", 0, hi)
                if at < 0:
                    break
                need -= 1
                if need == 0:
                    return vstart + pos + at + 1
                hi = at
    return 0


def _segments_back(
    index: Index, view: Stream | None, fds: dict[Stream, int], end: int
) -> Iterator[tuple[int, int, int, int]]:
    """``(view offset, fd, file offset, length)`` of the view's bytes before ``end``, last
    first: one segment for a one-stream view, one per record for the merged view."""
    if view is not None:
        if view in fds:
            yield 0, fds[view], 0, end
        return
    i = index.find(None, end - 1)
    while i >= 0:
        run = index.get(i)
        start = run.start(None)
        length = min(run.length, end - start)
        if length > 0 and run.stream in fds:
            yield start, fds[run.stream], run.file_off, length
        i -= 1


def repair(paths: LogPaths) -> None:
    """After a crash: cut a record the crash left half-written and the zeros allocated ahead
    (a record's length is never 0), and index the bytes written to
    a stream's file after its last record (one record per stream, at the file's modification
    time), so that none of what the job wrote is lost to the views. A log without an index
    (from before streams were apart) is left as it is."""
    try:
        fd = os.open(paths.idx, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        whole = size - size % RECORD.size
        count = whole // RECORD.size
        while count and unpack(os.pread(fd, RECORD.size, (count - 1) * RECORD.size)).length == 0:
            count -= 1
        if count * RECORD.size != size:
            os.ftruncate(fd, count * RECORD.size)
        last = unpack(os.pread(fd, RECORD.size, (count - 1) * RECORD.size)) if count else None
        ends = {s: 0 if last is None else last.end(s) for s in Stream}
        time_us = 0 if last is None else last.time_us
        for stream, path in ((Stream.STDOUT, paths.out), (Stream.STDERR, paths.err)):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            if st.st_size > ends[stream]:
                time_us = max(time_us, st.st_mtime_ns // 1000)
                run = Run(
                    time_us,
                    ends[Stream.STDOUT],
                    ends[Stream.STDERR],
                    st.st_size - ends[stream],
                    stream,
                )
                os.pwrite(fd, run.pack(), count * RECORD.size)
                count += 1
                ends[stream] = st.st_size
    finally:
        os.close(fd)
