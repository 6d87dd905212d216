"""Readers of a job's output: one view (both streams merged, or one of them) from an offset,
a tail or a time, now or following (the files' format: :mod:`jobworker.outlog`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobworker.errors import HostError, InvalidArgument
from jobworker.outlog import RECORD, Chunk, Index, LogPaths, Run, Stream, tail_start

if TYPE_CHECKING:  # the client reads Query from here, without the daemon's pump
    from jobworker.output import OutputPump

READ_CHUNK = 124 * 1024
"""Most bytes per read (and so per Logs message): fewer, larger messages cost the daemon less
per byte; a follower still gets small writes at once. Below 128 KiB, workerd's fixed glibc
mmap threshold (:mod:`jobworker.server.heap`): a read, its message and its serialized form
each come from the heap, reused; at 256 KiB each was a fresh mapping, faulted in page by page
and unmapped again (twice the daemon's CPU per byte followed)."""


@dataclass(frozen=True, slots=True)
class Query:
    """What to read. ``view``: ``None`` for both streams in the order received, else one
    stream. Reading starts at the latest of ``offset``, the start of the last ``tail`` lines
    and the first byte received at or after ``since_us``. ``split``: chunks never span two
    index records, so every byte of a chunk was received at its ``time_us``."""

    view: Stream | None = None
    offset: int = 0
    follow: bool = False
    tail: int | None = None
    since_us: int | None = None
    split: bool = False


def _open(path: Path, required: bool) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if required:
            raise HostError(f"cannot open the job's log {path}: it is missing") from None
        return None
    except OSError as e:
        raise HostError(f"cannot open the job's log {path}: {e.strerror}") from e


async def read_chunks(
    paths: LogPaths, pump: OutputPump | None, query: Query, chunk: int = READ_CHUNK
) -> AsyncIterator[Chunk]:
    """Chunks of one view of a job's output (see :class:`Query`).

    ``pump`` is ``None`` for a job whose output is complete. A follower of a running job ends
    right after the last byte once the job has ended. An offset past the end of an ended job's
    view is :class:`InvalidArgument`, also when a follower waited there for bytes that never
    came."""
    view = query.view
    if query.offset < 0:
        raise InvalidArgument(f"offset must be >= 0, got {query.offset}")
    if query.tail is not None and query.tail < 0:
        raise InvalidArgument(f"tail must be >= 0 lines, got {query.tail}")
    with contextlib.ExitStack() as fds_held:
        out = _open(paths.out, True)
        assert out is not None
        fds_held.callback(os.close, out)
        fds: dict[Stream, int] = {Stream.STDOUT: out}
        err = _open(paths.err, False)
        if err is not None:
            fds_held.callback(os.close, err)
            fds[Stream.STDERR] = err
        idx = _open(paths.idx, pump is not None)
        if idx is not None:
            fds_held.callback(os.close, idx)
            count = pump.records if pump is not None else os.fstat(idx).st_size // RECORD.size
            index = Index(idx, count)
        else:
            index = _legacy_index(out)

        def done() -> bool:
            return pump is None or pump.closed

        if done() and query.offset > index.end(view):
            raise InvalidArgument(
                f"offset {query.offset} is past the end of the output ({index.end(view)} bytes)"
            )
        pos = query.offset
        if query.tail is not None:
            # Off the loop: a tail of many lines over many records takes a while.
            start = await asyncio.to_thread(tail_start, index, view, query.tail, fds)
            pos = max(pos, start)
        if query.since_us is not None:
            pos = max(pos, index.since(view, query.since_us))
        i = index.find(view, pos)
        while True:
            ended = done()  # before the count: once ended, the count is final
            if pump is not None:
                index.count, index.newest = pump.records, pump.last
            if i < index.count:
                run = index.get(i)
                if query.since_us is not None and run.time_us < query.since_us:
                    # Received before `since`: only while following from before it (times
                    # never decrease, so nothing has been sent yet).
                    pos = max(pos, run.end(view))
                if run.end(view) <= pos:
                    i += 1  # of the other stream, or all before pos
                    continue
                data = _read(index, i, run, view, pos, fds, chunk, query.split)
                if not data:
                    return  # the file is shorter than its index says (cut by a crash)
                yield Chunk(pos, data, run.stream, run.time_us)
                pos += len(data)
                if pos >= run.end(view):
                    nxt = i + 1
                    if nxt < index.count and index.get(nxt).end(view) <= pos:
                        i = index.find(view, pos)  # a long read went past many records
                    else:
                        i = nxt
                continue
            if ended and pos > index.end(view):
                # Followed from past the end, and the job ended short of it.
                raise InvalidArgument(
                    f"offset {pos} is past the end of the output ({index.end(view)} bytes)"
                )
            if ended or not query.follow:
                return
            assert pump is not None
            await pump.changed()


def _read(
    index: Index,
    i: int,
    run: Run,
    view: Stream | None,
    pos: int,
    fds: dict[Stream, int],
    chunk: int,
    split: bool,
) -> bytes:
    """Bytes of ``view`` from ``pos``, in record ``i`` (``run``) and, unless ``split``, the
    records after it of the same stream (contiguous in its file)."""
    fd = fds.get(run.stream)
    if fd is None:
        return b""
    within = pos - run.start(view)
    want = run.length - within
    if not split:
        if view is not None:
            want = index.end(view) - pos
        else:
            j = i + 1
            while want < chunk and j < index.count:
                nxt = index.get(j)
                if nxt.stream is not run.stream:
                    break
                want += nxt.length
                j += 1
    return os.pread(fd, min(chunk, want), run.file_off + within)


async def data_of(chunks: AsyncIterator[Chunk]) -> AsyncIterator[bytes]:
    """The bytes of ``chunks`` alone (closing them when closed)."""
    try:
        async for c in chunks:
            yield c.data
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _legacy_index(out: int) -> Index:
    """A log without an index (written before streams were kept apart): all of it stdout,
    received at its last modification."""
    st = os.fstat(out)
    legacy = Run(st.st_mtime_ns // 1000, 0, 0, st.st_size, Stream.STDOUT)
    return Index(-1, 0, legacy) if st.st_size else Index(-1, 0)
