"""The spawner: a small single-threaded process that forks jobs into their cgroups.

Why a separate process: the daemon runs gRPC's threads, and forking a threaded process then
running Python in the child is unsafe (grpc/grpc#17986). This process is started with a fresh
interpreter (``python -I -S child.py FD``, so it inherits no threads and imports only the
standard library) and never starts a thread. Either way a job is started, its first
instruction — and every process it forks — is already inside its cgroup:

- fast path (the job keeps our credentials): the spawner writes itself into the job's
  ``cgroup.procs``, ``posix_spawn``s (vfork+exec in C: no Python in the child), and writes
  itself back into its own group. The child is born in the job's group.
- fork path (the job runs as another user): fork; the child writes itself into the job's
  ``cgroup.procs``, sets its session, stdio, cwd and credentials, then ``execve``.

It is also the parent (and, via PR_SET_CHILD_SUBREAPER, the reaper of orphans) of every job,
so it reports each job's wait status back to the daemon. It exits when the daemon's end of the
socket closes.

Wire format on the stream socket, both ways: 4-byte big-endian length + a ``marshal``-ed tuple.
Requests: ``("spawn", req_id, path, argv, env, cwd, uid, gid, groups, fast, options)`` with two
fds attached (cgroup.procs of the job's group, the write ends of its stdout and its stderr
pipe: the same fd twice for a terminal); ``options``
(optional, a dict) may hold ``nofile`` (the job's RLIMIT_NOFILE soft limit), ``lookup`` (the
job's PATH: ``path`` is then argv[0], looked up in the child with the job's own credentials),
``stdin`` (true: a third fd is attached, the read end of the job's stdin pipe; else the job
reads /dev/null), ``tty`` (true: the output fd is a pty's slave, the job's fds 0, 1 and 2 and,
after ``setsid``, its controlling terminal by ``TIOCSCTTY``; always the fork path)
and ``sandbox`` (``{"net": bool, "hide": [path, ...]}``: namespaces, see :func:`Spawner.
spawn_sandboxed`). ``("home",)`` with the spawner's own cgroup.procs attached (needed by the
fast path).
Replies: ``("ok", req_id, pid)`` or ``("err", req_id, errno, stage)`` (stage: where it failed:
``pipe``, ``fork``, ``cgroup``, ``setsid``, ``stdio``, ``rlimit``, ``credentials``, ``cwd``,
``tty``, ``exec`` or ``posix_spawn``; for a lookup in the child also ``no-cwd``, ``not-found``,
``not-in-path``, ``not-executable``; for a sandbox also ``namespace``, ``mount``, ``network``,
``no-new-privs``; a failed start never ends the spawner);
events: ``("exit", pid, status)``. For a sandboxed job ``pid`` is its init's (the job's main
process is the init's child, PID 2 of the namespace) and ``status`` the main process's own raw
wait status, relayed by the init (see :meth:`Spawner.spawn_sandboxed`).

This file must import nothing from jobworker: it runs as a plain script. Its sandbox half,
``sandbox_child.py`` beside it (the same rule holds there), is loaded by path.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import fcntl
import importlib.util
import marshal
import os
import resource
import select
import signal
import socket
import struct
import sys
import termios
import types

# Not `typing` at run time: it is the largest module this process would import (~0.9 MB of
# its heap), and every fork copies (and every exec tears down) the page tables of that heap.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def _sibling(name: str) -> types.ModuleType:
    """A module of this directory, loaded by path: run as ``python -I -S child.py``, this
    file's directory is not on sys.path (and nothing from jobworker may be imported)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"jobworker_spawner_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if TYPE_CHECKING:  # the type checker's view; at run time it is loaded by path, below
    from jobworker.spawn import sandbox_child
else:
    sandbox_child = _sibling("sandbox_child")

_options = sandbox_child.options
_check = sandbox_child.check
_read_report = sandbox_child.read_report


HEADER = struct.Struct(">I")
MAX_MESSAGE = 8 * 1024 * 1024
PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
CAP_SYS_ADMIN = 21
LOOKUP_SKIP = (errno.ENOENT, errno.ENOTDIR, errno.EACCES)
"""execve errors that mean "not this file": a PATH search tries the next entry."""


def send_message(sock: socket.socket, message: tuple[Any, ...], fds: Sequence[int] = ()) -> None:
    payload = marshal.dumps(message)
    data = HEADER.pack(len(payload)) + payload
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


class Reader:
    """Reassembles framed messages from a blocking or non-blocking stream socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self) -> bool:
        """Read once; ``False`` on EOF. Raises BlockingIOError when nothing is there."""
        data, ancdata, _flags, _addr = self.sock.recvmsg(
            1 << 20, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
                self.fds.extend(fds)
        if not data:
            return False
        self.buf += data
        return True

    def messages(self) -> list[tuple[object, ...]]:
        out = []
        while len(self.buf) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.buf)
            if size > MAX_MESSAGE:
                raise ValueError(f"spawner message of {size} bytes is too large")
            if len(self.buf) < HEADER.size + size:
                break
            out.append(marshal.loads(bytes(self.buf[HEADER.size : HEADER.size + size])))
            del self.buf[: HEADER.size + size]
        return out

    def take_fds(self, n: int) -> list[int]:
        fds, self.fds = self.fds[:n], self.fds[n:]
        return fds


def _ignored_signals() -> tuple[int, ...]:
    """Signals ignored here (Python ignores SIGPIPE and SIGXFSZ, we ignore SIGINT): an ignored
    signal stays ignored across exec, so jobs get them reset to default."""
    return tuple(
        s
        for s in signal.valid_signals()
        if s not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(s) == signal.SIG_IGN
    )


class Spawner(sandbox_child.Sandboxing):
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.home_fd = -1
        """cgroup.procs of the group the spawner lives in, to step back after a fast spawn."""
        self.reset_signals: tuple[int, ...] = ()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self.pid_ns = -1
        """Our own PID namespace (opened at the first sandbox), to go back to after a fork."""
        self.status_pipes: dict[int, int] = {}
        """Sandboxed jobs' inits (pid) -> the pipe their init writes the job's wait status to."""

    def handle(self, msg: tuple[Any, ...], reader: Reader) -> None:
        if msg[0] == "home":
            (fd,) = reader.take_fds(1)
            if self.home_fd >= 0:
                os.close(self.home_fd)
            self.home_fd = fd
        elif msg[0] == "spawn":
            procs_fd, out_fd, err_fd = reader.take_fds(3)
            opts = _options(msg)
            if opts.get("stdin"):  # the job's stdin pipe, after the other attachments
                (opts["stdin_fd"],) = reader.take_fds(1)
            try:
                if opts.get("sandbox") is not None:
                    reply = self.spawn_sandboxed(msg, procs_fd, out_fd, err_fd)
                elif (
                    msg[9]
                    and self.home_fd >= 0
                    and opts.get("lookup") is None
                    and not opts.get("tty")  # TIOCSCTTY needs code in the child: fork
                ):
                    reply = self.spawn_fast(msg, procs_fd, out_fd, err_fd)
                else:
                    reply = self.spawn_fork(msg, procs_fd, out_fd, err_fd)
            finally:
                os.close(procs_fd)
                os.close(out_fd)
                os.close(err_fd)
                if "stdin_fd" in opts:
                    os.close(opts.pop("stdin_fd"))
            send_message(self.sock, reply)

    def spawn_fast(
        self, msg: tuple[Any, ...], procs_fd: int, out_fd: int, err_fd: int
    ) -> tuple[Any, ...]:
        """vfork+exec (posix_spawn) from inside the job's group.

        The spawner steps into the job's cgroup, so the child is born there, and steps back
        out. Used only when the job keeps our credentials (posix_spawn cannot change them) and
        its pids limit leaves room for the spawner's moment inside (the manager decides).
        posix_spawn cannot set a limit in the child either: the spawner lowers its own
        RLIMIT_NOFILE soft limit to the job's for the call (the child inherits it) and raises
        it back after (it holds an fd per sandboxed job).
        """
        _op, req_id, path, argv, env, cwd, _uid, _gid, _groups, _fast = msg[:10]
        nofile = _options(msg).get("nofile")
        stage = "cgroup"
        try:
            os.write(procs_fd, b"0")
            try:
                stage = "rlimit"
                own = resource.getrlimit(resource.RLIMIT_NOFILE)
                if nofile is not None:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (min(nofile, own[1]), own[1]))
                try:
                    stage = "cwd"
                    os.chdir(cwd)
                    # posix_spawn reports the clone's error (EAGAIN, ENOMEM) and the exec's
                    # alike.
                    stage = "posix_spawn"
                    pid = os.posix_spawn(
                        path,
                        argv,
                        dict(e.split(b"=", 1) for e in env),
                        file_actions=[
                            (os.POSIX_SPAWN_DUP2, _options(msg).get("stdin_fd", self.devnull), 0),
                            (os.POSIX_SPAWN_DUP2, out_fd, 1),
                            (os.POSIX_SPAWN_DUP2, err_fd, 2),
                        ],
                        setsid=True,
                        setsigdef=self.reset_signals,
                        setsigmask=(),
                    )
                finally:
                    if nofile is not None:
                        resource.setrlimit(resource.RLIMIT_NOFILE, own)
            finally:
                os.chdir("/")
                # Staying in the job's group would put us under its limits and its kill: if
                # stepping out fails, dying is the safe answer (the daemon sees EOF).
                try:
                    os.write(self.home_fd, b"0")
                except OSError:
                    os._exit(70)
        except OSError as e:
            return ("err", req_id, e.errno or errno.EIO, stage)
        return ("ok", req_id, pid)

    def spawn_fork(
        self, msg: tuple[Any, ...], procs_fd: int, out_fd: int, err_fd: int
    ) -> tuple[Any, ...]:
        """fork, then in the child: into the job's group, session, stdio, cwd, credentials,
        exec. Safe here because this process never runs a thread."""
        req_id = msg[1]
        # Out of processes or memory (EAGAIN, ENOMEM: a fork bomb on a host without a pids
        # controller) fails this one start; the spawner keeps serving.
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            return ("err", req_id, e.errno or errno.EIO, "pipe")
        try:
            try:
                pid = os.fork()
            except OSError as e:
                return ("err", req_id, e.errno or errno.EIO, "fork")
            if pid == 0:
                self._child(procs_fd, out_fd, err_fd, err_w, msg, False)
            os.close(err_w)
            err_w = -1
            report = _read_report(err_r)
        finally:
            os.close(err_r)
            if err_w >= 0:
                os.close(err_w)
        if report:
            os.waitpid(pid, 0)
            err, stage = marshal.loads(report)
            return ("err", req_id, err, stage)
        return ("ok", req_id, pid)

    def _child(
        self,
        procs_fd: int,
        out_fd: int,
        err_fd: int,
        err_w: int,
        msg: tuple[Any, ...],
        sandboxed: bool,
    ) -> None:
        _op, _req, path, argv, env, cwd, uid, gid, groups, _fast = msg[:10]
        opts = _options(msg)
        lookup: bytes | None = opts.get("lookup")
        stage = "cgroup"
        try:
            if not sandboxed:  # a sandbox's init did both already
                # Let go of the daemon's socket at once, not at exec: should the spawner die
                # while this child is stuck before exec (in a frozen group), the daemon still
                # sees EOF.
                os.close(self.sock.fileno())
                os.write(procs_fd, b"0")
            stage = "setsid"
            os.setsid()
            stage = "stdio"
            # A terminal job's out_fd is its pty's slave: stdin, stdout and stderr, and (in
            # the session just made) its controlling terminal.
            tty = bool(opts.get("tty"))
            os.dup2(out_fd if tty else opts.get("stdin_fd", self.devnull), 0)
            os.dup2(out_fd, 1)
            os.dup2(err_fd, 2)
            if tty:
                stage = "tty"
                fcntl.ioctl(0, termios.TIOCSCTTY, 0)
            if opts.get("nofile") is not None:
                stage = "rlimit"
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(opts["nofile"], hard), hard))
            if sandboxed:
                stage = "no-new-privs"
                _check(self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
                # Without CAP_SYS_ADMIN even a root job cannot unmount the masks, mount, or
                # setns out of its namespaces (dropped from the bounding set, so exec gives it
                # no more; a user namespace it makes sees the masks locked).
                stage = "capabilities"
                _check(self.libc.prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0))
            stage = "credentials"
            if gid >= 0:
                os.setgroups(groups)
                os.setgid(gid)
            if uid >= 0:
                os.setuid(uid)
            # After the switch: as root, chdir would reach directories the job's user cannot.
            stage = "cwd"
            try:
                os.chdir(cwd)
            except OSError as e:
                if lookup is not None and e.errno in (errno.ENOENT, errno.ENOTDIR):
                    stage = "no-cwd"
                raise
            stage = "exec"
            for sig in self.reset_signals:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            env_map = dict(e.split(b"=", 1) for e in env)
            if lookup is None:
                os.execve(path, argv, env_map)
            else:
                os.write(err_w, marshal.dumps(_lookup_exec(path, argv, env_map, lookup)))
        except OSError as e:
            os.write(err_w, marshal.dumps((e.errno or errno.EIO, stage)))
        finally:
            os._exit(127)


def _runnable(path: bytes) -> bool:
    """What shutil.which accepts (the root-side lookup's rule), seen with our credentials."""
    return os.access(path, os.X_OK) and not os.path.isdir(path)


def _lookup_exec(
    name: bytes, argv: list[bytes], env: dict[bytes, bytes], search: bytes
) -> tuple[int, str]:
    """execvpe with the job's own credentials: run ``name`` (a path, or searched in ``search``)
    or return ``(errno, stage)``. ENOENT, ENOTDIR and EACCES all mean "not this file" unless
    the file is there and runnable (then the interpreter is what is missing, an ``exec``
    error): a file the job's user cannot see is "not found", exactly like one that does not
    exist, so no answer tells it more than it could learn itself."""
    if b"/" in name:
        try:
            os.execve(name, argv, env)
        except OSError as e:
            err = e.errno or errno.EIO
            if err not in LOOKUP_SKIP or _runnable(name):
                return err, "exec"
            return err, "not-executable" if os.path.exists(name) else "not-found"
    if search:
        for entry in search.split(b":"):
            candidate = os.path.join(entry, name)
            try:
                os.execve(candidate, argv, env)
            except OSError as e:
                err = e.errno or errno.EIO
                if err not in LOOKUP_SKIP or _runnable(candidate):
                    return err, "exec"
    return errno.ENOENT, "not-in-path"


def _reap(spawner: Spawner) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        send_message(spawner.sock, ("exit", pid, spawner.exit_status(pid, status)))


def main(fd: int) -> None:
    # The socket came to us inheritable (pass_fds): no job may ever hold it.
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    spawner = Spawner(sock)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # The daemon's terminal signals are not ours: it tells us to stop by closing the socket.
    # (We also run in a session of our own, so signals sent to the daemon's process group,
    # SIGTERM or SIGHUP, do not reach us; SIGINT stays ignored for a spawner started without.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spawner.reset_signals = _ignored_signals()
    reader = Reader(sock)
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    while True:
        try:
            events = poller.poll()
        except InterruptedError:
            continue
        for ready, _mask in events:
            if ready == wake_r:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_r, 4096):
                        pass
            else:
                if not reader.feed():
                    return
                for msg in reader.messages():
                    spawner.handle(msg, reader)
        _reap(spawner)


if __name__ == "__main__":
    # BrokenPipe/ConnectionReset: the daemon went away, nothing is left to report to.
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        main(int(sys.argv[1]))
