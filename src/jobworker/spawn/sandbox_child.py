"""The spawner's sandboxes: namespaces, mounts and the init that relays the job's wait status.

child.py loads this file by path (its directory is not on sys.path when it runs as a script)
and its :class:`Spawner` inherits :class:`Sandboxing`; like child.py, this file must import
nothing but the standard library. It also holds the small helpers both files use.
"""

from __future__ import annotations

import _posixsubprocess
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
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
CAP_SYS_ADMIN = 21
LOOKUP_SKIP = (errno.ENOENT, errno.ENOTDIR, errno.EACCES)
"""execve errors that mean "not this file": a PATH search tries the next entry."""
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
    devnull: int
    reset_signals: tuple[int, ...]

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
        ``net``, network) namespaces, then starts the job's main process (PID 2): from C where
        it can (:meth:`_exec_job`), else by a fork whose child sets itself up like a forked job
        (:meth:`_child`) and execs.

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
            forwarder = _Forwarder()
            job = self._exec_job(out_fd, err_fd, msg, forwarder)
            if job < 0:
                # The Python child, which decides (and reports) every case exactly.
                forwarder.uninstall()
                # Held until the handlers know the job's pid; the job unblocks them itself.
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
            _relay(job, status_w, forwarder)
        finally:
            os._exit(1)

    def _exec_job(self, out_fd: int, err_fd: int, msg: tuple[Any, ...], fwd: _Forwarder) -> int:
        """Start the job's main process from C (``_posixsubprocess``: fork, then no Python
        before the exec; a Python child costs about half a millisecond more, in copy-on-write
        faults of the interpreter's pages). Returns its pid, or -1 when this way does not
        apply or did not work: then nothing ran, and the Python child (:meth:`_child`) starts
        the job, or reports the error, exactly as it always does.

        The job gets what the Python child gives it: the init sets, on itself and so on the
        job, the RLIMIT_NOFILE soft limit, no_new_privs and CAP_SYS_ADMIN out of the bounding
        set (the same stages fail the start if they fail), and the job's dispositions (the
        init's handlers, reset by the exec; every other signal the spawner ignores set to
        default: a namespace's PID 1 gets no signal it has no handler for) and an empty
        mask; the C child makes its session and stdio, switches to the job's groups, gid and
        uid, and execs. The cwd (which ``_posixsubprocess`` would change to before the switch,
        as root) and the file to run are found first, by the init with the job's ids as its
        effective ones (root's kept, to switch back): the job's cwd is inherited. The file is
        the first candidate (``path``, or argv[0] in each PATH entry) that exists for the
        job's user: where the Python child's search would run a later one (its execve fails
        only with "not this file" errors), this one does not exist for that user either."""
        _op, _req, path, argv, env, cwd, uid, gid, groups, _fast = msg[:10]
        opts = options(msg)
        if opts.get("tty") or not cwd.startswith(b"/"):
            return -1  # TIOCSCTTY needs code in the child
        errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)  # before the soft limit is lowered
        try:
            if opts.get("nofile") is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (min(opts["nofile"], hard), hard))
            check(self.libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))
            check(self.libc.prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0))
            target = _enter_cwd_and_find(path, cwd, opts.get("lookup"), uid, gid, groups)
            if target is None:
                return -1
            fwd.install()
            for sig in self.reset_signals:
                if sig not in FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)  # SIGPIPE, SIGXFSZ: the C child's
            try:
                job = _posixsubprocess.fork_exec(
                    argv,
                    [target],
                    False,  # close_fds: every fd of ours is close-on-exec
                    (),
                    None,  # type: ignore[arg-type]  # cwd: the init's own, found above
                    env,
                    opts.get("stdin_fd", self.devnull),
                    -1,
                    -1,
                    out_fd,
                    -1,
                    err_fd,
                    errpipe_r,
                    errpipe_w,
                    True,  # restore_signals: SIGPIPE and SIGXFSZ to default
                    True,  # setsid
                    -1,
                    gid if gid >= 0 else None,
                    list(groups) if gid >= 0 else None,
                    uid if uid >= 0 else None,
                    -1,
                    None,  # type: ignore[arg-type]  # no preexec_fn (the stub says no None)
                    False,  # no vfork
                )
            except OSError:
                return -1
            os.close(errpipe_w)
            errpipe_w = -1
            if read_report(errpipe_r):  # it did not exec (EOF at exec: close-on-exec)
                os.waitpid(job, 0)
                return -1
            return job
        finally:
            os.close(errpipe_r)
            if errpipe_w >= 0:
                os.close(errpipe_w)

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


def _enter_cwd_and_find(
    name: bytes, cwd: bytes, search: bytes | None, uid: int, gid: int, groups: list[int]
) -> bytes | None:
    """With the job's groups, gid and uid as the effective ones: change to ``cwd`` and return
    the first of ``name``'s candidates (itself if it holds a slash or no search is asked for,
    else it in each entry of ``search``, the job's PATH) that exists for the job's user
    (``None``: the cwd or no candidate is reachable). Root's ids are back on return."""
    euid, egid, own_groups = os.geteuid(), os.getegid(), os.getgroups()
    try:
        if gid >= 0:
            os.setgroups(groups)
            os.setegid(gid)
        if uid >= 0:
            os.seteuid(uid)
        os.chdir(cwd)
        if search is None or b"/" in name:
            candidates = [name]
        elif search:
            candidates = [os.path.join(entry, name) for entry in search.split(b":")]
        else:
            candidates = []
        for candidate in candidates:
            try:
                os.stat(candidate)
            except OSError as e:
                if e.errno in LOOKUP_SKIP:
                    continue
                return None
            return candidate
        return None
    except OSError:
        return None
    finally:
        if uid >= 0:
            os.seteuid(euid)
        if gid >= 0:
            os.setegid(egid)
            os.setgroups(own_groups)


class _Forwarder:
    """A sandbox init's handler of :data:`FORWARDED`: each signal goes on to the job's main
    process, or waits for its pid to be known (:meth:`start`)."""

    def __init__(self) -> None:
        self.job = 0
        self.pending: list[int] = []

    def __call__(self, sig: int, _frame: object) -> None:
        if self.job <= 0:
            self.pending.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.job, sig)

    def install(self) -> None:
        for sig in FORWARDED:
            signal.signal(sig, self)

    def uninstall(self) -> None:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)

    def start(self, job: int) -> None:
        self.job = job
        pending, self.pending = self.pending, []
        for sig in pending:
            self(sig, None)


def _relay(job: int, status_w: int, forwarder: _Forwarder) -> None:
    """The init's life: forward signals to the job, reap every process of the namespace, and
    when the job's main process ends, write its raw wait status and exit (the kernel then kills
    what is left in the namespace; the manager kills what is left in the cgroup anyway)."""
    os.closerange(0, status_w)
    os.closerange(status_w + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    forwarder.install()
    forwarder.start(job)
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
