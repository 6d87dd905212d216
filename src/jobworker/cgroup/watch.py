"""Wake-ups on cgroup state changes: one inotify instance for all job groups.

The kernel signals a change of ``cgroup.events`` (``populated``, ``frozen``) as IN_MODIFY, so a
job's end and a completed freeze are events, not something to poll for.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from inotify_simple import INotify, flags

from jobworker.errors import HostError


class EventsWatcher:
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._inotify = INotify(nonblocking=True)
        self._waiters: dict[int, asyncio.Future[None] | None] = {}
        self._by_group: dict[Path, int] = {}
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
        """Wait for the next change of the group's cgroup.events."""
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

    def _on_events(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        for event in events:
            self._wake(event.wd)

    def close(self) -> None:
        self._loop.remove_reader(self._inotify.fileno())
        for wd in list(self._waiters):
            self._wake(wd)
        self._inotify.close()
