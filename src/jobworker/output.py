"""A job's output: the pump that moves its stdout and stderr into their logs and the index.

The job's stdout and stderr are two pipes (a terminal job: one source, its pty master, kept as
stdout). One pump thread per manager splices every job's pipes into their files (no copy
through Python; the GIL is released while the kernel copies) and, per wake-up per stream,
appends one record to the job's receive index (:mod:`jobworker.outlog`): when, which stream,
how many bytes. The order of the records is the order in which the pump took the bytes, so
writes to the two streams come out in the order the daemon received them. Each batch's new
state goes to the event loop, which wakes that job's readers in-process: no polling, no
inotify, one wake-up per batch however many readers there are. Readers ``pread`` the files at
their own offset, each with its own fds (:mod:`jobworker.outread`), so a slow reader holds
nothing but its offset and never blocks the job or other readers.

A source that is not a pipe (a pty master) cannot be spliced from (EINVAL): it is read and
``pwrite``-n instead; a pty master's read fails with EIO once the slave side is closed, which
is its end of file.

Why a thread: the splice is the daemon's largest cost when output is fast (77 % of the event
loop's samples in a profile of one fast job with a follower); on the loop it delays every RPC
and every follower, off the loop it runs beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable

from jobworker.outlog import RECORD, LogFiles, Run, Stream

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
SPLICE_MAX = 1 << 20
BATCH_SPLICES = 16
"""Splices per wake-up before serving other jobs' pipes (fairness between jobs)."""
PUMP_NICE = -10
"""The pump thread's nice value (the jobs keep 0)."""
SWITCH_INTERVAL = 0.0002
"""The process's GIL switch interval, at most (:func:`sys.setswitchinterval`)."""
INDEX_ALLOCATION = 64 * 1024
"""Index bytes allocated at a time (2048 records)."""
READ_MAX = 256 * 1024
"""Most bytes per read from a source that cannot be spliced (a pty master)."""


def make_pipe() -> tuple[int, int]:
    """A job's output pipe (read end, write end), both close-on-exec."""
    r, w = os.pipe2(os.O_CLOEXEC)
    # Room for bursts while the pump is busy; the default 64 KiB stalls fast writers.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


class _Source:
    """One read fd of a job (its stdout pipe, its stderr pipe, or a pty master)."""

    __slots__ = ("closed", "fd", "log_fd", "splice", "stream")

    def __init__(self, fd: int, stream: Stream, log_fd: int) -> None:
        self.fd = fd
        self.stream = stream
        self.log_fd = log_fd
        self.splice = True
        """Whether splice works on it; a pty master answers EINVAL and is read instead."""
        self.closed = False


class PumpThread:
    """The one thread that moves every job's output into its logs.

    Everything it touches of an :class:`OutputPump` is the thread side (``_out``, ``_err``,
    ``_records``, ``_discarded``, ``_refusal``, the fds); the loop side (``size``,
    ``records``...) is only changed on the loop, by :meth:`OutputPump._publish`, which the
    thread schedules with ``call_soon_threadsafe`` at most once at a time per pump.
    """

    def __init__(self) -> None:
        # The pump takes the GIL back within this long of its wake-up, however busy the loop
        # (Python's default, 5 ms, lets writes 1 ms apart to the two streams swap places).
        if sys.getswitchinterval() > SWITCH_INTERVAL:
            sys.setswitchinterval(SWITCH_INTERVAL)
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._sources: dict[int, tuple[OutputPump, _Source]] = {}
        self._again: list[tuple[OutputPump, _Source]] = []
        """Sources that still held bytes when their batch ended (edge-triggered: no new
        event would come for them)."""
        self._lock = threading.Lock()
        self._commands: list[Callable[[], None]] = []
        self._running = True
        self._thread = threading.Thread(target=self._run, name="jobworker-pump", daemon=True)
        self._thread.start()

    def _call(self, command: Callable[[], None]) -> None:
        """Run ``command`` on the pump thread, soon."""
        with self._lock:
            self._commands.append(command)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def add(
        self,
        files: LogFiles,
        stdout_r: int,
        stderr_r: int | None,
        on_refused: Callable[[str], None] | None = None,
        limit: int | None = None,
    ) -> OutputPump:
        """Start pumping ``stdout_r`` (and ``stderr_r``, unless ``None``: a terminal job's one
        source is its stdout) into ``files``; the files and the fds now belong to the pump."""
        sources = [_Source(stdout_r, Stream.STDOUT, files.out)]
        if stderr_r is not None:
            sources.append(_Source(stderr_r, Stream.STDERR, files.err))
        pump = OutputPump(self, files, sources, on_refused, limit)
        for src in sources:
            os.set_blocking(src.fd, False)

        def register() -> None:
            for src in sources:
                self._sources[src.fd] = (pump, src)
                # Edge-triggered: a source enters epoll's ready list when bytes arrive, so one
                # wake-up hands the sources over in the order they received bytes (level-
                # triggered, a source just drained would be put back first, ahead of the other
                # stream's newer bytes, whenever the pump is late).
                self._epoll.register(src.fd, select.EPOLLIN | select.EPOLLET)
            for src in sources:
                pump._transfer(src)  # anything written before registration

        self._call(register)
        return pump

    def _run(self) -> None:
        # Ahead of the jobs (and the daemon's other threads) for the CPU: the order of the two
        # streams is the order the pump takes their bytes, so it must come promptly when they
        # arrive, also on a busy host (best effort: only root may raise a priority).
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PUMP_NICE)
        while self._running:
            try:
                # Sources left with bytes by the fairness limit go first, before new events.
                events = self._epoll.poll(0 if self._again else -1)
            except InterruptedError:
                continue
            again, self._again = self._again, []
            for pump, src in again:
                self._guarded(functools.partial(pump._transfer, src))
            for fd, _mask in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 4096):
                            pass
                    with self._lock:
                        commands, self._commands = self._commands, []
                    for command in commands:
                        self._guarded(command)
                else:
                    entry = self._sources.get(fd)
                    if entry is not None:
                        self._guarded(functools.partial(entry[0]._transfer, entry[1]))

    def _guarded(self, step: Callable[[], None]) -> None:
        # A bug in one step must not stop every job's output: log it and go on.
        try:
            step()
        except Exception:
            log.exception("output pump step failed")

    def _forget(self, fd: int) -> None:
        if self._sources.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    async def close(self) -> None:
        """Stop the thread (pumps still open are closed) and wait for it."""
        if not self._running:
            return

        def stop() -> None:
            for pump in {pump for pump, _ in self._sources.values()}:
                pump._close_in_thread()
            self._running = False

        self._call(stop)
        await asyncio.to_thread(self._thread.join)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class OutputPump:
    """One job's sources → its logs and index. Made by :meth:`PumpThread.add`.

    When the logs cannot take more — the size cap is reached (by both streams' bytes, or by
    the index's records), or a write fails (ENOSPC) — the pump calls ``on_refused`` once (on
    the loop) with the reason and from then on drains the sources without storing (counting
    the bytes in :attr:`discarded`), so the job is never wedged on a full pipe while its owner
    stops it.
    """

    def __init__(
        self,
        owner: PumpThread,
        files: LogFiles,
        sources: list[_Source],
        on_refused: Callable[[str], None] | None,
        limit: int | None,
    ) -> None:
        self._owner = owner
        self._loop = owner._loop
        self._on_refused = on_refused
        self._limit = limit
        # Thread side.
        self._files = files
        self._sources = sources
        self._out = 0
        self._err = 0
        self._records = 0
        self._last_time = 0
        self._allocated = 0
        """Bytes of the index file allocated (its records come first, zeros after)."""
        self._committed: tuple[int, int, Run | None] = (0, 0, None)
        """(records, bytes, the last record) as one value: a publish never sees bytes without
        their record."""
        self._discarded = 0
        self._refusal: str | None = None
        self._eof_seen = False
        self._publish_pending = False
        # Loop side.
        self.size = 0
        """Bytes of both streams in the logs, as far as readers may read."""
        self.records = 0
        """Records of the index readers may read."""
        self.last: Run | None = None
        """The last of them (``None`` before the first): a follower woken for a new record
        takes it from here, not from the index file."""
        self.discarded = 0
        self.refused: str | None = None
        self.closed = False
        """No byte will be added: the sources are drained and the job has ended
        (:meth:`finish`)."""
        self._waiters: list[asyncio.Future[None]] | None = None
        """One future per follower waiting in :meth:`changed`, woken by the publish itself."""
        self._eof: asyncio.Future[None] = self._loop.create_future()

    # -- pump thread -------------------------------------------------------------------------

    def _room(self, pending: int) -> int:
        """Bytes this batch may still store: the cap counts both streams' bytes; the index,
        32 bytes per reception, may grow as large as the cap too, no larger."""
        if not self._index_room():
            return 0
        if self._limit is None:
            return SPLICE_MAX
        if (self._records + 1) * RECORD.size > self._limit:
            if self._refusal is None:
                self._refusal = (
                    f"output exceeded the log size limit of {self._limit} bytes "
                    f"in its index ({self._records} receptions)"
                )
            return 0
        return min(SPLICE_MAX, self._limit - (self._out + self._err + pending))

    def _index_room(self) -> bool:
        """Whether the index has room, allocated ahead, for this batch's record: bytes are
        only taken when their record is sure to fit (a full disk must not leave bytes stored
        but unindexed, so unread). The file is cut to its records when the pump ends."""
        if (self._records + 1) * RECORD.size <= self._allocated:
            return True
        if self._refusal is None:
            try:
                os.posix_fallocate(self._files.idx, self._allocated, INDEX_ALLOCATION)
            except OSError as e:
                self._refusal = f"output log write failed: {e.strerror}"
                return False
            self._allocated += INDEX_ALLOCATION
            return True
        return False

    def _transfer(self, src: _Source, batch: int = BATCH_SPLICES) -> None:
        """Move what ``src`` holds (up to ``batch`` splices), then index it as one record."""
        if src.closed:
            return
        received = max(time.time_ns() // 1000, self._last_time)
        at = self._out if src.stream is Stream.STDOUT else self._err
        moved = 0
        eof = False
        drained = False
        for _ in range(batch):
            room = self._room(moved)
            try:
                if self._refusal is None and room > 0:
                    n = self._move(src, room, at + moved)
                    moved += n
                else:
                    n = len(_read(src.fd, SPLICE_MAX))
                    self._discarded += n
                    if n and self._refusal is None:
                        self._refusal = f"output exceeded the log size limit of {self._limit} bytes"
            except BlockingIOError:
                drained = True
                break
            except OSError as e:
                if self._refusal is None:
                    self._refusal = f"output log write failed: {e.strerror}"
                continue
            if n == 0:
                eof = True
                break
        if moved:
            self._index(src.stream, moved, received)
        if eof:
            self._end_source(src)
        elif not drained:
            self._owner._again.append((self, src))
        self._schedule_publish()

    @staticmethod
    def _move(src: _Source, count: int, at: int) -> int:
        if src.splice:
            try:
                return os.splice(src.fd, src.log_fd, count, offset_dst=at)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                src.splice = False  # not a pipe (a pty master): read and write instead
        data = _read(src.fd, min(count, READ_MAX))
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.pwrite(src.log_fd, view[done:], at + done)
        return len(data)

    def _index(self, stream: Stream, n: int, received: int) -> None:
        run = Run(received, self._out, self._err, n, stream)
        try:
            os.pwrite(self._files.idx, run.pack(), self._records * RECORD.size)
        except OSError as e:
            # The bytes stay unindexed (unread), and the next batch overwrites them.
            if self._refusal is None:
                self._refusal = f"output log write failed: {e.strerror}"
            return
        self._records += 1
        self._last_time = received
        if stream is Stream.STDOUT:
            self._out += n
        else:
            self._err += n
        self._committed = (self._records, self._out + self._err, run)

    def _end_source(self, src: _Source) -> None:
        src.closed = True
        self._owner._forget(src.fd)
        os.close(src.fd)
        if all(s.closed for s in self._sources) and not self._eof_seen:
            self._eof_seen = True
            with contextlib.suppress(OSError):
                os.ftruncate(self._files.idx, self._records * RECORD.size)
            self._files.close()

    def _close_in_thread(self) -> None:
        # Whatever the sources still hold when we stop early (abandon): take it, don't wait
        # (a bounded amount: a writer outside the job may go on writing).
        for src in self._sources:
            if not src.closed:
                self._transfer(src, 4 * BATCH_SPLICES)
            if not src.closed:
                self._end_source(src)
        self._schedule_publish()

    def _schedule_publish(self) -> None:
        if not self._publish_pending:
            self._publish_pending = True
            self._loop.call_soon_threadsafe(self._publish)

    # -- event loop --------------------------------------------------------------------------

    def _publish(self) -> None:
        self._publish_pending = False  # before reading: a later change schedules again
        eof = self._eof_seen  # before the sizes: once EOF is seen, they are final
        self.records, self.size, self.last = self._committed
        self.discarded = self._discarded
        refusal = self._refusal
        if refusal is not None and self.refused is None:
            self.refused = refusal
            if self._on_refused is not None:
                self._on_refused(refusal)
        if eof and not self._eof.done():
            self._eof.set_result(None)
        self._notify()

    def _notify(self) -> None:
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self) -> None:
        """Wait for more bytes or the end of the output.

        Each waiter awaits a future of its own, so the publish wakes its task directly (a
        shared future behind :func:`asyncio.shield` cost one more loop iteration per wake-up:
        follow latency) and a cancelled waiter cancels nobody else's."""
        waiter = self._loop.create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if self._waiters is not None and waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    async def wait_eof(self, timeout: float | None = None) -> bool:
        """Wait until every writer has closed the sources; ``False`` on timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(self._eof), timeout)
        except TimeoutError:
            return False
        return True

    async def abandon(self) -> None:
        """Stop pumping now, keeping what the sources hold (a writer outside the job's cgroup
        still has one open), and wait until the final state is published."""
        self._owner._call(self._close_in_thread)
        await asyncio.shield(self._eof)

    def finish(self) -> None:
        """The job has ended and its status is final: followers may end after the last byte.

        Kept apart from the sources' EOF so a follower never ends before the job's status says
        it ended (a job may close its stdout and go on running). Call after EOF or abandon."""
        self.closed = True
        self._notify()


def _read(fd: int, count: int) -> bytes:
    """``os.read``; a pty master whose slave side is closed (EIO) reads as its end of file."""
    try:
        return os.read(fd, count)
    except OSError as e:
        if e.errno != errno.EIO:
            raise
        return b""
