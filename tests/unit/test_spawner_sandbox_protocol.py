"""The spawner protocol's sandbox and lookup extensions, without cgroups: what the daemon side
sends, how it words the child's lookup answers, and how the script relays a sandbox init's
status."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import cast

import pytest

from jobworker import SpawnError
from jobworker.spawn import Spawner, sandbox_child
from jobworker.spawn import child as spawner_script
from jobworker.spec import Credentials, Network, Sandbox


class FakeScript:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.reader = spawner_script.Reader(sock)

    def request(self) -> tuple[object, ...]:
        while not (msgs := self.reader.messages()):
            assert self.reader.feed()
        for fd in self.reader.take_fds(3):
            os.close(fd)
        (msg,) = msgs
        return msg


@pytest.fixture
async def connected() -> AsyncIterator[tuple[Spawner, FakeScript]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    finished = cast(subprocess.Popen[bytes], SimpleNamespace(pid=0, returncode=0))
    spawner = Spawner(finished, ours)
    try:
        yield spawner, FakeScript(theirs)
    finally:
        theirs.close()
        await spawner.close()


async def _spawn(spawner: Spawner, argv0: str, **kwargs: object) -> None:
    r, w = os.pipe()
    try:
        await spawner.spawn(
            argv0,
            (argv0,),
            {"PATH": "/a:/b"},
            "/w",
            r,
            w,
            w,
            Credentials(),
            True,
            **kwargs,  # type: ignore[arg-type]
        )
    finally:
        os.close(r)
        os.close(w)


async def test_a_sandboxed_request_carries_its_options_and_is_never_fast(
    connected: tuple[Spawner, FakeScript],
) -> None:
    spawner, script = connected
    task = asyncio.create_task(
        _spawn(
            spawner,
            "x",
            sandbox=Sandbox(Network.NONE),
            hidden=("/state", "/etc/pki"),
            lookup=True,
            nofile=1024,
        )
    )
    req = await asyncio.to_thread(script.request)
    task.cancel()
    assert req[9] is False  # fast asked for, but a sandbox is always forked
    assert req[10] == {
        "nofile": 1024,
        "lookup": b"/a:/b",
        "sandbox": {"net": True, "hide": [b"/state", b"/etc/pki"]},
    }
    task = asyncio.create_task(_spawn(spawner, "x"))
    req = await asyncio.to_thread(script.request)
    task.cancel()
    assert req[9] is True and req[10] == {}


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        ("not-in-path", "command not found: 'x' (searched PATH=/a:/b)"),
        ("not-found", "command not found: 'x' (no such file)"),
        ("not-executable", "cannot execute 'x': not an executable file"),
        ("no-cwd", "working directory '/w' does not exist or is not a directory"),
    ],
)
async def test_lookup_answers_from_the_child_read_like_the_root_side_ones(
    connected: tuple[Spawner, FakeScript], stage: str, message: str
) -> None:
    spawner, script = connected
    task = asyncio.create_task(_spawn(spawner, "x", lookup=True))
    req = await asyncio.to_thread(script.request)
    spawner_script.send_message(script.sock, ("err", req[1], errno.ENOENT, stage))
    with pytest.raises(SpawnError) as e:
        await task
    assert str(e.value) == message


def test_the_script_reports_the_status_an_init_relayed(
    socketpair_spawner: spawner_script.Spawner,
) -> None:
    s = socketpair_spawner
    relayed_r, relayed_w = os.pipe2(os.O_NONBLOCK)
    os.write(relayed_w, sandbox_child.STATUS.pack(15))  # the job: killed by SIGTERM
    os.close(relayed_w)
    killed_r, killed_w = os.pipe2(os.O_NONBLOCK)
    os.close(killed_w)  # an init killed before it could write
    s.status_pipes = {100: relayed_r, 101: killed_r}
    assert s.exit_status(100, 0) == 15
    assert s.exit_status(101, 9) == 9
    assert s.exit_status(102, 3 << 8) == 3 << 8  # not a sandbox
    assert s.status_pipes == {}
    for fd in (relayed_r, killed_r):
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


@pytest.fixture
def socketpair_spawner() -> Iterator[spawner_script.Spawner]:
    a, b = socket.socketpair()
    s = spawner_script.Spawner(a)
    try:
        yield s
    finally:
        os.close(s.devnull)
        a.close()
        b.close()


@pytest.mark.parametrize(
    ("name", "search", "expected"),
    [
        (b"/no/such/file", b"", (errno.ENOENT, "not-found")),
        (b"/etc/passwd", b"", (errno.EACCES, "not-executable")),
        (b"/etc", b"", (errno.EACCES, "not-executable")),
        (b"no-such-command-xyz", b"/nonexistent:/etc:/usr/bin", (errno.ENOENT, "not-in-path")),
        (b"passwd-not-exec", b"", (errno.ENOENT, "not-in-path")),
    ],
)
def test_the_lookup_in_the_child_classifies_like_which(
    name: bytes, search: bytes, expected: tuple[int, str]
) -> None:
    # Only cases where nothing can be executed: a success would replace this process.
    assert spawner_script._lookup_exec(name, [name], {}, search) == expected
