"""EventsWatcher with a fake inotify: a queue overflow wakes every waiter."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from inotify_simple import Event, flags

from jobworker.cgroup.watch import EventsWatcher


class FakeInotify:
    """Readable when events are queued (a pipe carries the readiness); ``deliver`` queues."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._queue: list[Event] = []
        self.watches: dict[int, str] = {}
        self.closed = False

    def fileno(self) -> int:
        return self._r

    def add_watch(self, path: str | Path, mask: int) -> int:
        wd = len(self.watches) + 1
        self.watches[wd] = str(path)
        return wd

    def rm_watch(self, wd: int) -> None:
        self.watches.pop(wd)

    def deliver(self, *events: Event) -> None:
        self._queue.extend(events)
        os.write(self._w, b"x")

    def read(self, timeout: int | None = None) -> list[Event]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._r, 4096)
        events, self._queue = self._queue, []
        return events

    def close(self) -> None:
        os.close(self._r)
        os.close(self._w)
        self.closed = True


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeInotify, EventsWatcher]]:
    ino = FakeInotify()
    watcher = EventsWatcher(ino)
    try:
        yield ino, watcher
    finally:
        watcher.close()
    assert ino.closed


async def test_an_event_wakes_only_its_group(fake: tuple[FakeInotify, EventsWatcher]) -> None:
    ino, watcher = fake
    a, b = Path("/cg/a"), Path("/cg/b")
    watcher.watch(a)
    watcher.watch(b)
    wait_a = asyncio.ensure_future(watcher.changed(a))
    wait_b = asyncio.ensure_future(watcher.changed(b))
    await asyncio.sleep(0)
    ino.deliver(Event(wd=1, mask=flags.MODIFY, cookie=0, name=""))
    await asyncio.wait_for(wait_a, 5)
    assert not wait_b.done()
    watcher.unwatch(b)  # wakes its waiter
    await asyncio.wait_for(wait_b, 5)


async def test_queue_overflow_wakes_every_waiter(fake: tuple[FakeInotify, EventsWatcher]) -> None:
    ino, watcher = fake
    groups = [Path(f"/cg/{i}") for i in range(3)]
    for g in groups:
        watcher.watch(g)
    waits = [asyncio.ensure_future(watcher.changed(g)) for g in groups]
    await asyncio.sleep(0)
    # The kernel dropped the MODIFY events and queued one overflow (wd -1) instead.
    ino.deliver(Event(wd=-1, mask=flags.Q_OVERFLOW, cookie=0, name=""))
    _, pending = await asyncio.wait(waits, timeout=5)
    assert pending == set()
    assert watcher.overflows == 1
    for g in groups:
        watcher.unwatch(g)
