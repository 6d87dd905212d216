"""A job's output: the pump that moves its pipe into the log file, and readers of that file.

The job's stdout and stderr are one pipe (so they interleave in the order written). One pump
thread per manager splices every job's pipe into its log (no copy through Python; the GIL is
released while the kernel copies) and hands each batch's new size to the event loop, which wakes
that job's readers in-process: no polling, no inotify, one wake-up per batch however many
readers there are. Readers ``pread`` the file at their own offset, each with its own fd, so a
slow reader holds nothing but its offset and never blocks the job or other readers.

Why a thread: the splice is the daemon's largest cost when output is fast (77 % of the event
loop's samples in a profile of one fast job with a follower); on the loop it delays every RPC
and every follower, off the loop it runs beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import select
import stat
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from jobworker.errors import HostError, InvalidArgument

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
SPLICE_MAX = 1 << 20
BATCH_SPLICES = 16
"""Splices per wake-up before serving other jobs' pipes (fairness between jobs)."""
READ_CHUNK = 256 * 1024
"""Most bytes per read (and so per Logs message): fewer, larger messages cost the daemon less
per byte; a follower still gets small writes at once."""


def make_pipe() -> tuple[int, int]:
    """A job's output pipe (read end, write end), both close-on-exec."""
    r, w = os.pipe2(os.O_CLOEXEC)
    # Room for bursts while the pump is busy; the default 64 KiB stalls fast writers.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


class PumpThread:
    """The one thread that moves every job's output into its log.

    Everything it touches of an :class:`OutputPump` is the thread side (``_written``,
    ``_discarded``, ``_refusal``, the fds); the loop side (``size``...) is only changed on the
    loop, by :meth:`OutputPump._publish`, which the thread schedules with
    ``call_soon_threadsafe`` at most once at a time per pump.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._epoll.register(self._wake_r, select.EPOLLIN)
        self._pumps: dict[int, OutputPump] = {}
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
        log_fd: int,
        pipe_r: int,
        on_refused: Callable[[str], None] | None = None,
        limit: int | None = None,
    ) -> OutputPump:
        """Start pumping ``pipe_r`` into ``log_fd``; both fds now belong to the pump."""
        pump = OutputPump(self, log_fd, pipe_r, on_refused, limit)
        os.set_blocking(pipe_r, False)
        pump._pipe = stat.S_ISFIFO(os.fstat(pipe_r).st_mode)

        def register() -> None:
            self._pumps[pipe_r] = pump
            self._epoll.register(pipe_r, select.EPOLLIN)
            pump._transfer()  # anything written before registration

        self._call(register)
        return pump

    def _run(self) -> None:
        while self._running:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
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
                    pump = self._pumps.get(fd)
                    if pump is not None:
                        self._guarded(pump._transfer)

    def _guarded(self, step: Callable[[], None]) -> None:
        # A bug in one step must not stop every job's output: log it and go on.
        try:
            step()
        except Exception:
            log.exception("output pump step failed")

    def _forget(self, pipe_r: int) -> None:
        if self._pumps.pop(pipe_r, None) is not None:
            self._epoll.unregister(pipe_r)

    async def close(self) -> None:
        """Stop the thread (pumps still open are closed) and wait for it."""
        if not self._running:
            return

        def stop() -> None:
            for pump in list(self._pumps.values()):
                pump._close_in_thread()
            self._running = False

        self._call(stop)
        await asyncio.to_thread(self._thread.join)
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class OutputPump:
    """One job's pipe → log. Made by :meth:`PumpThread.add`.

    When the log cannot take more — the size cap is reached, or a write fails (ENOSPC) — the
    pump calls ``on_refused`` once (on the loop) with the reason and from then on drains the
    pipe without storing (counting the bytes in :attr:`discarded`), so the job is never wedged
    on a full pipe while its owner stops it.
    """

    def __init__(
        self,
        owner: PumpThread,
        log_fd: int,
        pipe_r: int,
        on_refused: Callable[[str], None] | None,
        limit: int | None,
    ) -> None:
        self._owner = owner
        self._loop = owner._loop
        self._on_refused = on_refused
        self._limit = limit
        # Thread side.
        self._log_fd = log_fd
        self._pipe_r = pipe_r
        self._written = 0
        self._discarded = 0
        self._refusal: str | None = None
        self._eof_seen = False
        self._pipe = True
        """``False`` for a terminal's master, which splice refuses: see :meth:`_move`."""
        self._publish_pending = False
        # Loop side.
        self.size = 0
        """Bytes in the log, as far as readers may read."""
        self.discarded = 0
        self.refused: str | None = None
        self.closed = False
        """No byte will be added: the pipe is drained and the job has ended (:meth:`finish`)."""
        self._changed: asyncio.Future[None] | None = None
        self._eof: asyncio.Future[None] = self._loop.create_future()

    # -- pump thread -------------------------------------------------------------------------

    def _transfer(self) -> None:
        if self._eof_seen:
            return
        eof = False
        for _ in range(BATCH_SPLICES):
            room = SPLICE_MAX if self._limit is None else self._limit - self._written
            try:
                if self._refusal is None and room > 0:
                    n = self._move(room)
                    self._written += n
                else:
                    n = len(self._read(SPLICE_MAX))
                    self._discarded += n
                    if n and self._refusal is None:
                        self._refusal = f"output exceeded the log size limit of {self._limit} bytes"
            except BlockingIOError:
                break
            except OSError as e:
                if self._refusal is None:
                    self._refusal = f"output log write failed: {e.strerror}"
                continue
            if n == 0:
                eof = True
                break
        if eof:
            self._close_in_thread()
        else:
            self._schedule_publish()

    # -- terminal jobs: a pty's master is not a pipe -------------------------------------
    def _move(self, room: int) -> int:
        """Bytes from the source into the log at the end: spliced from a pipe; read and
        written for a pty's master (splice fails with EINVAL on it)."""
        if self._pipe:
            return os.splice(self._pipe_r, self._log_fd, room, offset_dst=self._written)
        data = self._read(min(room, SPLICE_MAX))
        done = 0
        while done < len(data):
            done += os.pwrite(self._log_fd, data[done:], self._written + done)
        return done

    def _read(self, n: int) -> bytes:
        """A read; EIO from a pty's master means every slave is closed: the end (b"")."""
        try:
            return os.read(self._pipe_r, n)
        except OSError as e:
            if e.errno == errno.EIO and not self._pipe:
                return b""
            raise

    def _close_in_thread(self) -> None:
        if self._eof_seen:
            return
        self._transfer_rest()
        self._eof_seen = True
        self._owner._forget(self._pipe_r)
        os.close(self._pipe_r)
        os.close(self._log_fd)
        self._schedule_publish()

    def _transfer_rest(self) -> None:
        # Whatever is still in the pipe when we stop early (abandon): take it, don't wait.
        with contextlib.suppress(OSError):
            while True:
                room = SPLICE_MAX if self._limit is None else self._limit - self._written
                if self._refusal is not None or room <= 0:
                    break
                n = self._move(room)
                if n == 0:
                    break
                self._written += n

    def _schedule_publish(self) -> None:
        if not self._publish_pending:
            self._publish_pending = True
            self._loop.call_soon_threadsafe(self._publish)

    # -- event loop --------------------------------------------------------------------------

    def _publish(self) -> None:
        self._publish_pending = False  # before reading: a later change schedules again
        eof = self._eof_seen  # before the size: once EOF is seen, the size is final
        self.size = self._written
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
        if self._changed is not None:
            if not self._changed.done():
                self._changed.set_result(None)
            self._changed = None

    async def changed(self) -> None:
        """Wait for more bytes or the end of the output."""
        if self._changed is None:
            self._changed = self._loop.create_future()
        await asyncio.shield(self._changed)

    async def wait_eof(self, timeout: float | None = None) -> bool:
        """Wait until every writer has closed the pipe; ``False`` on timeout."""
        try:
            await asyncio.wait_for(asyncio.shield(self._eof), timeout)
        except TimeoutError:
            return False
        return True

    async def abandon(self) -> None:
        """Stop pumping now, keeping what the pipe holds (a writer outside the job's cgroup
        still has it open), and wait until the final size is published."""
        self._owner._call(self._close_in_thread)
        await asyncio.shield(self._eof)

    def finish(self) -> None:
        """The job has ended and its status is final: followers may end after the last byte.

        Kept apart from the pipe's EOF so a follower never ends before the job's status says
        it ended (a job may close its stdout and go on running). Call after EOF or abandon."""
        self.closed = True
        self._notify()


async def read_output(
    path: Path, offset: int, pump: OutputPump | None, follow: bool, chunk: int = READ_CHUNK
) -> AsyncIterator[bytes]:
    """Bytes of a job's log from ``offset``: what exists now, or (``follow``) until the end.

    ``pump`` is ``None`` for a job whose output is complete. A follower of a running job ends
    right after the last byte once the job has ended. An offset past the end of an ended job's
    output is :class:`InvalidArgument`, also when a follower waited there for bytes that never
    came.
    """
    if offset < 0:
        raise InvalidArgument(f"offset must be >= 0, got {offset}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise HostError(f"cannot open the job's log {path}: {e.strerror}") from e
    try:
        if pump is None or pump.closed:
            end = os.fstat(fd).st_size
            if offset > end:
                raise InvalidArgument(
                    f"offset {offset} is past the end of the output ({end} bytes)"
                )
        while True:
            done = pump is None or pump.closed
            end = os.fstat(fd).st_size if pump is None else pump.size
            if offset < end:
                data = os.pread(fd, min(chunk, end - offset), offset)
                if not data:
                    return
                offset += len(data)
                yield data
                continue
            if done and offset > end:
                # Followed from past the end, and the job ended short of it.
                raise InvalidArgument(
                    f"offset {offset} is past the end of the output ({end} bytes)"
                )
            if done or not follow:
                return
            assert pump is not None
            await pump.changed()
    finally:
        os.close(fd)
