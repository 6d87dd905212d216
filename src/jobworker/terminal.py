"""A job's input: its stdin pipe or its pseudo-terminal, written from the event loop.

A job started with ``stdin`` reads a pipe whose write end the manager keeps; a job with a
``terminal`` has a pty whose slave is its stdin, stdout and stderr (and controlling terminal),
and whose master the manager keeps: the output pump reads it (the job's output is the
terminal's bytes), and :class:`JobInput` writes a duplicate of it (what is typed) and sets its
window size.

Flow control: :meth:`JobInput.write` returns once every byte is in the pipe (or the terminal's
input queue); while the job does not read, it waits on the fd's writability and holds nothing
but the caller's one buffer. A caller that awaits each write before reading its next chunk (the
service does) can make the daemon buffer no more than one message, whatever the job does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios

from jobworker.spec import TerminalSize

_WINSIZE = struct.Struct("HHHH")


def open_pty(size: TerminalSize) -> tuple[int, int]:
    """A new pseudo-terminal of ``size``: ``(master, slave)``, both close-on-exec."""
    master, slave = os.openpty()
    try:
        set_size(master, size)
    except OSError:
        os.close(master)
        os.close(slave)
        raise
    return master, slave


def set_size(fd: int, size: TerminalSize) -> None:
    """``TIOCSWINSZ``: the kernel sends SIGWINCH to the terminal's foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, _WINSIZE.pack(size.rows, size.cols, 0, 0))


def get_size(fd: int) -> TerminalSize:
    rows, cols, _x, _y = _WINSIZE.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    return TerminalSize(max(rows, 1), max(cols, 1))


class JobInput:
    """One job's stdin: a pipe's write end, or a duplicate of its pty's master (``tty``).

    Writes are serialised (each one's bytes stay together, in order, whoever writes).
    :meth:`close` (the manager calls it when the job ends) wakes a blocked writer at once.
    """

    def __init__(self, fd: int, tty: bool) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self.tty = tty
        self._loop = asyncio.get_running_loop()
        self._lock = asyncio.Lock()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    async def wait_closed(self) -> None:
        """Return once stdin is closed (by :meth:`close`: the job's end, or a client)."""
        await self._closed.wait()

    async def write(self, data: bytes) -> bool:
        """Write all of ``data``; ``False`` (nothing more will go in) once stdin is closed:
        by :meth:`close`, or by the job (EPIPE on the pipe, EIO on a terminal nobody holds)."""
        async with self._lock:
            view = memoryview(data)
            while view:
                if self._fd < 0:
                    return False
                try:
                    view = view[os.write(self._fd, view) :]
                except BlockingIOError:
                    await self._writable()
                except OSError as e:
                    if e.errno not in (errno.EPIPE, errno.EIO):
                        raise
                    self.close()
                    return False
            return self._fd >= 0

    async def _writable(self) -> None:
        waiter = self._waiter = self._loop.create_future()
        fd = self._fd
        self._loop.add_writer(fd, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if self._fd == fd:
                self._loop.remove_writer(fd)

    def resize(self, size: TerminalSize) -> None:
        """Set the terminal's window size (nothing for a pipe, or once closed)."""
        if self.tty and self._fd >= 0:
            with contextlib.suppress(OSError):
                set_size(self._fd, size)

    def close(self) -> None:
        """Close stdin for good: a pipe's reader sees EOF. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        self._loop.remove_writer(fd)
        if self._waiter is not None:
            _wake(self._waiter)
        os.close(fd)
        self._closed.set()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
