"""The local terminal of ``worker run -t`` and ``worker attach``: raw mode, restored on every
way out, its size, and what ends a session (the detach keys, a terminating signal).

Restoring: :class:`RawTerminal` is a context manager, and it turns SIGTERM, SIGHUP, SIGINT and
SIGQUIT into the end of the session (:attr:`RawTerminal.ended`) rather than the death of the
process, so the ``finally`` that puts the saved modes back always runs: on the job's end, on a
detach, on a lost connection (an exception), and on those signals. Only SIGKILL can leave the
terminal raw (``stty sane`` fixes it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import termios
import tty
from collections.abc import Callable
from types import TracebackType
from typing import Any

from jobworker.spec import TerminalSize
from jobworker.terminal import get_size

DETACH_KEYS = b"\x10\x11"
"""Ctrl+P Ctrl+Q, as docker: leave the job running."""
ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)


def is_terminal(fd: int) -> bool:
    return os.isatty(fd)


def size_of(fd: int) -> TerminalSize:
    """The terminal's size (24x80 if it does not say)."""
    try:
        return get_size(fd)
    except OSError:
        return TerminalSize()


class RawTerminal:
    """``fd`` in raw mode for the ``with`` block; :attr:`ended` resolves with the number of
    the signal that ends the session, ``on_resize`` is called on SIGWINCH."""

    def __init__(self, fd: int, on_resize: Callable[[TerminalSize], None]) -> None:
        self.fd = fd
        self._on_resize = on_resize
        self._saved: list[Any] | None = None
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[int] = self._loop.create_future()

    def __enter__(self) -> RawTerminal:
        self._saved = termios.tcgetattr(self.fd)
        try:
            for sig in ENDING_SIGNALS:
                self._loop.add_signal_handler(sig, self._end, sig)
            self._loop.add_signal_handler(signal.SIGWINCH, self._resized)
            tty.setraw(self.fd, termios.TCSANOW)
        except BaseException:
            self._restore()
            raise
        return self

    def _end(self, sig: int) -> None:
        if not self.ended.done():
            self.ended.set_result(sig)

    def _resized(self) -> None:
        self._on_resize(size_of(self.fd))

    def _restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        for sig in (*ENDING_SIGNALS, signal.SIGWINCH):
            self._loop.remove_signal_handler(sig)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._restore()


class DetachScanner:
    """Finds the detach keys in what is typed, holding back a lone Ctrl+P until the next key
    says whether it starts them (then both are sent, as typed)."""

    def __init__(self) -> None:
        self._held = False
        self.detached = False

    def feed(self, data: bytes) -> bytes:
        """The bytes to send to the job; sets :attr:`detached` at the detach keys (what came
        before them in ``data`` is still returned)."""
        out = bytearray()
        for byte in data:
            if self._held:
                self._held = False
                if byte == DETACH_KEYS[1]:
                    self.detached = True
                    return bytes(out)
                out.append(DETACH_KEYS[0])
            if byte == DETACH_KEYS[0]:
                self._held = True
            else:
                out.append(byte)
        return bytes(out)
