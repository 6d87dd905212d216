"""Client-visible values: what a job is asked to be (:class:`JobSpec`) and what it is
(:class:`JobStatus`). Pure data, no handles; safe to serialise, compare and persist."""

from __future__ import annotations

import enum
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from jobworker.errors import InvalidArgument
from jobworker.limits import Limits

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MINIMAL_ENV: Mapping[str, str] = {"PATH": DEFAULT_PATH, "LANG": "C.UTF-8", "HOME": "/"}
"""What every job's environment starts from; the request's variables are laid on top.
Never the daemon's own environment."""

MAX_ARG_BYTES = 128 * 1024
"""Linux's MAX_ARG_STRLEN: execve refuses (E2BIG) an argument or a ``NAME=value`` variable
that is as long or longer, since the limit counts its terminating NUL."""
MAX_ARGV_ENV_BYTES = 1024 * 1024
"""Our cap on argv + env together (the kernel allows about a quarter of the stack rlimit)."""
MAX_OWNER_BYTES = 256
DEADLINE_REASON = "deadline exceeded"
"""In the stop reason of a job stopped by its deadline (:attr:`JobSpec.timeout`)."""
NO_ENV: Mapping[str, str] = MappingProxyType({})
"""The ``env`` of every spec that adds no variable: one shared, read-only empty mapping."""
NO_LIMITS = Limits()
"""The ``limits`` of every spec and status that sets none: one shared object. A daemon keeps
thousands of ended jobs; one empty dict and one Limits each, scattered among the allocations of
the jobs after them, fragmented its heap."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a job runs as; ``-1`` keeps the daemon's own (root must be granted explicitly)."""

    uid: int = -1
    gid: int = -1
    groups: tuple[int, ...] = field(default_factory=tuple)


class Network(enum.StrEnum):
    """A sandboxed job's network: the host's, or a namespace of its own with only loopback."""

    HOST = "host"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Sandbox:
    """The isolation a job runs in: its own PID, mount, IPC and UTS namespaces (and network
    namespace with :attr:`Network.NONE`), private ``/tmp`` and ``/dev/shm``, the manager's
    hidden paths masked, ``no_new_privs``, and the default ``RLIMIT_NOFILE``."""

    network: Network = Network.HOST

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "network", Network(self.network))
        except ValueError:
            raise InvalidArgument(
                f"network must be one of {', '.join(Network)}, got {self.network!r}"
            ) from None


@dataclass(frozen=True, slots=True)
class TerminalSize:
    """A terminal's size in characters (what ``TIOCSWINSZ`` sets)."""

    rows: int = 24
    cols: int = 80

    def __post_init__(self) -> None:
        for name in ("rows", "cols"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
                raise InvalidArgument(f"terminal {name} must be from 1 to 65535, got {value!r}")


class JobState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"
    """Ended on its own (any exit code or signal)."""
    STOPPED = "stopped"
    """Ended because someone asked (stop, or manager shutdown)."""
    LOST = "lost"
    """Was running when the daemon died; killed through its cgroup at the next start."""

    @property
    def ended(self) -> bool:
        return self is not JobState.RUNNING


def _check_text(what: str, value: str, limit: int = MAX_ARG_BYTES) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if "\0" in value:
        raise InvalidArgument(f"{what} contains a NUL byte, which a process cannot receive")
    if len(os.fsencode(value)) > limit:
        raise InvalidArgument(f"{what} is longer than {limit} bytes")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """What to run. Validated on construction: a bad spec never reaches the host."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    """Variables added to :data:`MINIMAL_ENV` (they override it)."""
    cwd: str = "/"
    owner: str = ""
    limits: Limits = field(default_factory=Limits)
    sandbox: Sandbox | None = None
    """``None``: the job shares the host's namespaces (the library's default; the daemon
    sandboxes every job unless an admin asks otherwise)."""
    timeout: float | None = None
    """Seconds the job may run: at the deadline it is stopped (SIGTERM, the grace, SIGKILL) with
    :data:`DEADLINE_REASON` in its stop reason. ``None``: no deadline."""
    stdin: bool = False
    """Give the job a pipe as its stdin, written through :meth:`JobManager.input` (else it
    reads ``/dev/null``). Always true for a job with a terminal."""
    terminal: TerminalSize | None = None
    """Give the job a pseudo-terminal of this size as its controlling terminal (its stdin,
    stdout and stderr; its output is the terminal's bytes). ``None``: pipes."""

    def __post_init__(self) -> None:
        if isinstance(self.argv, str | bytes) or not self.argv:
            raise InvalidArgument("argv must be a non-empty list of strings (the command first)")
        object.__setattr__(self, "argv", tuple(self.argv))
        if self.argv[0] == "":
            raise InvalidArgument("argv[0] (the command) must not be empty")
        total = 0
        for i, arg in enumerate(self.argv):
            _check_text(f"argv[{i}]", arg, MAX_ARG_BYTES - 1)
            total += len(os.fsencode(arg)) + 1
        for key, value in self.env.items():
            _check_text("environment variable name", key)
            if not key or "=" in key:
                raise InvalidArgument(
                    f"environment variable name {key!r} must be non-empty and contain no '='"
                )
            entry = len(os.fsencode(key)) + len(os.fsencode(value)) + 1
            if entry >= MAX_ARG_BYTES:
                name = key if len(key) <= 64 else key[:64] + "..."
                raise InvalidArgument(
                    f"environment variable {name}: NAME=value is {entry} bytes; "
                    f"at most {MAX_ARG_BYTES - 1} are accepted"
                )
            _check_text(f"environment variable {key}", value)
            total += entry + 1
        if total > MAX_ARGV_ENV_BYTES:
            raise InvalidArgument(
                f"argv and env together are {total} bytes; "
                f"at most {MAX_ARGV_ENV_BYTES} are accepted"
            )
        _check_text("cwd", self.cwd, 4096)
        if not self.cwd.startswith("/"):
            raise InvalidArgument(f"cwd must be an absolute path, got {self.cwd!r}")
        _check_text("owner", self.owner, MAX_OWNER_BYTES)
        if self.sandbox is not None and self.limits.pids is not None and self.limits.pids < 2:
            raise InvalidArgument(
                f"pids={self.limits.pids} leaves a sandboxed job no room: its PID namespace's "
                "init counts as a task too; ask for at least 2"
            )
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
                raise InvalidArgument(
                    f"timeout must be a number of seconds, got {type(self.timeout).__name__}"
                )
            if not (math.isfinite(self.timeout) and self.timeout > 0):
                raise InvalidArgument(
                    f"timeout must be a positive, finite number of seconds, got {self.timeout!r}"
                )
            object.__setattr__(self, "timeout", float(self.timeout))
        if self.terminal is not None:
            if not isinstance(self.terminal, TerminalSize):
                raise InvalidArgument("terminal must be a TerminalSize or None")
            object.__setattr__(self, "stdin", True)
        object.__setattr__(self, "stdin", bool(self.stdin))
        _share_defaults(self)

    def full_env(self) -> dict[str, str]:
        """The environment the job really gets."""
        return {**MINIMAL_ENV, **self.env}


@dataclass(frozen=True, slots=True)
class Usage:
    """Resource usage read from the job's cgroup (live while running, final after)."""

    cpu_user_usec: int = 0
    cpu_system_usec: int = 0
    memory_current: int = 0
    memory_peak: int | None = None
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    nr_throttled: int = 0
    pids_current: int = 0


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A snapshot of one job."""

    id: str
    state: JobState
    argv: tuple[str, ...]
    owner: str
    pid: int
    started_at: datetime
    ended_at: datetime | None = None
    exit_code: int | None = None
    """Set when the main process exited normally."""
    signal: int | None = None
    """Set when the main process was killed by a signal."""
    reason: str = ""
    """Why the job ended when it was not simply its own exit (who stopped it, lost, log cap)."""
    oom_killed: bool = False
    limits: Limits = field(default_factory=Limits)
    usage: Usage | None = None
    output_bytes: int = 0

    def __post_init__(self) -> None:
        _share_defaults(self)


def _share_defaults(value: JobSpec | JobStatus) -> None:
    """Put the shared :data:`NO_LIMITS` (and, in a spec, :data:`NO_ENV`) in place of an equal
    value of the caller's own."""
    if value.limits is not NO_LIMITS and value.limits == NO_LIMITS:
        object.__setattr__(value, "limits", NO_LIMITS)
    if isinstance(value, JobSpec) and value.env is not NO_ENV and not value.env:
        object.__setattr__(value, "env", NO_ENV)
