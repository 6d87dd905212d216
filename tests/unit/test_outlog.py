"""The output's files (two logs and the receive index), their readers, and the pump's read
fallback for a source that is not a pipe (a pty master)."""

from __future__ import annotations

import asyncio
import os
import pty
import random
import termios
import time
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobworker import outlog, outread
from jobworker.errors import InvalidArgument
from jobworker.outlog import RECORD, Chunk, LogFiles, LogPaths, Run, Stream, repair
from jobworker.output import PumpThread
from jobworker.outread import Query, read_chunks
from tests.conftest import wait_for


def paths(tmp_path: Path) -> LogPaths:
    return LogPaths(tmp_path / "j.log", tmp_path / "j.err", tmp_path / "j.idx")


def write_log(p: LogPaths, pieces: list[tuple[Stream, bytes, int]]) -> None:
    """A log as the pump writes it: each piece one record (stream, bytes, time)."""
    offs = {Stream.STDOUT: 0, Stream.STDERR: 0}
    with p.out.open("wb") as out, p.err.open("wb") as err, p.idx.open("wb") as idx:
        for stream, data, t in pieces:
            idx.write(Run(t, offs[Stream.STDOUT], offs[Stream.STDERR], len(data), stream).pack())
            (out if stream is Stream.STDOUT else err).write(data)
            offs[stream] += len(data)


async def read(p: LogPaths, query: Query, chunk: int = outread.READ_CHUNK) -> list[Chunk]:
    return [c async for c in read_chunks(p, None, query, chunk)]


PIECES = [
    (Stream.STDOUT, b"o1\no2", 100),
    (Stream.STDERR, b"e1\n", 200),
    (Stream.STDOUT, b"\no3\n", 300),
    (Stream.STDOUT, b"o4\n", 400),
    (Stream.STDERR, b"e2\ne3\n", 500),
]
MERGED = b"o1\no2e1\n\no3\no4\ne2\ne3\n"
STDOUT = b"o1\no2\no3\no4\n"
STDERR = b"e1\ne2\ne3\n"


@pytest.mark.parametrize(
    ("view", "whole"), [(None, MERGED), (Stream.STDOUT, STDOUT), (Stream.STDERR, STDERR)]
)
async def test_every_offset_of_every_view_resumes_without_loss_or_repetition(
    tmp_path: Path, view: Stream | None, whole: bytes
) -> None:
    p = paths(tmp_path)
    write_log(p, PIECES)
    for split in (False, True):
        for offset in range(len(whole) + 1):
            chunks = await read(p, Query(view=view, offset=offset, split=split), chunk=3)
            assert b"".join(c.data for c in chunks) == whole[offset:]
            at = offset
            for c in chunks:
                assert c.offset == at and 0 < len(c.data) <= 3
                at += len(c.data)
                if view is not None:
                    assert c.stream is view
    with pytest.raises(InvalidArgument, match="past the end"):
        await read(p, Query(view=view, offset=len(whole) + 1))


async def test_chunks_carry_their_stream_and_the_time_of_their_first_byte(tmp_path: Path) -> None:
    p = paths(tmp_path)
    write_log(p, PIECES)
    split = await read(p, Query(split=True))
    assert [(c.stream, c.data, c.time_us) for c in split] == PIECES
    # Unsplit, consecutive records of one stream come as one chunk, with the first one's time.
    merged = await read(p, Query())
    assert [(c.stream, c.data, c.time_us) for c in merged] == [
        (Stream.STDOUT, b"o1\no2", 100),
        (Stream.STDERR, b"e1\n", 200),
        (Stream.STDOUT, b"\no3\no4\n", 300),
        (Stream.STDERR, b"e2\ne3\n", 500),
    ]
    assert [(c.data, c.time_us) for c in await read(p, Query(view=Stream.STDERR, split=True))] == [
        (b"e1\n", 200),
        (b"e2\ne3\n", 500),
    ]


@pytest.mark.parametrize(
    ("view", "whole"), [(None, MERGED), (Stream.STDOUT, STDOUT), (Stream.STDERR, STDERR)]
)
async def test_tail_gives_the_last_lines_of_the_view(
    tmp_path: Path, view: Stream | None, whole: bytes
) -> None:
    p = paths(tmp_path)
    write_log(p, PIECES)
    lines = whole.splitlines(keepends=True)
    for n in range(len(lines) + 2):
        data = b"".join(c.data for c in await read(p, Query(view=view, tail=n)))
        assert data == b"".join(lines[max(0, len(lines) - n) :] if n else []), n


async def test_a_last_line_without_its_newline_counts(tmp_path: Path) -> None:
    p = paths(tmp_path)
    write_log(p, [(Stream.STDOUT, b"a\nb\nc", 1)])
    assert b"".join(c.data for c in await read(p, Query(tail=2))) == b"b\nc"


async def test_since_starts_at_the_first_byte_received_then(tmp_path: Path) -> None:
    p = paths(tmp_path)
    write_log(p, PIECES)
    got = b"".join(c.data for c in await read(p, Query(since_us=300)))
    assert got == b"\no3\no4\ne2\ne3\n"
    got = b"".join(c.data for c in await read(p, Query(view=Stream.STDERR, since_us=201)))
    assert got == b"e2\ne3\n"
    assert await read(p, Query(since_us=501)) == []
    # With a tail too, the later start wins.
    assert b"".join(c.data for c in await read(p, Query(since_us=100, tail=1))) == b"e3\n"


class CountingReads:
    """Every ``os.pread`` of the output modules, counted (bytes asked for)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.bytes = 0
        real = os.pread

        def pread(fd: int, n: int, offset: int) -> bytes:
            self.bytes += n
            return real(fd, n, offset)

        for module in (outlog, outread):
            monkeypatch.setattr(module.os, "pread", pread)


@pytest.fixture
def big_log(tmp_path: Path) -> Iterator[LogPaths]:
    """A 1 GiB log (sparse: a file of zeros) of 16 384 records of 64 KiB, then 100 lines."""
    p = paths(tmp_path)
    size, records = 1 << 30, 16384
    step = size // records
    with p.out.open("wb") as out, p.idx.open("wb") as idx:
        out.truncate(size)
        out.seek(size)
        for i in range(records):
            idx.write(Run(1_000 + i, i * step, 0, step, Stream.STDOUT).pack())
        tail = b"".join(b"line %d\n" % i for i in range(100))
        out.write(tail)
        idx.write(Run(1_000_000, size, 0, len(tail), Stream.STDOUT).pack())
    p.err.touch()
    yield p


async def test_tail_and_since_of_a_gib_read_a_bounded_amount(
    big_log: LogPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = CountingReads(monkeypatch)
    chunks = await read(big_log, Query(tail=10))
    assert b"".join(c.data for c in chunks) == b"".join(b"line %d\n" % i for i in range(90, 100))
    assert counter.bytes < 256 * 1024, counter.bytes
    counter.bytes = 0
    chunks = await read(big_log, Query(since_us=1_000_000))
    assert b"".join(c.data for c in chunks).startswith(b"line 0\n")
    assert counter.bytes < 256 * 1024, counter.bytes
    counter.bytes = 0
    # And the counter does count: reading from 8 MiB before the end reads those 8 MiB.
    await read(big_log, Query(offset=(1 << 30) - (8 << 20)))
    assert counter.bytes >= 8 << 20


def test_repair_indexes_what_a_crash_left_unindexed(tmp_path: Path) -> None:
    p = paths(tmp_path)
    write_log(p, [(Stream.STDOUT, b"indexed\n", 5)])
    with p.out.open("ab") as f:
        f.write(b"late out\n")
    p.err.write_bytes(b"late err\n")
    with p.idx.open("ab") as f:
        f.write(bytes(5 * RECORD.size))  # allocated ahead, never written
        f.write(b"half a record")
    repair(p)
    assert p.idx.stat().st_size == 3 * RECORD.size
    chunks = asyncio.run(read(p, Query()))
    assert b"".join(c.data for c in chunks) == b"indexed\nlate out\nlate err\n"
    repair(p)  # nothing more to do
    assert p.idx.stat().st_size == 3 * RECORD.size


async def test_a_log_without_an_index_reads_as_stdout(tmp_path: Path) -> None:
    """A log written before streams were kept apart: all of it stdout."""
    p = paths(tmp_path)
    p.out.write_bytes(b"old\nlog\n")
    assert b"".join(c.data for c in await read(p, Query())) == b"old\nlog\n"
    assert b"".join(c.data for c in await read(p, Query(view=Stream.STDOUT, tail=1))) == b"log\n"
    assert await read(p, Query(view=Stream.STDERR)) == []


def open_files(p: LogPaths) -> LogFiles:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    return LogFiles(*(os.open(x, flags, 0o600) for x in (p.out, p.err, p.idx)))


async def test_the_pump_reads_a_pty_master_and_takes_eio_as_its_end(tmp_path: Path) -> None:
    """A pty master cannot be spliced from (EINVAL): the pump reads it; once the slave side is
    closed its read fails with EIO, which is its end of file."""
    p = paths(tmp_path)
    master, slave = pty.openpty()
    data = random.Random(3).randbytes(100_000).replace(b"\n", b"").replace(b"\r", b"")
    pumps = PumpThread()
    try:
        pump = pumps.add(open_files(p), master, None)
        # Raw mode: the bytes go through unchanged (no echo, no CR/NL translation).
        tty.setraw(slave, termios.TCSANOW)
        writer = asyncio.create_task(asyncio.to_thread(os.write, slave, data))
        await wait_for(lambda: pump.size >= len(data), what="the pty's bytes")
        await writer
        os.close(slave)
        assert await pump.wait_eof(5.0)
        pump.finish()
        chunks = await read(p, Query())
        assert b"".join(c.data for c in chunks) == data
        assert {c.stream for c in chunks} == {Stream.STDOUT}
    finally:
        await pumps.close()


async def test_the_pump_indexes_two_pipes_in_the_order_received(tmp_path: Path) -> None:
    p = paths(tmp_path)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pumps = PumpThread()
    try:
        pump = pumps.add(open_files(p), out_r, err_r)
        expected = b""
        for i in range(20):
            fd = out_w if i % 2 == 0 else err_w
            line = b"%d\n" % i
            os.write(fd, line)
            expected += line
            size = len(expected)
            await wait_for(lambda: pump.size == size, what=f"write {i}")  # noqa: B023
        os.close(out_w)
        os.close(err_w)
        assert await pump.wait_eof(5.0)
        pump.finish()
        chunks = await read(p, Query())
        assert b"".join(c.data for c in chunks) == expected
        assert [c.stream for c in chunks] == [Stream.STDOUT, Stream.STDERR] * 10
        times = [c.time_us for c in chunks]
        assert times == sorted(times)
    finally:
        await pumps.close()


async def test_a_follower_since_a_later_time_skips_what_comes_before_it(tmp_path: Path) -> None:
    """Following from before ``since``: what arrives meanwhile, before it, is not sent."""
    p = paths(tmp_path)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    pumps = PumpThread()
    try:
        pump = pumps.add(open_files(p), out_r, None)
        os.write(out_w, b"before\n")
        await wait_for(lambda: pump.records == 1, what="the first record")
        since = time.time_ns() // 1000 + 200_000  # 0.2 s ahead
        reader = read_chunks(p, pump, Query(follow=True, since_us=since))
        first = asyncio.ensure_future(anext(reader))
        os.write(out_w, b"early\n")  # received after the call, before `since`
        await wait_for(lambda: pump.records == 2, what="the early record")
        await wait_for(lambda: time.time_ns() // 1000 > since, what="the clock past since")
        os.write(out_w, b"after\n")
        os.close(out_w)
        chunk = await first
        assert (chunk.offset, chunk.data) == (13, b"after\n")
        assert await pump.wait_eof(5.0)
        pump.finish()
        assert [c async for c in reader] == []
    finally:
        await pumps.close()
