"""``worker``: the command line client of workerd.

Every remote command goes through :class:`jobworker.client.Client`; this module never talks
gRPC itself. It is imported lazily (with :mod:`jobworker.pki`), so ``worker --help`` and shell
completion start fast.

Errors end the command with one line on stderr and an exit code from :class:`Exit`; the table is
in ``worker --help``. ``wait`` and ``run`` pass the job's own exit code through (128 + N when
signal N ended it), so for them a code in the 64-78 range may also be the job's: scripts that
must tell the two apart read ``worker status --json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import gc
import getpass
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar

import click
from click.shell_completion import CompletionItem, get_completion_class

from jobworker.api.errors import RemoteError
from jobworker.errors import (
    HostError,
    InvalidArgument,
    JobNotFound,
    JobworkerError,
    LimitUnavailable,
    PermissionDenied,
    ShuttingDown,
)
from jobworker.limits import Limits
from jobworker.spec import JobState, JobStatus

if TYPE_CHECKING:
    from jobworker.client import Client

T = TypeVar("T")

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""Same as :data:`jobworker.client.DEFAULT_ADDRESS` and workerd's default listen address."""
DEFAULT_TIMEOUT = 30.0
DEFAULT_RECONNECT = 60.0
PROG = "worker"
COMPLETE_VAR = "_WORKER_COMPLETE"


class Exit(enum.IntEnum):
    """The exit codes of ``worker`` (besides the job's own, passed through by wait and run)."""

    OK = 0
    USAGE = 64
    """Bad command line: unknown option, missing argument, a value that does not parse."""
    INVALID = 65
    """The daemon refused the request: command not found, bad cwd, limit above its maximum."""
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
    PERMISSION = 77
    """The caller's role forbids the action (e.g. a viewer starting a job)."""
    CONFIG = 78
    """Local configuration: certificate or key missing, unreadable or invalid; no user picked;
    certs init would overwrite files."""
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
  {Exit.PERMISSION}    permission denied (your role forbids it)
  {Exit.CONFIG}    local configuration: certificates missing/invalid, no user
  {Exit.INTERRUPTED}   interrupted by Ctrl+C (run: detached by a second Ctrl+C)
  {Exit.STDOUT_CLOSED}   stdout closed by the reader (e.g. | head); quiet
"""


class ConfigError(JobworkerError):
    """The client's own configuration is unusable (exit :attr:`Exit.CONFIG`)."""


class _Exit(Exception):
    """End the command with ``code`` after printing ``message`` (if any) on stderr."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _StdoutClosed(Exception):
    """The reader of stdout went away."""


# -- connection settings ----------------------------------------------------------------------


def default_pki_dirs() -> list[Path]:
    """Where a PKI directory is looked for when neither --pki nor WORKER_PKI is given."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(config) / "jobworker" / "pki", Path("/etc/jobworker/pki")]


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """How to reach the daemon, from options and ``WORKER_*`` variables."""

    addr: str = DEFAULT_ADDRESS
    pki: Path | None = None
    user: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    reconnect: float = DEFAULT_RECONNECT
    follow: bool = False
    """The original's ``worker -f logs ID``: ``-f`` given before the command."""

    def pki_dir(self) -> Path:
        if self.pki is not None:
            return self.pki
        for candidate in default_pki_dirs():
            if (candidate / "ca.pem").exists():
                return candidate
        looked = ", ".join(str(p) for p in default_pki_dirs())
        raise ConfigError(
            "no client certificate configured: give --pki DIR and --user NAME (or WORKER_PKI "
            f"and WORKER_USER), or --ca/--cert/--key; looked for a PKI in {looked}"
        )

    def identity(self, pki: Path) -> str:
        """The user whose certificate to use: --user, else the login name if the PKI has a
        certificate for it, else the only user certificate in the PKI."""
        if self.user:
            return self.user
        users = pki_users(pki)
        with contextlib.suppress(Exception):
            login = getpass.getuser()
            if login in users:
                return login
        if len(users) == 1:
            return users[0]
        raise ConfigError(
            f"which identity? give --user NAME (or WORKER_USER); {pki} has certificates for "
            f"{', '.join(users) or 'nobody'}"
        )

    def tls_paths(self) -> tuple[Path, Path, Path]:
        """(ca, cert, key): explicit files win over those picked from the PKI directory."""
        if self.ca and self.cert and self.key:
            return self.ca, self.cert, self.key
        pki = self.pki_dir()
        user = self.identity(pki)
        return (
            self.ca or pki / "ca.pem",
            self.cert or pki / f"{user}.pem",
            self.key or pki / f"{user}-key.pem",
        )

    def connect(self) -> Client:
        """A client for the daemon; raises :class:`ConfigError` for unusable certificates."""
        # grpc's C core logs failed handshakes and connects on stderr; the CLI reports errors
        # itself, in one line. GRPC_VERBOSITY=debug still works for debugging.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        from jobworker.client import Client

        ca, cert, key = self.tls_paths()
        try:
            return Client.from_files(self.addr, ca, cert, key, timeout=self.timeout)
        except InvalidArgument as e:
            raise ConfigError(str(e)) from e


def pki_users(pki: Path) -> list[str]:
    """Names with a certificate and key in a PKI directory (not the CA or the server)."""
    try:
        names = sorted(p.name.removesuffix(".pem") for p in pki.glob("*.pem"))
    except OSError:
        return []
    return [
        n
        for n in names
        if n not in {"ca", "server"} and not n.endswith("-key") and (pki / f"{n}-key.pem").exists()
    ]


def _settings(ctx: click.Context) -> Settings:
    obj = ctx.find_object(Settings)
    assert obj is not None, "the worker group sets the settings"
    return obj


# -- running coroutines and mapping errors to exit codes --------------------------------------


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _error_exit(e: JobworkerError, addr: str) -> _Exit:
    """The one translation from the library's errors to exit codes and messages."""
    if isinstance(e, ConfigError):
        return _Exit(Exit.CONFIG, str(e))
    if isinstance(e, JobNotFound):
        return _Exit(Exit.NOT_FOUND, str(e))
    if isinstance(e, PermissionDenied):
        return _Exit(Exit.PERMISSION, f"permission denied: {e}")
    if isinstance(e, LimitUnavailable):
        return _Exit(Exit.LIMIT_UNAVAILABLE, str(e))
    if isinstance(e, InvalidArgument):
        return _Exit(Exit.INVALID, str(e))
    if isinstance(e, ShuttingDown):
        message = f"cannot reach workerd at {addr}: {e}"
        if "handshake" in str(e).lower():
            message += (
                " (the TLS handshake failed: is your certificate from the daemon's CA, "
                "and --ca the CA of its certificate?)"
            )
        return _Exit(Exit.UNAVAILABLE, message)
    if isinstance(e, RemoteError) and e.code == "DEADLINE_EXCEEDED":
        return _Exit(Exit.UNAVAILABLE, f"workerd at {addr} did not answer in time: {e}")
    if isinstance(e, HostError):
        return _Exit(Exit.INTERNAL, f"workerd failed: {e}")
    return _Exit(Exit.INTERNAL, f"unexpected reply from workerd at {addr}: {e}")


def _transient(e: JobworkerError) -> bool:
    """A failure that a new connection may cure (the daemon restarting, a dropped link)."""
    if isinstance(e, ShuttingDown):
        return True
    return isinstance(e, RemoteError) and e.code in {"CANCELLED", "UNKNOWN", "ABORTED"}


def _warn(message: str) -> None:
    click.echo(f"{PROG}: {message}", err=True)


class _Session:
    """The client of one command, replaced by a fresh one after a dropped connection (a new
    channel connects at once instead of after grpc's growing reconnect backoff)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = settings.connect()

    async def renew(self) -> None:
        old, self.client = self.client, self.settings.connect()
        await old.close()

    async def close(self) -> None:
        await self.client.close()

    async def retrying(
        self,
        what: Callable[[], str],
        attempt: Callable[[], Coroutine[Any, Any, T]],
        progress: Callable[[], int] = lambda: 0,
    ) -> T:
        """Run ``attempt`` again after a dropped connection until it succeeds or
        ``reconnect`` seconds pass without progress. Only for calls that are safe to repeat
        (wait; logs from an offset). ``progress`` tells whether an attempt got anywhere."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        delay = 0.05
        seen = progress()
        while True:
            try:
                return await attempt()
            except JobworkerError as e:
                if not _transient(e):
                    raise
                if progress() != seen:
                    seen, deadline, delay = progress(), None, 0.05
                if deadline is None:
                    deadline = loop.time() + self.settings.reconnect
                    _warn(f"connection to workerd lost ({e}); reconnecting to {what()}")
                if loop.time() >= deadline:
                    raise ShuttingDown(
                        f"gave up reconnecting after {self.settings.reconnect:g}s: {e}"
                    ) from e
            await asyncio.sleep(delay)  # back off between attempts
            delay = min(delay * 2, 1.0)
            await self.renew()


async def _follow(session: _Session, job_id: str, follow: bool, out: BinaryIO) -> int:
    """Copy the job's output to ``out`` exactly, resuming at the last offset after a dropped
    connection. Returns the number of bytes written."""
    offset = 0

    async def attempt() -> None:
        nonlocal offset
        async for at, data in session.client.logs(job_id, follow=follow, offset=offset):
            if at != offset:
                raise RemoteError("DATA_LOSS", f"expected output at offset {offset}, got {at}")
            try:
                out.write(data)
                out.flush()
            except BrokenPipeError:
                raise _StdoutClosed() from None
            offset += len(data)

    await session.retrying(
        lambda: f"job {job_id}'s output at byte {offset}", attempt, lambda: offset
    )
    return offset


async def _wait(session: _Session, job_id: str) -> JobStatus:
    return await session.retrying(
        lambda: f"wait for job {job_id}", lambda: session.client.wait(job_id)
    )


def job_exit_code(status: JobStatus) -> int | None:
    """What wait/run exit with: the job's code, 128 + signal, or None (lost, still running)."""
    if status.exit_code is not None:
        return status.exit_code
    if status.signal is not None:
        return 128 + status.signal
    return None


def _finish(status: JobStatus) -> NoReturn:
    code = job_exit_code(status)
    if code is None:
        raise _Exit(Exit.JOB_LOST, f"job {status.id} has no exit status: {outcome(status)}")
    raise _Exit(code)


# -- presenting statuses ----------------------------------------------------------------------


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome(s: JobStatus) -> str:
    """One phrase: how the job is doing or how it ended."""
    if s.state is JobState.RUNNING:
        return "running"
    if s.exit_code is not None:
        how = f", exit code {s.exit_code}"
    elif s.signal is not None:
        how = f", killed by {_signame(s.signal)}"
    else:
        how = ""
    if s.oom_killed:
        how += " (out of memory)"
    reason = f" ({s.reason})" if s.reason else ""
    return f"{s.state.value}{reason}{how}"


def _short_exit(s: JobStatus) -> str:
    if s.exit_code is not None:
        return str(s.exit_code)
    if s.signal is not None:
        return _signame(s.signal)
    return "-"


def _time(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe_limits(limits: Limits) -> str:
    parts: list[str] = []
    if limits.cpu is not None:
        parts.append(f"cpu={limits.cpu:g}")
    if limits.cpu_weight is not None:
        parts.append(f"cpu-weight={limits.cpu_weight}")
    if limits.memory is not None:
        parts.append(f"memory={_size(limits.memory)}")
    if limits.pids is not None:
        parts.append(f"pids={limits.pids}")
    for io in limits.io:
        caps = [
            f"{name}={value}"
            for name, value in (
                ("rbps", io.read_bps),
                ("wbps", io.write_bps),
                ("riops", io.read_iops),
                ("wiops", io.write_iops),
            )
            if value is not None
        ]
        parts.append(f"io[{io.device}]={','.join(caps)}")
    return " ".join(parts) or "none"


def status_json(s: JobStatus) -> dict[str, Any]:
    """The ``--json`` shape of one job (stable keys; times in ISO 8601 UTC)."""
    return {
        "id": s.id,
        "state": s.state.value,
        "pid": s.pid,
        "exit_code": s.exit_code,
        "signal": s.signal,
        "oom_killed": s.oom_killed,
        "reason": s.reason,
        "owner": s.owner,
        "argv": list(s.argv),
        "started_at": _iso(s.started_at),
        "ended_at": _iso(s.ended_at),
        "output_bytes": s.output_bytes,
        "limits": dataclasses.asdict(s.limits),
        "usage": dataclasses.asdict(s.usage) if s.usage is not None else None,
    }


def status_text(s: JobStatus) -> str:
    rows = [
        ("id", s.id),
        ("state", outcome(s)),
        ("owner", s.owner),
        ("command", shlex.join(s.argv)),
        ("pid", str(s.pid)),
        ("started", _time(s.started_at)),
        ("ended", _time(s.ended_at)),
        ("output", _size(s.output_bytes)),
        ("limits", describe_limits(s.limits)),
    ]
    u = s.usage
    if u is not None:
        # Counters of a controller the job's group lacks read as zero (a hybrid host has only
        # cpu.stat): show the others when they say something.
        cpu = f"{u.cpu_user_usec / 1e6:.3f}s user, {u.cpu_system_usec / 1e6:.3f}s system"
        if u.nr_throttled:
            cpu += f", throttled {u.nr_throttled} times"
        rows.append(("cpu", cpu))
        if u.memory_current or u.memory_peak is not None:
            memory = _size(u.memory_current)
            if u.memory_peak is not None:
                memory += f" (peak {_size(u.memory_peak)})"
            rows.append(("memory", memory))
        if u.io_read_bytes or u.io_write_bytes:
            rows.append(("io", f"read {_size(u.io_read_bytes)}, written {_size(u.io_write_bytes)}"))
        if u.pids_current:
            rows.append(("tasks", str(u.pids_current)))
    return "\n".join(f"{name + ':':<9} {value}" for name, value in rows)


def list_text(jobs: Sequence[JobStatus]) -> str:
    header = ("ID", "STATE", "EXIT", "OWNER", "STARTED", "COMMAND")
    rows = [
        (s.id, s.state.value, _short_exit(s), s.owner, _time(s.started_at), shlex.join(s.argv))
        for s in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in [header, *rows]
    )


def _echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


# -- the command group ------------------------------------------------------------------------


class WorkerGroup(click.Group):
    """Maps every failure to one line on stderr and an exit code (:class:`Exit`)."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        code = self._main(args, prog_name or PROG, complete_var or COMPLETE_VAR, extra)
        # A failed RPC leaves reference cycles (error -> traceback -> frames -> call) that hold
        # grpc objects; left to the interpreter's exit they make grpc's shutdown wait ~2 s.
        gc.collect()
        sys.exit(code)

    def _main(
        self, args: Sequence[str] | None, prog_name: str, complete_var: str, extra: Any
    ) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return rv if isinstance(rv, int) else 0
        except _Exit as e:
            if e.message:
                _warn(e.message)
            return e.code
        except _StdoutClosed:
            _silence_stdout()
            return Exit.STDOUT_CLOSED
        except click.UsageError as e:
            e.show()
            return Exit.USAGE
        except click.ClickException as e:
            e.show()
            return e.exit_code
        except (click.Abort, KeyboardInterrupt):
            return Exit.INTERRUPTED
        except JobworkerError as e:
            failure = _error_exit(e, DEFAULT_ADDRESS)
            _warn(failure.message)
            return failure.code
        except BrokenPipeError:
            _silence_stdout()
            return Exit.STDOUT_CLOSED


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null so the interpreter's final flush of stdout cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _complete_job_ids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Job ids for shell completion; quietly nothing when the daemon cannot be asked."""
    # The group's callback does not run while completing: build the settings from its
    # parameters (options and WORKER_* variables), as it would.
    params = ctx.find_root().params
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: v for k, v in params.items() if k in fields and v is not None})

    async def ids() -> list[JobStatus]:
        async with dataclasses.replace(settings, timeout=2.0).connect() as client:
            return await client.list(all=True)

    try:
        jobs = _run(ids())
    except Exception:
        return []
    return [
        CompletionItem(s.id, help=f"{s.state.value}: {shlex.join(s.argv)}"[:60])
        for s in jobs
        if s.id.startswith(incomplete)
    ]


JOB_ID = click.argument("job_id", metavar="ID", shell_complete=_complete_job_ids)


@click.group(
    cls=WorkerGroup,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog=EXIT_CODES_HELP,
)
@click.option(
    "--addr",
    envvar="WORKER_ADDR",
    default=DEFAULT_ADDRESS,
    show_envvar=True,
    help="workerd's HOST:PORT.",
)
@click.option(
    "--pki",
    envvar="WORKER_PKI",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A `worker certs init` directory: uses ca.pem, USER.pem and USER-key.pem.  "
    "[default: ~/.config/jobworker/pki, else /etc/jobworker/pki]",
)
@click.option(
    "--user",
    envvar="WORKER_USER",
    show_envvar=True,
    help="Whose certificate to use from --pki.  [default: your login name if the PKI has it, "
    "else its only user]",
)
@click.option(
    "--ca",
    envvar="WORKER_CA",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate the daemon's certificate must chain to (overrides --pki).",
)
@click.option(
    "--cert",
    envvar="WORKER_CERT",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Your client certificate (overrides --pki/--user).",
)
@click.option(
    "--key",
    envvar="WORKER_KEY",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Your client key (overrides --pki/--user).",
)
@click.option(
    "--timeout",
    envvar="WORKER_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    default=DEFAULT_TIMEOUT,
    help="Seconds to wait for an answer (not for wait, logs -f or run).",
)
@click.option(
    "--reconnect",
    envvar="WORKER_RECONNECT",
    show_envvar=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=DEFAULT_RECONNECT,
    help="Seconds logs, wait and run keep trying to reconnect after the connection drops.",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Only before `logs`: `worker -f logs ID` is `worker logs -f ID`.",
)
@click.version_option(package_name="jobworker", prog_name=PROG)
@click.pass_context
def cli(
    ctx: click.Context,
    addr: str,
    pki: Path | None,
    user: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    timeout: float,
    reconnect: float,
    follow: bool,
) -> None:
    """Run commands on a workerd, each in its own cgroup, and stream their output.

    \b
      id=$(worker start -- sh -c 'for i in 1 2 3; do echo $i; sleep 1; done')
      worker logs -f "$id"
      worker status "$id"
      worker run --memory 256M --pids 64 -- make -j4; echo "exit $?"

    Connection options can also be set in the environment (WORKER_ADDR, WORKER_PKI,
    WORKER_USER, ...). After `make run`, `. dev/env` sets them for the demo daemon.
    Shell completion: `eval "$(worker completion bash)"` (or zsh, fish).
    """
    ctx.obj = Settings(
        addr=addr,
        pki=pki,
        user=user,
        ca=ca,
        cert=cert,
        key=key,
        timeout=timeout,
        reconnect=reconnect,
        follow=follow,
    )
    if follow and ctx.invoked_subcommand != "logs":
        raise click.UsageError("-f/--follow before the command applies to `logs` only")


def _remote(settings: Settings, body: Callable[[_Session], Coroutine[Any, Any, T]]) -> T:
    """Run ``body`` with a client; the library's errors become exit codes here."""

    async def go() -> T:
        session = _Session(settings)
        try:
            return await body(session)
        finally:
            await session.close()

    try:
        return _run(go())
    except JobworkerError as e:
        failure = _error_exit(e, settings.addr)
    raise failure


# -- start / run ------------------------------------------------------------------------------


def _collect_io(
    read_bps: Sequence[str],
    write_bps: Sequence[str],
    read_iops: Sequence[str],
    write_iops: Sequence[str],
) -> list[str]:
    """Merge the per-key io flags into one ``DEV=key=value,...`` spec per device."""
    per_device: dict[str, list[str]] = {}
    for key, flag, values in (
        ("rbps", "--io-read-bps", read_bps),
        ("wbps", "--io-write-bps", write_bps),
        ("riops", "--io-read-iops", read_iops),
        ("wiops", "--io-write-iops", write_iops),
    ):
        for text in values:
            device, sep, value = text.partition("=")
            if not sep or not device.strip() or not value.strip():
                raise click.BadParameter(
                    f"{text!r} is not DEV=VALUE (e.g. /dev/sda=10M)", param_hint=flag
                )
            per_device.setdefault(device.strip(), []).append(f"{key}={value.strip()}")
    return [f"{device}={','.join(items)}" for device, items in per_device.items()]


def _limits(options: dict[str, Any]) -> Limits:
    try:
        return Limits.parse(
            cpu=options.pop("cpu"),
            cpu_weight=options.pop("cpu_weight"),
            memory=options.pop("memory"),
            pids=options.pop("pids"),
            io=_collect_io(
                options.pop("io_read_bps"),
                options.pop("io_write_bps"),
                options.pop("io_read_iops"),
                options.pop("io_write_iops"),
            ),
        )
    except InvalidArgument as e:
        raise click.UsageError(f"invalid limit: {e}") from e


def _env(items: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not name:
            raise click.BadParameter(f"{item!r} has no variable name", param_hint="--env")
        if not sep:
            if name not in os.environ:
                raise click.BadParameter(
                    f"{name} is not set here; give {name}=VALUE", param_hint="--env"
                )
            value = os.environ[name]
        env[name] = value
    return env


F = TypeVar("F", bound=Callable[..., Any])


def job_options(f: F) -> F:
    """LIMITS, --env and --cwd, shared by start and run."""
    decorators = [
        click.option("--cpu", metavar="CORES", help="CPU bandwidth in cores, e.g. 0.5 or 2."),
        click.option(
            "--cpu-weight", metavar="N", help="Relative CPU share, 1-10000 (100 = default)."
        ),
        click.option("--memory", metavar="SIZE", help="Memory limit, e.g. 512M or 2G (no swap)."),
        click.option("--pids", metavar="N", help="Most tasks (processes + threads) at once."),
        click.option(
            "--io-read-bps",
            multiple=True,
            metavar="DEV=RATE",
            help="Read bytes/s, e.g. /dev/sda=10M.",
        ),
        click.option(
            "--io-write-bps", multiple=True, metavar="DEV=RATE", help="Write bytes/s per device."
        ),
        click.option(
            "--io-read-iops", multiple=True, metavar="DEV=N", help="Read operations/s per device."
        ),
        click.option(
            "--io-write-iops", multiple=True, metavar="DEV=N", help="Write operations/s per device."
        ),
        click.option(
            "--env",
            "-e",
            "env",
            multiple=True,
            metavar="NAME=VALUE",
            help="Add a variable to the job's minimal environment; NAME alone copies yours.",
        ),
        click.option(
            "--cwd",
            metavar="DIR",
            help="Working directory on the daemon's host (absolute).  [default: /]",
        ),
        click.argument("command", nargs=-1, required=True, metavar="-- CMD [ARGS]..."),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


JOB_CONTEXT = {"allow_interspersed_args": False}
"""Everything after the command's first word belongs to the command (`worker run ls -l`)."""


@cli.command(context_settings=JOB_CONTEXT)
@job_options
@click.pass_context
def start(
    ctx: click.Context,
    /,
    command: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    **options: Any,
) -> None:
    """Start CMD as a job; print its id alone on stdout.

    \b
      id=$(worker start --memory 512M -- sh -c 'echo hello; sleep 30')
    """
    settings = _settings(ctx)
    limits, variables = _limits(options), _env(env)

    async def body(session: _Session) -> JobStatus:
        return await session.client.start(command, env=variables, cwd=cwd, limits=limits)

    click.echo(_remote(settings, body).id)


@cli.command(context_settings=JOB_CONTEXT)
@job_options
@click.pass_context
def run(
    ctx: click.Context,
    /,
    command: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    **options: Any,
) -> None:
    """Start CMD, stream its output, and exit with its exit code.

    Ctrl+C stops the job (SIGTERM, then SIGKILL after the daemon's grace period) and keeps
    streaming until it has ended; a second Ctrl+C detaches at once. When the reader of stdout
    goes away (`worker run -- seq 1000000 | head`) the job is stopped too, as SIGPIPE would.

    \b
      worker run --cpu 0.5 -- python3 -c 'print(sum(range(10**7)))'
    """
    settings = _settings(ctx)
    limits, variables = _limits(options), _env(env)
    out = sys.stdout.buffer

    async def body(session: _Session) -> JobStatus:
        status = await session.client.start(command, env=variables, cwd=cwd, limits=limits)
        with _interruptible(session, status.id) as detached:
            try:
                await _follow(session, status.id, True, out)
                final = await _wait(session, status.id)
            except _StdoutClosed:
                # As SIGPIPE would end a local command whose reader went away.
                with contextlib.suppress(JobworkerError):
                    await session.client.stop(status.id)
                raise
            except asyncio.CancelledError:
                if detached():
                    raise _Exit(
                        Exit.INTERRUPTED,
                        f"detached from job {status.id} (it is being stopped; "
                        f"`worker status {status.id}`)",
                    ) from None
                raise
        return final

    final = _remote(settings, body)
    if final.state is JobState.STOPPED or final.oom_killed:
        _warn(f"job {final.id} {outcome(final)}")
    _finish(final)


@contextlib.contextmanager
def _interruptible(session: _Session, job_id: str) -> Iterator[Callable[[], bool]]:
    """First SIGINT: stop the job (and let the caller stream it to its end). Second: cancel
    the caller's task (detach). Yields a function telling whether the second one came."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    count = 0
    stopping: list[asyncio.Task[Any]] = []

    async def stop() -> None:
        try:
            await session.client.stop(job_id)
        except JobworkerError as e:
            _warn(f"could not stop job {job_id}: {e}")

    def on_sigint() -> None:
        nonlocal count
        count += 1
        if count == 1:
            _warn(f"stopping job {job_id} (press Ctrl+C again to detach)")
            stopping.append(loop.create_task(stop()))
        elif task is not None:
            task.cancel()

    # Signal handlers exist only in the main thread (tests drive the CLI from others).
    installed = threading.current_thread() is threading.main_thread()
    if installed:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        yield lambda: count >= 2
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
        for t in stopping:
            t.cancel()


# -- stop / status / list / wait / logs -------------------------------------------------------


@cli.command()
@JOB_ID
@click.option(
    "--grace",
    type=click.FloatRange(0, 3600),
    metavar="SECONDS",
    help="Seconds between SIGTERM and SIGKILL.  [default: the daemon's]",
)
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.pass_context
def stop(ctx: click.Context, job_id: str, grace: float | None, as_json: bool) -> None:
    """Stop a job: SIGTERM to all its processes, SIGKILL after the grace period.

    Prints how it ended. Stopping a job that has already ended just reports that.
    """

    async def body(session: _Session) -> JobStatus:
        return await session.client.stop(job_id, grace)

    status = _remote(_settings(ctx), body)
    if as_json:
        _echo_json(status_json(status))
    else:
        click.echo(f"{status.id} {outcome(status)}")


@cli.command()
@JOB_ID
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job: state, exit code or signal, owner, command, times, limits, usage."""

    async def body(session: _Session) -> JobStatus:
        return await session.client.status(job_id)

    s = _remote(_settings(ctx), body)
    click.echo(json.dumps(status_json(s), indent=2) if as_json else status_text(s))


@cli.command(name="list")
@click.option(
    "--all",
    "-a",
    "all_jobs",
    is_flag=True,
    help="Every job your role may see (admins and viewers: everyone's), not only yours.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def list_(ctx: click.Context, all_jobs: bool, as_json: bool) -> None:
    """List your jobs, oldest first."""

    async def body(session: _Session) -> list[JobStatus]:
        return await session.client.list(all=all_jobs)

    jobs = sorted(_remote(_settings(ctx), body), key=lambda s: (s.started_at, s.id))
    if as_json:
        _echo_json([status_json(s) for s in jobs])
    elif jobs:
        click.echo(list_text(jobs))
    else:
        _warn("no jobs" + ("" if all_jobs else " (`worker list --all` shows others' jobs)"))


@cli.command()
@JOB_ID
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.pass_context
def wait(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Wait for a job to end; exit with its exit code (128+N when signal N ended it)."""
    settings = _settings(ctx)

    async def body(session: _Session) -> JobStatus:
        await session.client.status(job_id)  # a fast first answer: not found, no daemon, ...
        return await _wait(session, job_id)

    final = _remote(settings, body)
    if as_json:
        _echo_json(status_json(final))
    _finish(final)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job has ended.")
@JOB_ID
@click.pass_context
def logs(ctx: click.Context, follow: bool, job_id: str) -> None:
    """Write a job's output (stdout and stderr, interleaved) to stdout, byte for byte.

    With -f, stream until the job has ended and every byte is out; a dropped connection is
    re-established and the stream resumes where it stopped.
    """
    settings = _settings(ctx)
    out = sys.stdout.buffer

    async def body(session: _Session) -> None:
        await session.client.status(job_id)  # a fast first answer: not found, no daemon, ...
        await _follow(session, job_id, follow or settings.follow, out)

    _remote(settings, body)


# -- certs / completion -----------------------------------------------------------------------


@cli.group()
def certs() -> None:
    """Make certificates for workerd and its users."""


@certs.command(name="init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: str(default_pki_dirs()[0]),
    show_default="~/.config/jobworker/pki",
    help="Where to write the PKI (created 0700).",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="NAME:ROLE",
    help="A user certificate to make (roles: admin, user, viewer); repeatable.  "
    "[default for a new CA: admin:admin, alice:user, viewer:viewer]",
)
@click.option(
    "--server-name",
    multiple=True,
    metavar="NAME",
    help="Extra DNS name or IP for the server certificate (localhost, 127.0.0.1 and ::1 "
    "are always in); repeatable.",
)
@click.option("--force", is_flag=True, help="Start over: new CA and certificates, replacing files.")
def certs_init(
    directory: Path, users: tuple[str, ...], server_name: tuple[str, ...], force: bool
) -> None:
    """Create a CA, a server certificate and user certificates (ECDSA P-256), offline.

    Run again with --user to add users to an existing CA. For development and small fleets;
    with your own CA, give workerd --ca/--cert/--key and clients certificates carrying
    clientAuth, the identity as CN and the role as OU.

    \b
      worker certs init --dir /etc/jobworker/pki --user ops:admin --server-name worker1.example
      workerd --pki /etc/jobworker/pki
    """
    from jobworker.pki import PkiError, init_pki, parse_user

    try:
        parsed = [parse_user(u) for u in users]
    except PkiError as e:
        raise click.BadParameter(str(e), param_hint="--user") from e
    try:
        pki = init_pki(directory, parsed, server_name, force=force)
    except PkiError as e:
        raise _Exit(Exit.CONFIG, str(e)) from e
    except OSError as e:
        raise _Exit(Exit.CONFIG, f"cannot write the PKI in {directory}: {e}") from e
    click.echo(f"PKI in {pki.dir}:")
    click.echo(f"  CA      {pki.ca.cert.name}, {pki.ca.key.name} (keep the key safe)")
    click.echo(f"  server  {pki.server.cert.name}, {pki.server.key.name}")
    for name, pair in pki.users.items():
        click.echo(f"  {name:<7} {pair.cert.name}, {pair.key.name}")
    click.echo(f"Start the daemon with: workerd --pki {pki.dir}")
    click.echo(f"Use it with: worker --pki {pki.dir} --user NAME ...")


@cli.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
      bash: echo 'eval "$(worker completion bash)"' >> ~/.bashrc
      zsh:  echo 'eval "$(worker completion zsh)"' >> ~/.zshrc
      fish: worker completion fish > ~/.config/fish/completions/worker.fish
    """
    cls = get_completion_class(shell)
    assert cls is not None, "click supports bash, zsh and fish"
    click.echo(cls(cli, {}, PROG, COMPLETE_VAR).source())


def main() -> NoReturn:
    """The ``worker`` console script."""
    try:
        cli.main(prog_name=PROG)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    else:  # pragma: no cover - WorkerGroup.main always exits
        code = 0
    # After a failed connection grpc's C core takes a second or more to shut down at
    # interpreter exit (measured: 1.2 s after the last line was printed). Everything the
    # command had to say is written: flush it and leave.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
