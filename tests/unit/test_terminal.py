"""stdin and terminals without a daemon: the job's input, the pump on a pty's master, the
detach keys, the policy's [terminal], the values."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from jobworker.errors import InvalidArgument
from jobworker.identity import Role
from jobworker.outlog import LogFiles
from jobworker.output import PumpThread
from jobworker.server.authz import MATRIX, Action, Decision, Policy
from jobworker.spec import JobSpec, TerminalSize
from jobworker.store import spec_from_dict, spec_to_dict
from jobworker.terminal import JobInput, get_size, open_pty

from jobworker.client.tty import DetachScanner  # isort: skip


@pytest.mark.parametrize(
    ("chunks", "sent", "detached"),
    [
        ([b"echo hi\r"], b"echo hi\r", False),
        ([b"ab\x10\x11cd"], b"ab", True),
        ([b"a\x10", b"\x11"], b"a", True),  # split across reads
        ([b"\x10x"], b"\x10x", False),  # a lone Ctrl+P goes on, as typed
        ([b"\x10\x10\x11"], b"\x10", True),
        ([b"\x10"], b"", False),  # held until the next key says
    ],
)
def test_detach_keys(chunks: list[bytes], sent: bytes, detached: bool) -> None:
    scanner = DetachScanner()
    out = b""
    for chunk in chunks:
        out += scanner.feed(chunk)
        if scanner.detached:
            break
    assert (out, scanner.detached) == (sent, detached)


def test_terminal_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[terminal]\nallow = ["admin"]\n')
    policy = Policy.load(path)
    assert policy.may_use_terminal(Role.ADMIN)
    assert not policy.may_use_terminal(Role.USER)
    path.write_text("")
    assert Policy.load(path).may_use_terminal(Role.USER)
    for bad in ('[terminal]\nallow = ["root"]\n', "[terminal]\nallow = 1\n", "[terminal]\nx = 1\n"):
        path.write_text(bad)
        with pytest.raises(InvalidArgument, match=r"\[terminal\]"):
            Policy.load(path)


def test_typing_needs_the_right_to_start() -> None:
    for role in Role:
        assert MATRIX[role, Action.INPUT][0] == MATRIX[role, Action.START][0]
    assert MATRIX[Role.USER, Action.INPUT] == (Decision.ALLOW, Decision.HIDE)
    assert MATRIX[Role.VIEWER, Action.INPUT] == (Decision.DENY, Decision.DENY)


def test_values() -> None:
    spec = JobSpec(argv=("sh",), terminal=TerminalSize(30, 100))
    assert spec.stdin  # a terminal is the job's stdin
    assert spec_from_dict(spec_to_dict(spec)) == spec
    piped = JobSpec(argv=("cat",), stdin=True)
    assert spec_from_dict(spec_to_dict(piped)) == piped
    old = spec_to_dict(JobSpec(argv=("true",)))
    del old["stdin"], old["terminal"]  # a record from before stdin existed
    assert spec_from_dict(old) == JobSpec(argv=("true",))
    for rows, cols in ((0, 80), (24, 65536), (True, 80)):
        with pytest.raises(InvalidArgument):
            TerminalSize(rows, cols)


async def test_a_blocked_write_ends_when_stdin_closes() -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    job_input = JobInput(w, tty=False)
    try:
        writer = asyncio.create_task(job_input.write(b"x" * (8 << 20)))  # more than the pipe
        done, _ = await asyncio.wait({writer}, timeout=0.2)
        assert not done, "8 MiB went into a pipe nobody reads"
        job_input.close()
        assert await writer is False
        assert job_input.closed
        assert await job_input.write(b"more") is False
    finally:
        os.close(r)


async def test_a_reader_that_went_away_closes_stdin() -> None:
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(r)
    job_input = JobInput(w, tty=False)
    assert await job_input.write(b"hello") is False  # EPIPE
    assert job_input.closed
    await asyncio.wait_for(job_input.wait_closed(), 5)


async def test_the_pump_reads_a_pty_master_until_its_slave_closes(tmp_path: Path) -> None:
    master, slave = open_pty(TerminalSize(33, 101))
    assert get_size(master) == TerminalSize(33, 101)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
    files = LogFiles(*(os.open(tmp_path / name, flags, 0o600) for name in ("log", "err", "idx")))
    pumps = PumpThread()
    try:
        pump = pumps.add(files, master, None)  # a terminal's one source, captured as stdout
        data = os.urandom(3000).replace(b"\n", b"").replace(b"\r", b"")[:1000]
        os.write(slave, b"line one\n" + data.hex().encode())
        os.close(slave)  # EIO on the master from now on: the end, not an error
        assert await pump.wait_eof(10)
        assert pump.refused is None
        content = (tmp_path / "log").read_bytes()
        assert content == b"line one\r\n" + data.hex().encode()  # onlcr: the terminal's bytes
        assert pump.size == len(content)
    finally:
        await pumps.close()
