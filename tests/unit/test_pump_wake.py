"""How a follower waiting in :meth:`OutputPump.changed` is woken: at once, by the publish itself
(no extra loop iteration per wake-up), and each waiter on its own (one cancelled waiter
neither wakes nor strands the others)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from jobworker.outlog import LogFiles, LogPaths
from jobworker.output import OutputPump, PumpThread
from jobworker.outread import Query, read_chunks
from tests.conftest import wait_for


def _files(tmp_path: Path) -> LogFiles:
    p = LogPaths(tmp_path / "j.log", tmp_path / "j.err", tmp_path / "j.idx")
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    return LogFiles(*(os.open(x, flags, 0o600) for x in (p.out, p.err, p.idx)))


async def _waiting(pump: OutputPump) -> asyncio.Task[None]:
    task = asyncio.ensure_future(pump.changed())
    await asyncio.sleep(0)  # the task is now blocked in changed()
    assert not task.done()
    return task


async def test_a_waiter_resumes_within_one_loop_iteration_of_the_change(tmp_path: Path) -> None:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    pumps = PumpThread()
    try:
        pump = pumps.add(_files(tmp_path), out_r, None)
        waiters = [await _waiting(pump) for _ in range(3)]
        os.close(out_w)
        assert await pump.wait_eof(5.0)
        await wait_for(lambda: all(w.done() for w in waiters), what="the EOF publish")
        waiters = [await _waiting(pump) for _ in range(3)]
        pump.finish()  # notifies on the loop, now
        await asyncio.sleep(0)  # one iteration of the loop
        assert [w.done() for w in waiters] == [True, True, True]
    finally:
        await pumps.close()


async def test_a_cancelled_waiter_leaves_the_others_waiting_and_then_woken(
    tmp_path: Path,
) -> None:
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    pumps = PumpThread()
    try:
        pump = pumps.add(_files(tmp_path), out_r, None)
        first, second, third = [await _waiting(pump) for _ in range(3)]
        second.cancel()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert second.cancelled()
        assert not first.done() and not third.done()
        os.write(out_w, b"x\n")
        await wait_for(lambda: first.done() and third.done(), what="the publish of one line")
        assert first.result() is None and third.result() is None
        os.close(out_w)
        assert await pump.wait_eof(5.0)
    finally:
        await pumps.close()


async def test_a_follower_takes_each_new_record_from_the_publish_not_the_index_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Woken for a new record, a follower reads its bytes only: the record itself came with the
    publish (one read of the index file fewer per wake-up, on the loop)."""
    p = LogPaths(tmp_path / "j.log", tmp_path / "j.err", tmp_path / "j.idx")
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    index_reads: list[int] = []
    real_pread = os.pread
    pumps = PumpThread()
    try:
        pump = pumps.add(_files(tmp_path), out_r, None)
        reader = read_chunks(p, pump, Query(follow=True))
        os.write(out_w, b"0\n")
        first = await anext(reader)
        assert first.data == b"0\n"
        index_fd = os.open(p.idx, os.O_RDONLY)
        index_ino = os.fstat(index_fd).st_ino
        os.close(index_fd)

        def pread(fd: int, n: int, offset: int) -> bytes:
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_ino == index_ino:
                    index_reads.append(offset)
            return real_pread(fd, n, offset)

        monkeypatch.setattr(os, "pread", pread)
        for i in range(1, 6):
            nxt = asyncio.ensure_future(anext(reader))
            await asyncio.sleep(0)
            os.write(out_w, b"%d\n" % i)
            chunk = await nxt
            assert (chunk.offset, chunk.data) == (2 * i, b"%d\n" % i)
        monkeypatch.undo()
        assert index_reads == []
        os.close(out_w)
        assert await pump.wait_eof(5.0)
        pump.finish()
        assert [c async for c in reader] == []
    finally:
        await pumps.close()
