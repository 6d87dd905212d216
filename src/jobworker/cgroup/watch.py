"""Wake-ups on cgroup state changes: one inotify instance for all job groups.

The kernel signals a change of ``cgroup.events`` (``populated``, ``frozen``) as IN_MODIFY, so a
job's end and a completed freeze are events, not something to poll for.

A wake-up says only "look again": every waiter re-reads the file it waits on. When the kernel's
event queue overflows (IN_Q_OVERFLOW) the events it dropped cannot be known, so every waiter is
woken: a lost ``populated 0`` would otherwise leave a job's end, and then ``close()``, waiting
forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from inotify_simple import INotify, flags

from jobworker.errors import HostError


class InotifyEvent(Protocol):
    @property
    def wd(self) -> int: ...
    @property
    def mask(self) -> int: ...


class Inotify(Protocol):
    """What the watcher needs of :class:`inotify_simple.INotify` (tests pass a fake)."""

    def fileno(self) -> int: ...
    def add_watch(self, path: str | Path, mask: int) -> int: ...
    def rm_watch(self, wd: int) -> None: ...
    def read(self, timeout: int | None = None) -> Iterable[InotifyEvent]: ...
    def close(self) -> None: ...


class EventsWatcher:
    def __init__(self, inotify: Inotify | None = None) -> None:
        """``inotify``: a non-blocking inotify instance the watcher takes over (and closes);
        by default a new one."""
        self._loop = asyncio.get_running_loop()
        self._inotify: Inotify = INotify(nonblocking=True) if inotify is None else inotify
        self._waiters: dict[int, asyncio.Future[None] | None] = {}
        self._by_group: dict[Path, int] = {}
        self.overflows = 0
        """How many times the kernel's event queue overflowed (every waiter was woken)."""
        self._loop.add_reader(self._inotify.fileno(), self._on_events)

    def watch(self, group: Path) -> None:
        try:
            wd = self._inotify.add_watch(group / "cgroup.events", flags.MODIFY)
        except OSError as e:
            raise HostError(f"cannot watch {group}/cgroup.events: {e.strerror}") from e
        self._by_group[group] = wd
        self._waiters[wd] = None

    def unwatch(self, group: Path) -> None:
        wd = self._by_group.pop(group, None)
        if wd is None:
            return
        self._wake(wd)
        self._waiters.pop(wd, None)
        with contextlib.suppress(OSError):  # already gone with the directory (IN_IGNORED)
            self._inotify.rm_watch(wd)

    async def changed(self, group: Path) -> None:
        """Wait for the next change of the group's cgroup.events (or a queue overflow, after
        which any group may have changed): re-read the file after it returns."""
        wd = self._by_group[group]
        fut = self._waiters.get(wd)
        if fut is None:
            fut = self._loop.create_future()
            self._waiters[wd] = fut
        await asyncio.shield(fut)

    def _wake(self, wd: int) -> None:
        fut = self._waiters.get(wd)
        if fut is not None:
            if not fut.done():
                fut.set_result(None)
            self._waiters[wd] = None

    def _wake_all(self) -> None:
        for wd in list(self._waiters):
            self._wake(wd)

    def _on_events(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                self.overflows += 1
                self._wake_all()
            else:
                self._wake(event.wd)

    def close(self) -> None:
        self._loop.remove_reader(self._inotify.fileno())
        self._wake_all()
        self._inotify.close()
