"""The spawner protocol, without cgroups: a pipe2 or fork that fails for want of memory
or processes is one error reply (the spawner goes on), and the daemon side turns it into
:class:`ResourceExhausted` naming the cause."""

from __future__ import annotations

import asyncio
import errno
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import cast

import pytest

from jobworker import HostError, ResourceExhausted
from jobworker.spawn import Spawned, Spawner, SpawnerDied
from jobworker.spawn import child as spawner_script
from jobworker.spec import Credentials


@pytest.fixture
def script_spawner() -> Iterator[spawner_script.Spawner]:
    a, b = socket.socketpair()
    s = spawner_script.Spawner(a)
    try:
        yield s
    finally:
        os.close(s.devnull)
        a.close()
        b.close()


def _fails(err: int) -> object:
    def fail(*_args: object) -> None:
        raise OSError(err, os.strerror(err))

    return fail


SPAWN: tuple[object, ...] = ("spawn", 7, b"/bin/true", [b"/bin/true"], [], b"/", -1, -1, [], False)


@pytest.mark.parametrize(("call", "stage"), [("pipe2", "pipe"), ("fork", "fork")])
@pytest.mark.parametrize("err", [errno.EAGAIN, errno.ENOMEM])
def test_the_script_replies_with_an_error_when_pipe2_or_fork_fails(
    script_spawner: spawner_script.Spawner,
    monkeypatch: pytest.MonkeyPatch,
    call: str,
    stage: str,
    err: int,
) -> None:
    monkeypatch.setattr(os, call, _fails(err))
    before = set(os.listdir("/proc/self/fd"))
    r, w = os.pipe()
    try:
        reply = script_spawner.spawn_fork(SPAWN, r, w, w)
    finally:
        os.close(r)
        os.close(w)
    assert reply == ("err", 7, err, stage)
    assert set(os.listdir("/proc/self/fd")) == before  # pipe2's ends closed when fork failed


class FakeScript:
    """The spawner's end of the socket, played by the test."""

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

    def reply(self, *msg: object) -> None:
        spawner_script.send_message(self.sock, msg)


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


async def _start(spawner: Spawner) -> None:
    r, w = os.pipe()
    try:
        await spawner.spawn("/bin/true", ("true",), {}, "/", r, w, w, Credentials(), False)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize(
    ("err", "stage", "message"),
    [
        (errno.EAGAIN, "fork", "fork failed: Resource temporarily unavailable (EAGAIN: out of"),
        (errno.ENOMEM, "fork", "fork failed: Cannot allocate memory (ENOMEM: out of memory)"),
        (errno.ENOMEM, "pipe", "pipe2 failed: Cannot allocate memory (ENOMEM: out of memory)"),
        (errno.EAGAIN, "posix_spawn", "posix_spawn failed: Resource temporarily unavailable"),
        (errno.EAGAIN, "exec", "exec failed: Resource temporarily unavailable (EAGAIN: out of"),
    ],
)
async def test_out_of_processes_or_memory_is_resource_exhausted(
    connected: tuple[Spawner, FakeScript], err: int, stage: str, message: str
) -> None:
    spawner, script = connected
    task = asyncio.create_task(_start(spawner))
    req = await asyncio.to_thread(script.request)
    script.reply("err", req[1], err, stage)
    with pytest.raises(ResourceExhausted, match=r"^cannot start the job: " + re.escape(message)):
        await task


async def test_other_pipe_or_fork_errors_stay_host_errors(
    connected: tuple[Spawner, FakeScript],
) -> None:
    spawner, script = connected
    task = asyncio.create_task(_start(spawner))
    req = await asyncio.to_thread(script.request)
    script.reply("err", req[1], errno.EMFILE, "pipe")
    with pytest.raises(HostError, match=r"cannot set up the job \(pipe\): Too many open files"):
        await task


async def test_eof_fails_requests_in_flight_and_outstanding_exits_with_spawner_died(
    connected: tuple[Spawner, FakeScript],
) -> None:
    spawner, script = connected
    first = asyncio.create_task(_start_job(spawner))
    req = await asyncio.to_thread(script.request)
    script.reply("ok", req[1], 4242)
    spawned = await first
    in_flight = asyncio.create_task(_start(spawner))
    await asyncio.to_thread(script.request)
    assert spawner.alive
    script.sock.close()  # the spawner died
    with pytest.raises(SpawnerDied, match="exited unexpectedly"):
        await in_flight
    with pytest.raises(SpawnerDied):
        await spawned.exit_status
    assert not spawner.alive
    died = await spawner.wait_dead()
    assert isinstance(died, SpawnerDied)
    with pytest.raises(SpawnerDied):
        await _start(spawner)
    await spawner.close()  # reaping a dead spawner does not make its death a close
    assert await spawner.wait_dead() is died


async def test_after_close_the_spawner_is_not_alive_and_wait_dead_returns_none(
    connected: tuple[Spawner, FakeScript],
) -> None:
    spawner, _script = connected
    waiter = asyncio.create_task(spawner.wait_dead())
    assert spawner.alive
    await spawner.close()
    assert not spawner.alive
    assert await waiter is None
    with pytest.raises(SpawnerDied, match="closed"):
        await _start(spawner)


async def _start_job(spawner: Spawner) -> Spawned:
    r, w = os.pipe()
    try:
        return await spawner.spawn("/bin/true", ("true",), {}, "/", r, w, w, Credentials(), False)
    finally:
        os.close(r)
        os.close(w)


def test_the_spawner_script_imports_no_typing() -> None:
    """Run as the daemon runs it (``python -I -S child.py``), the spawner loads no ``typing``
    (nor does its sandbox module): every fork copies the page tables of what it imported."""
    path = spawner_script.__file__
    probe = (
        "import sys; "
        f"exec(compile(open({path!r}).read(), {path!r}, 'exec'), "
        f"{{'__name__': 'spawner_probe', '__file__': {path!r}}}); "
        "print('typing' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
