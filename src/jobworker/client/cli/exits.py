"""Exit codes of ``worker``, and the one translation of the library's errors into them."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from typing import NoReturn

import click

from jobworker.client.cli.render import outcome
from jobworker.errors import (
    ConfigError,
    HostError,
    InvalidArgument,
    JobNotFound,
    JobRunning,
    JobworkerError,
    LimitUnavailable,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    StdinClosed,
)
from jobworker.spec import JobStatus

PROG = "worker"


class Exit(enum.IntEnum):
    """The exit codes of ``worker`` (besides the job's own, passed through by wait and run)."""

    OK = 0
    USAGE = 64
    """Bad command line: unknown option, missing argument, a value that does not parse."""
    INVALID = 65
    """The daemon refused the request: command not found, bad cwd, limit above its maximum, rm
    of a job that still runs."""
    NOT_FOUND = 66
    """No such job, or one the caller may not see."""
    LIMIT_UNAVAILABLE = 67
    """The host cannot enforce a requested limit (cgroup v2 controller missing)."""
    UNAVAILABLE = 69
    """workerd cannot be reached (not running, wrong address, TLS handshake refused), is
    shutting down, timed out, or the connection was lost and did not come back in time."""
    INTERNAL = 70
    """workerd failed (a host error on its side, or an unexpected reply)."""
    JOB_LOST = 71
    """wait/run: the job has no exit status: the daemon died while it ran."""
    RESOURCE_EXHAUSTED = 75
    """The host has no room right now (out of processes or memory); try again later."""
    PERMISSION = 77
    """The caller's role forbids the action (e.g. a viewer starting a job)."""
    CONFIG = 78
    """Local configuration: certificate or key missing, unreadable or invalid; no user picked;
    certs init would overwrite files."""
    TIMEOUT = 124
    """run: the job was stopped by its deadline (--timeout, or the daemon's maximum runtime),
    as timeout(1) exits."""
    INTERRUPTED = 130
    """Ctrl+C while waiting or following (for run: the second Ctrl+C, which detaches)."""
    STDOUT_CLOSED = 141
    """stdout was closed by its reader (``worker logs ID | head``); nothing is printed."""


EXIT_CODES_HELP = f"""\b
Exit codes:
  0     success (wait/run: the job exited 0)
  1-255 wait/run: the job's exit code; 128+N when signal N ended it
  {Exit.USAGE}    usage: bad option, argument or value
  {Exit.INVALID}    request refused as invalid (command not found, bad cwd, limit above max)
  {Exit.NOT_FOUND}    job not found (or not visible to you)
  {Exit.LIMIT_UNAVAILABLE}    a limit this host cannot enforce (cgroup controller missing)
  {Exit.UNAVAILABLE}    workerd unreachable, shutting down, timed out or connection lost
  {Exit.INTERNAL}    workerd failed (host error) or replied unexpectedly
  {Exit.JOB_LOST}    wait/run: the job was lost (the daemon died while it ran)
  {Exit.RESOURCE_EXHAUSTED}    the host has no room right now (out of processes or memory)
  {Exit.PERMISSION}    permission denied (your role forbids it)
  {Exit.CONFIG}    local configuration: certificates missing/invalid, no user
  {Exit.TIMEOUT}   run: the job was stopped by its deadline (--timeout), as timeout(1)
  {Exit.INTERRUPTED}   interrupted by Ctrl+C (run: detached by a second Ctrl+C)
  {Exit.STDOUT_CLOSED}   stdout closed by the reader (e.g. | head); quiet
"""


class CommandExit(Exception):
    """End the command with ``code`` after printing ``message`` (if any) on stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StdoutClosed(Exception):
    """The reader of stdout went away."""


def warn(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


def error_exit(e: JobworkerError, addr: str) -> CommandExit:
    """The one translation from the library's errors to exit codes and messages."""
    if isinstance(e, ConfigError):
        return CommandExit(Exit.CONFIG, str(e))
    if isinstance(e, JobNotFound):
        return CommandExit(Exit.NOT_FOUND, str(e))
    if isinstance(e, PermissionDenied):
        return CommandExit(Exit.PERMISSION, f"permission denied: {e}")
    if isinstance(e, LimitUnavailable):
        return CommandExit(Exit.LIMIT_UNAVAILABLE, str(e))
    if isinstance(e, JobRunning | StdinClosed):
        return CommandExit(Exit.INVALID, str(e))
    if isinstance(e, ResourceExhausted):
        return CommandExit(Exit.RESOURCE_EXHAUSTED, f"workerd has no room for the request: {e}")
    if isinstance(e, InvalidArgument):
        return CommandExit(Exit.INVALID, str(e))
    if isinstance(e, ShuttingDown):
        if "DNS resolution failed" in str(e):
            # grpc's text names its resolver's internals (C-ares, qtype=AAAA, is_balancer).
            host = _host_of(addr)
            return CommandExit(
                Exit.UNAVAILABLE,
                f"cannot reach workerd at {addr}: the host name {host!r} could not be resolved",
            )
        message = f"cannot reach workerd at {addr}: {e}"
        if "handshake" in str(e).lower():
            message += (
                " (the TLS handshake failed: is your certificate from the daemon's CA, "
                "and --ca the CA of its certificate?)"
            )
        return CommandExit(Exit.UNAVAILABLE, message)
    if isinstance(e, RemoteError) and e.code == "DEADLINE_EXCEEDED":
        return CommandExit(Exit.UNAVAILABLE, f"workerd at {addr} did not answer in time: {e}")
    if isinstance(e, HostError):
        return CommandExit(Exit.INTERNAL, f"workerd failed: {e}")
    return CommandExit(Exit.INTERNAL, f"unexpected reply from workerd at {addr}: {e}")


def _host_of(addr: str) -> str:
    """The host part of ``HOST:PORT``, ``[V6]:PORT`` or a bare ``HOST``."""
    if addr.startswith("["):
        return addr[1:].partition("]")[0]
    host, sep, _ = addr.rpartition(":")
    return host if sep and ":" not in host else addr


def job_exit_code(status: JobStatus) -> int | None:
    """What wait/run exit with: the job's code, 128 + signal, or None (lost, still running)."""
    if status.exit_code is not None:
        return status.exit_code
    if status.signal is not None:
        return 128 + status.signal
    return None


def finish(status: JobStatus) -> NoReturn:
    code = job_exit_code(status)
    if code is None:
        raise CommandExit(Exit.JOB_LOST, f"job {status.id} has no exit status: {outcome(status)}")
    raise CommandExit(code)


def silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def leave(code: int) -> NoReturn:
    """End the process with ``code`` once stdout and stderr are flushed.

    After a failed connection grpc's C core takes a second or more to shut down at
    interpreter exit (measured: 1.2 s after the last line was printed). Everything the
    command had to say is written: flush it and leave.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
