"""The daemon side of the spawner: starts the spawner process and talks to it (see
:mod:`jobworker.spawn.child` for why it exists).

The spawner is the parent of every job. If it dies (EOF on its socket), its jobs keep running:
they are re-parented to the nearest subreaper (or init), and their exit statuses can no longer
be known. Every request in flight and every outstanding ``exit_status`` then fails with
:class:`SpawnerDied`, and :meth:`Spawner.wait_dead` returns, so the owner can end those jobs by
their cgroups and start a new spawner.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import marshal
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobworker.errors import HostError, ResourceExhausted, SpawnerDied, SpawnError
from jobworker.spawn import child as _spawner
from jobworker.spec import Credentials, Network, Sandbox

_SCRIPT = Path(_spawner.__file__)


# What a failed stage was doing, for the message of an out-of-processes-or-memory error.
_STAGE_ACTION = {
    "pipe": "pipe2",
    "fork": "fork",
    "posix_spawn": "posix_spawn",
    "exec": "exec",
}
_EXHAUSTED = {errno.EAGAIN: "out of processes", errno.ENOMEM: "out of memory"}


@dataclass(frozen=True, slots=True)
class _Request:
    """What a reply's error message may need to name."""

    argv0: str
    search_path: str
    cwd: str


@dataclass(slots=True)
class Spawned:
    pid: int
    exit_status: asyncio.Future[int]
    """Resolved with the raw wait status when the main process ends, or failed with
    :class:`SpawnerDied` if the spawner dies first (the status is then unknowable)."""


class Spawner:
    """One spawner process per manager; safe to use from a process running threads.

    The spawner runs in a session (and so a process group) of its own: SIGTERM, SIGHUP or
    SIGINT sent to the daemon's group do not reach it, and the daemon's graceful stop stays in
    charge of the jobs. Watch :attr:`alive` / :meth:`wait_dead` to learn of its death.
    """

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self._proc = proc
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._reader = _spawner.Reader(sock)
        self._pending: dict[int, asyncio.Future[Spawned]] = {}
        self._requests: dict[int, _Request] = {}
        self._exits: dict[int, asyncio.Future[int]] = {}
        self._next_id = 0
        self._send_lock = asyncio.Lock()
        self._dead: SpawnerDied | None = None
        self._closed = False
        self._gone: asyncio.Future[None] = self._loop.create_future()
        self._loop.add_reader(sock.fileno(), self._on_readable)

    @classmethod
    async def start(cls, *, _test_options: dict[str, Any] | None = None) -> Spawner:
        """Start the spawner process.

        ``_test_options``: a test hook, extra :class:`subprocess.Popen` arguments (e.g.
        ``user=``, so that RLIMIT_NPROC, which root ignores, can make the spawner's fork fail
        for real). Nothing else passes it.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(  # noqa: ASYNC220 - once per manager, vfork+exec
                [sys.executable, "-I", "-S", str(_SCRIPT), str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                close_fds=True,
                # Out of the daemon's process group: a signal to that group (Ctrl+C, a
                # service manager's SIGTERM or SIGHUP) must not kill every job's parent at
                # once, bypassing the graceful stop. Jobs get sessions of their own anyway.
                start_new_session=True,
                **(_test_options or {}),
            )
        except OSError as e:
            parent.close()
            raise HostError(f"cannot start the spawner process: {e}") from e
        finally:
            child.close()
        parent.setblocking(False)
        return cls(proc, parent)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        """``False`` once the spawner has died or :meth:`close` was called."""
        return not self._gone.done()

    async def wait_dead(self) -> SpawnerDied | None:
        """Return once the spawner is gone: the :class:`SpawnerDied` error when it died on its
        own (start a new one, and call :meth:`close` on this one to reap it), ``None`` when
        :meth:`close` ended it. Its jobs were re-parented to the nearest subreaper or init;
        their exit statuses cannot be known."""
        await asyncio.shield(self._gone)
        return None if self._closed else self._dead

    def _on_readable(self) -> None:
        try:
            alive = self._reader.feed()
        except BlockingIOError:
            return
        except OSError as e:
            self._fail(SpawnerDied(f"the spawner connection failed: {e}"))
            return
        for msg in self._reader.messages():
            kind = msg[0]
            if kind == "exit":
                pid, status = int(msg[1]), int(msg[2])  # type: ignore[call-overload]
                fut = self._exits.pop(pid, None)
                if fut is not None and not fut.done():
                    fut.set_result(status)
            elif kind == "ok":
                req, pid = int(msg[1]), int(msg[2])  # type: ignore[call-overload]
                # Register before any later message (its exit) is handled.
                exit_fut: asyncio.Future[int] = self._loop.create_future()
                self._exits[pid] = exit_fut
                self._resolve(req, Spawned(pid, exit_fut))
            elif kind == "err":
                req, err, stage = int(msg[1]), int(msg[2]), str(msg[3])  # type: ignore[call-overload]
                self._reject(req, err, stage)
        if not alive:
            self._fail(SpawnerDied(f"the spawner process (pid {self.pid}) exited unexpectedly"))

    def _resolve(self, req: int, value: Spawned) -> None:
        self._requests.pop(req, None)
        fut = self._pending.pop(req, None)
        if fut is not None and not fut.done():
            fut.set_result(value)

    def _reject(self, req: int, err: int, stage: str) -> None:
        fut = self._pending.pop(req, None)
        asked = self._requests.pop(req, None) or _Request("", "", "")
        if fut is None or fut.done():
            return
        reason = os.strerror(err)
        exc: Exception
        # A lookup done in the child with the job's own credentials: the answers the
        # root-side lookup (jobworker.spawn.lookup) gives, word for word.
        if stage == "not-in-path":
            exc = SpawnError(
                f"command not found: {asked.argv0!r} (searched PATH={asked.search_path})"
            )
        elif stage == "not-found":
            exc = SpawnError(f"command not found: {asked.argv0!r} (no such file)")
        elif stage == "not-executable":
            exc = SpawnError(f"cannot execute {asked.argv0!r}: not an executable file")
        elif stage == "no-cwd":
            exc = SpawnError(
                f"working directory {asked.cwd!r} does not exist or is not a directory"
            )
        elif err in _EXHAUSTED and stage in _STAGE_ACTION:
            exc = ResourceExhausted(
                f"cannot start the job: {_STAGE_ACTION[stage]} failed: {reason} "
                f"({errno.errorcode[err]}: {_EXHAUSTED[err]})"
            )
        elif stage in ("exec", "posix_spawn"):
            exc = SpawnError(f"cannot execute the command: {reason}")
        elif stage == "cwd":
            exc = SpawnError(f"cannot change to the working directory: {reason}")
        elif stage == "credentials":
            exc = HostError(f"cannot switch to the job's user: {reason}")
        else:
            exc = HostError(f"cannot set up the job ({stage}): {reason}")
        fut.set_exception(exc)

    def _fail(self, exc: SpawnerDied) -> None:
        if self._dead is not None:
            return
        self._dead = exc
        self._loop.remove_reader(self._sock.fileno())
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()
        self._requests.clear()
        # Main processes whose status we can no longer learn (they live on, re-parented).
        for exit_fut in self._exits.values():
            if not exit_fut.done():
                exit_fut.set_exception(exc)
        self._exits.clear()
        self._gone.set_result(None)

    async def _send(self, message: tuple[Any, ...], fds: list[int]) -> None:
        payload = marshal.dumps(message)
        data = memoryview(_spawner.HEADER.pack(len(payload)) + payload)
        async with self._send_lock:
            while fds:
                try:
                    sent = self._sock.sendmsg(
                        [data],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                    )
                except BlockingIOError:
                    await self._writable()
                    continue
                data, fds = data[sent:], []
            if data:
                await self._loop.sock_sendall(self._sock, data)

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self._sock.fileno()
        self._loop.add_writer(fd, _set_done, fut)
        try:
            await fut
        finally:
            self._loop.remove_writer(fd)

    async def spawn(
        self,
        path: str,
        argv: tuple[str, ...],
        env: dict[str, str],
        cwd: str,
        procs_fd: int,
        out_fd: int,
        err_fd: int,
        creds: Credentials,
        fast: bool,
        *,
        sandbox: Sandbox | None = None,
        hidden: Sequence[str] = (),
        lookup: bool = False,
        nofile: int | None = None,
        stdin_fd: int = -1,
        tty: bool = False,
    ) -> Spawned:
        """Start a job in the spawner (``fast``: posix_spawn from inside the job's group; see
        :mod:`jobworker.spawn.child`). The fds are duplicated into the spawner; the caller keeps
        (and must close) its own.

        ``sandbox``: namespaces of its own, with ``hidden`` paths masked (always the fork
        path). ``lookup``: ``path`` is argv[0], to be searched in ``env["PATH"]`` (and ``cwd``
        checked) in the child with the job's credentials (fork path). ``nofile``: the job's
        RLIMIT_NOFILE soft limit. ``stdin_fd``: the read end of the job's stdin pipe (else
        /dev/null). ``tty``: ``out_fd`` is a pty's slave, to be the job's stdio and controlling
        terminal (always the fork path)."""
        if self._dead is not None:
            raise SpawnerDied(str(self._dead))
        self._next_id += 1
        req = self._next_id
        fut: asyncio.Future[Spawned] = self._loop.create_future()
        self._pending[req] = fut
        self._requests[req] = _Request(argv[0], env.get("PATH", ""), cwd)
        options: dict[str, Any] = {}
        if nofile is not None:
            options["nofile"] = nofile
        if lookup:
            options["lookup"] = os.fsencode(env.get("PATH", ""))
        fds = [procs_fd, out_fd, err_fd]
        if stdin_fd >= 0:
            options["stdin"] = True
            fds.append(stdin_fd)
        if tty:
            options["tty"] = True
        if sandbox is not None:
            options["sandbox"] = {
                "net": sandbox.network is Network.NONE,
                "hide": [os.fsencode(p) for p in hidden],
            }
        message = (
            "spawn",
            req,
            os.fsencode(path),
            [os.fsencode(a) for a in argv],
            [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()],
            os.fsencode(cwd),
            creds.uid,
            creds.gid,
            list(creds.groups),
            fast and sandbox is None and not lookup and not tty,
            options,
        )
        try:
            await self._send(message, fds)
        except OSError as e:
            self._pending.pop(req, None)
            self._requests.pop(req, None)
            if self._dead is not None:
                raise SpawnerDied(str(self._dead)) from e
            if isinstance(e, (BrokenPipeError, ConnectionResetError)):
                raise SpawnerDied(f"the spawner process is gone: {e}") from e
            raise HostError(f"cannot reach the spawner process: {e}") from e
        return await fut

    async def set_home(self, procs_fd: int) -> None:
        """Give the spawner its own group's cgroup.procs (needed by the fast path)."""
        await self._send(("home",), [procs_fd])

    async def close(self) -> None:
        """Close the socket (the spawner exits on EOF) and reap it. Pending requests fail with
        :class:`SpawnerDied`. Also the way to reap a spawner that died on its own."""
        self._closed = self._closed or self._dead is None
        self._fail(SpawnerDied("the spawner was closed"))
        self._sock.close()
        if self._proc.returncode is not None:
            return  # reaped already (a second close): the pid may belong to someone else now
        try:
            pidfd = os.pidfd_open(self._proc.pid)
        except ProcessLookupError:
            pidfd = -1
        if pidfd >= 0:
            done: asyncio.Future[None] = self._loop.create_future()
            self._loop.add_reader(pidfd, _set_done, done)
            try:
                await done
            finally:
                self._loop.remove_reader(pidfd)
                os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            self._proc.wait()


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def describe_wait_status(status: int) -> tuple[int | None, int | None]:
    """(exit code, signal) from a raw wait status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None
