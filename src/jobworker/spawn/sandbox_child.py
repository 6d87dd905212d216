"""The spawner's sandboxes: namespaces, mounts and the init that relays the job's wait status.

child.py loads this file by path (its directory is not on sys.path when it runs as a script)
and its :class:`Spawner` inherits :class:`Sandboxing`; like child.py, this file must import
nothing but the standard library. It also holds the small helpers both files use.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import marshal
import os
import resource
import signal
import socket
import struct

TYPE_CHECKING = False  # `typing` is not imported at run time: see child.py
if TYPE_CHECKING:
    from typing import Any

PR_SET_NAME = 15
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = struct.Struct("16sH22x")  # struct ifreq: the name, then ifr_flags in the union
STATUS = struct.Struct("i")
FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""What a sandbox's init passes on to the job's main process (the rest would be lost on it:
a namespace's PID 1 ignores signals it has no handler for)."""


class Sandboxing:
    """The sandbox half of the spawner (``Spawner`` in child.py), which sets these up."""

    sock: socket.socket
    libc: ctypes.CDLL
    pid_ns: int
    status_pipes: dict[int, int]

    def _child(
        self,
        procs_fd: int,
        out_fd: int,
        err_fd: int,
        err_w: int,
        msg: tuple[Any, ...],
        sandboxed: bool,
    ) -> None:
        raise NotImplementedError  # the spawner's fork path: child.py's Spawner._child

    def spawn_sandboxed(
        self, msg: tuple[Any, ...], procs_fd: int, out_fd: int, err_fd: int
    ) -> tuple[Any, ...]:
        """A job in namespaces of its own, behind a minimal init.

        The spawner unshares CLONE_NEWPID for itself (that only changes where its next child
        is born), forks, and goes straight back to its own PID namespace (setns on the fd it
        opened at the first sandbox). The child is PID 1 of the new namespace: the job's
        init (:meth:`_init`). It joins the job's cgroup, makes the mount, IPC, UTS (and with
        ``net``, network) namespaces, then forks the job's main process (PID 2), which sets
        itself up like a forked job (:meth:`_child`) and execs.

        The init cannot die of the job's signal (a namespace's PID 1 is immune to its own), so
        it writes the job's raw wait status to a pipe whose read end the spawner keeps; when it
        reaps the init, the spawner reports that status instead of the init's own. An init
        killed before it could write (``cgroup.kill``) reports its own (SIGKILL, as the job's).
        """
        req_id = msg[1]
        try:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            return ("err", req_id, e.errno or errno.EIO, "pipe")
        status_r = status_w = -1
        pid = -1
        report = b""
        try:
            try:
                status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                return ("err", req_id, e.errno or errno.EIO, "pipe")
            try:
                if self.pid_ns < 0:
                    self.pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
                check(self.libc.unshare(CLONE_NEWPID))
            except OSError as e:
                return ("err", req_id, e.errno or errno.EIO, "namespace")
            try:
                pid = os.fork()
            except OSError as e:
                return ("err", req_id, e.errno or errno.EIO, "fork")
            finally:
                # Every later child must be born in our namespace again; if that cannot be
                # undone, dying is the safe answer (the daemon sees EOF and starts another).
                if pid != 0 and self.libc.setns(self.pid_ns, CLONE_NEWPID) != 0:
                    os._exit(70)
            if pid == 0:
                self._init(procs_fd, out_fd, err_fd, err_w, status_w, msg)
            os.close(err_w)
            err_w = -1
            os.close(status_w)
            status_w = -1
            report = read_report(err_r)
            if not report:
                self.status_pipes[pid] = status_r
        finally:
            os.close(err_r)
            for fd in (err_w, status_w):
                if fd >= 0:
                    os.close(fd)
            if status_r >= 0 and pid not in self.status_pipes:
                os.close(status_r)
        if report:
            os.waitpid(pid, 0)
            err, stage = marshal.loads(report)
            return ("err", req_id, err, stage)
        return ("ok", req_id, pid)

    def exit_status(self, pid: int, status: int) -> int:
        """The status to report for a reaped child: a sandbox init's relayed one, if any."""
        fd = self.status_pipes.pop(pid, -1)
        if fd < 0:
            return status
        try:
            data = os.read(fd, STATUS.size)
        except BlockingIOError:
            data = b""
        finally:
            os.close(fd)
        return STATUS.unpack(data)[0] if len(data) == STATUS.size else status

    def _init(
        self,
        procs_fd: int,
        out_fd: int,
        err_fd: int,
        err_w: int,
        status_w: int,
        msg: tuple[Any, ...],
    ) -> None:
        """PID 1 of a sandbox: set up the namespaces, fork the job, then be its init."""
        stage = "cgroup"
        try:
            sandbox = options(msg)["sandbox"]
            os.close(self.sock.fileno())
            signal.set_wakeup_fd(-1)
            os.write(procs_fd, b"0")
            stage = "namespace"
            flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
            check(self.libc.unshare(flags | (CLONE_NEWNET if sandbox["net"] else 0)))
            stage = "mount"
            self._mounts(sandbox["hide"])
            if sandbox["net"]:
                stage = "network"
                _loopback_up()
            stage = "setsid"
            os.setsid()
            self.libc.prctl(PR_SET_NAME, b"jobworker-init", 0, 0, 0)
            # Held until the handlers below know the job's pid; the job unblocks them itself.
            signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
            stage = "fork"
            job = os.fork()
            if job == 0:
                os.close(status_w)
                self._child(procs_fd, out_fd, err_fd, err_w, msg, True)
        except OSError as e:
            os.write(err_w, marshal.dumps((e.errno or errno.EIO, stage)))
            os._exit(127)
        except BaseException:  # never back into the spawner's loop: this is not the spawner
            with contextlib.suppress(BaseException):
                os.write(err_w, marshal.dumps((errno.EIO, stage)))
            os._exit(127)
        try:
            _relay(job, status_w)
        finally:
            os._exit(1)

    def _mounts(self, hide: list[bytes]) -> None:
        """The sandbox's file system view, in its new mount namespace."""
        mount = self.libc.mount
        # First: nothing below may propagate back to the host's mounts.
        check(mount(None, b"/", None, MS_REC | MS_PRIVATE, None))
        for path in hide:
            try:
                is_dir = os.path.isdir(path) if os.path.lexists(path) else None
            except OSError:
                is_dir = None
            if is_dir is None:
                continue
            hidden = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
            if is_dir:
                check(mount(b"tmpfs", path, b"tmpfs", hidden, b"mode=0555,size=4k"))
            else:
                check(mount(b"/dev/null", path, None, MS_BIND, None))
                check(mount(None, path, None, MS_REMOUNT | MS_BIND | hidden, None))
        for path in (b"/tmp", b"/dev/shm"):
            check(mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=1777"))
        check(mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None))


def options(msg: tuple[Any, ...]) -> dict[str, Any]:
    return msg[10] if len(msg) > 10 and msg[10] is not None else {}


def check(ret: int) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def read_report(err_r: int) -> bytes:
    report = b""
    while chunk := os.read(err_r, 4096):  # EOF at exec: the pipe is close-on-exec
        report += chunk
    return report


def _loopback_up() -> None:
    """``ip link set lo up``, by ioctl: a new network namespace's loopback starts down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, IFREQ.pack(b"lo", flags | IFF_UP))


def _relay(job: int, status_w: int) -> None:
    """The init's life: forward signals to the job, reap every process of the namespace, and
    when the job's main process ends, write its raw wait status and exit (the kernel then kills
    what is left in the namespace; the manager kills what is left in the cgroup anyway)."""
    os.closerange(0, status_w)
    os.closerange(status_w + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])

    def forward(sig: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(job, sig)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # cannot happen before the job is reaped; be safe
            break
        if pid == job:
            break
    os.write(status_w, STATUS.pack(status))
    os._exit(0)
