"""A job's output: the pump that moves its pipe into the log file, and readers of that file.

The job's stdout and stderr are one pipe (so they interleave in the order written). The daemon
splices the pipe into ``output.log`` (no copy through Python) and wakes readers in-process: no
polling, no inotify, one wake-up per batch however many readers there are. Readers ``pread``
the file at their own offset, each with its own fd, so a slow reader holds nothing but its
offset and never blocks the job or other readers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from jobworker.errors import HostError, InvalidArgument

PIPE_SIZE = 1 << 20
SPLICE_MAX = 1 << 20
BATCH_SPLICES = 16
"""Splices per wake-up before yielding the loop to others (fairness between jobs)."""
READ_CHUNK = 256 * 1024
"""Most bytes per read (and so per Logs message): fewer, larger messages cost the daemon less
per byte; a follower still gets small writes at once."""


class OutputPump:
    """Owns the read end of a job's output pipe and the log file it fills.

    When the log cannot take more — the size cap is reached, or a write fails (ENOSPC) — the
    pump calls ``on_refused`` once with the reason and from then on drains the pipe without
    storing (counting the bytes in :attr:`discarded`), so the job is never wedged on a full pipe
    while its owner stops it.
    """

    def __init__(
        self,
        log_fd: int,
        pipe_r: int,
        on_refused: Callable[[str], None] | None = None,
        limit: int | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._log_fd = log_fd
        self._pipe_r = pipe_r
        self._on_refused = on_refused
        self._limit = limit
        self.size = 0
        self.discarded = 0
        self.refused: str | None = None
        self.closed = False
        """No byte will be added: the pipe is drained and the job has ended (:meth:`finish`)."""
        self._changed: asyncio.Future[None] | None = None
        self._eof = self._loop.create_future()
        os.set_blocking(pipe_r, False)
        self._loop.add_reader(pipe_r, self._pump)

    @staticmethod
    def make_pipe() -> tuple[int, int]:
        r, w = os.pipe2(os.O_CLOEXEC)
        # Room for bursts while the loop is busy; the default 64 KiB stalls fast writers.
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return r, w

    def _pump(self) -> None:
        for _ in range(BATCH_SPLICES):
            room = SPLICE_MAX if self._limit is None else self._limit - self.size
            try:
                if self.refused is None and room > 0:
                    n = os.splice(self._pipe_r, self._log_fd, room, offset_dst=self.size)
                    self.size += n
                else:
                    n = len(os.read(self._pipe_r, SPLICE_MAX))
                    self.discarded += n
                    if n and self.refused is None:
                        self._refuse(f"output exceeded the log size limit of {self._limit} bytes")
            except BlockingIOError:
                break
            except OSError as e:
                self._refuse(f"output log write failed: {e.strerror}")
                continue
            if n == 0:
                self._close()
                break
        self._notify()

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        if self._on_refused is not None:
            self._on_refused(reason)

    def _close(self) -> None:
        if self._eof.done():
            return
        self._loop.remove_reader(self._pipe_r)
        os.close(self._pipe_r)
        os.close(self._log_fd)
        self._eof.set_result(None)

    def finish(self) -> None:
        """The job has ended and its status is final: followers may end after the last byte.

        Kept apart from the pipe's EOF so a follower never ends before the job's status says
        it ended (a job may close its stdout and go on running)."""
        self.abandon()
        self.closed = True
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

    def abandon(self) -> None:
        """Stop pumping now (a writer outside the job's cgroup still holds the pipe)."""
        if not self._eof.done():
            self._pump()
            self._close()


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
