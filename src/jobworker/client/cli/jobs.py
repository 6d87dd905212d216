"""The job commands: start, run, stop, status, list, wait and logs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import click

from jobworker.client.cli import attach
from jobworker.client.cli.app import cli
from jobworker.client.cli.completion import JOB_ID, complete_job_ids
from jobworker.client.cli.exits import CommandExit, Exit, StdoutClosed, finish, warn
from jobworker.client.cli.render import echo_json, list_text, outcome, status_json, status_text
from jobworker.client.cli.session import Session, follow_output, remote, wait_for_end
from jobworker.client.cli.settings import settings_of
from jobworker.client.cli.stamps import Stamper, parse_since
from jobworker.errors import InvalidArgument, JobworkerError
from jobworker.limits import Limits
from jobworker.outlog import Stream
from jobworker.outread import Query
from jobworker.spec import DEADLINE_REASON, JobState, JobStatus, Network
from jobworker.units import DURATION_FORM, parse_duration


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


def _placement(options: dict[str, Any]) -> dict[str, Any]:
    """``network``, ``sandbox`` and ``timeout`` for :meth:`Client.start` from --network,
    --no-sandbox and --timeout."""
    network, no_sandbox = options.pop("network"), options.pop("no_sandbox")
    if no_sandbox and network is not None:
        raise click.UsageError("--network applies to the sandbox; it cannot go with --no-sandbox")
    timeout = options.pop("timeout")
    try:
        seconds = None if timeout is None else parse_duration(timeout, "--timeout")
    except InvalidArgument as e:
        raise click.BadParameter(str(e).removeprefix("--timeout: "), param_hint="--timeout") from e
    return {
        "network": None if network is None else Network(network),
        "sandbox": not no_sandbox,
        "timeout": seconds,
    }


F = TypeVar("F", bound=Callable[..., Any])


def job_options(f: F) -> F:
    """LIMITS, --env, --cwd, --network, --no-sandbox and --timeout, shared by start and run."""
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
        click.option(
            "--network",
            type=click.Choice(["host", "none"]),
            help="The job's network: the host's, or none (its own, with only loopback).  "
            "[default: the daemon's]",
        ),
        click.option(
            "--no-sandbox",
            is_flag=True,
            help="Run in the host's namespaces (admins only; for host-wide tools like ps).",
        ),
        click.option(
            "--timeout",
            metavar="DURATION",
            help="Stop the job when it has run this long (SIGTERM, then SIGKILL after the "
            f"daemon's grace): {DURATION_FORM}.  [default: the daemon's maximum runtime]",
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
    settings = settings_of(ctx)
    limits, variables, place = _limits(options), _env(env), _placement(options)

    async def body(session: Session) -> JobStatus:
        return await session.client.start(command, env=variables, cwd=cwd, limits=limits, **place)

    click.echo(remote(settings, body).id)


@cli.command(context_settings=JOB_CONTEXT)
@job_options
@click.option(
    "-i", "--interactive", is_flag=True, help="Stream stdin to the job; your EOF closes its stdin."
)
@click.option(
    "-t",
    "--tty",
    is_flag=True,
    help="Give the job a terminal (implies -i); Ctrl+P Ctrl+Q detaches, `worker attach` returns.",
)
@click.pass_context
def run(
    ctx: click.Context,
    /,
    command: tuple[str, ...],
    env: tuple[str, ...],
    cwd: str | None,
    interactive: bool,
    tty: bool,
    **options: Any,
) -> None:
    """Start CMD, stream its output, and exit with its exit code.

    Ctrl+C stops the job (SIGTERM, then SIGKILL after the daemon's grace period) and keeps
    streaming until it has ended; a second Ctrl+C detaches at once. When the reader of stdout
    goes away (`worker run -- seq 1000000 | head`) the job is stopped too, as SIGPIPE would.
    A job stopped by its deadline (--timeout) exits 124, as timeout(1) does.

    -i streams your stdin to the job (your EOF closes its stdin). -t gives it a terminal: yours
    goes raw, every key (Ctrl+C too) goes to the job, Ctrl+P Ctrl+Q detaches.

    \b
      worker run --cpu 0.5 -- python3 -c 'print(sum(range(10**7)))'
    """
    settings = settings_of(ctx)
    limits, variables, place = _limits(options), _env(env), _placement(options)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    size = attach.local_terminal_size() if tty else None

    async def body(session: Session) -> JobStatus:
        status = await session.client.start(
            command, env=variables, cwd=cwd, limits=limits, stdin=interactive, tty=size, **place
        )
        if tty:  # a terminal session: jobworker.client.cli.attach
            try:
                return await attach.terminal_session(session, status.id, 0)
            except attach.Detached:
                raise attach.detached_exit(status.id) from None
        async with attach.feeding_stdin(session, status.id, interactive):
            with _interruptible(session, status.id) as detached:
                try:
                    await follow_output(session, status.id, True, out, err)
                    final = await wait_for_end(session, status.id)
                except StdoutClosed:
                    # As SIGPIPE would end a local command whose reader went away.
                    with contextlib.suppress(JobworkerError):
                        await session.client.stop(status.id)
                    raise
                except asyncio.CancelledError:
                    if detached():
                        raise CommandExit(
                            Exit.INTERRUPTED,
                            f"detached from job {status.id} (it is being stopped; "
                            f"`worker status {status.id}`)",
                        ) from None
                    raise
            return final

    final = remote(settings, body)
    if final.state is JobState.STOPPED or final.oom_killed:
        warn(f"job {final.id} {outcome(final)}")
    if final.state is JobState.STOPPED and final.reason.startswith(f"stopped: {DEADLINE_REASON}"):
        raise CommandExit(Exit.TIMEOUT)
    finish(final)


@contextlib.contextmanager
def _interruptible(session: Session, job_id: str) -> Iterator[Callable[[], bool]]:
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
            warn(f"could not stop job {job_id}: {e}")

    def on_sigint() -> None:
        nonlocal count
        count += 1
        if count == 1:
            warn(f"stopping job {job_id} (press Ctrl+C again to detach)")
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

    async def body(session: Session) -> JobStatus:
        return await session.client.stop(job_id, grace)

    status = remote(settings_of(ctx), body)
    if as_json:
        echo_json(status_json(status))
    else:
        click.echo(f"{status.id} {outcome(status)}")


@cli.command()
@JOB_ID
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job: state, exit code or signal, owner, command, times, limits, usage."""

    async def body(session: Session) -> JobStatus:
        return await session.client.status(job_id)

    s = remote(settings_of(ctx), body)
    if as_json:
        echo_json(status_json(s))
    else:
        click.echo(status_text(s))


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

    async def body(session: Session) -> list[JobStatus]:
        return await session.client.list(all=all_jobs)

    jobs = sorted(remote(settings_of(ctx), body), key=lambda s: (s.started_at, s.id))
    if as_json:
        echo_json([status_json(s) for s in jobs])
    elif jobs:
        click.echo(list_text(jobs))
    else:
        warn("no jobs" + ("" if all_jobs else " (`worker list --all` shows others' jobs)"))


@cli.command()
@JOB_ID
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.pass_context
def wait(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Wait for a job to end; exit with its exit code (128+N when signal N ended it)."""
    settings = settings_of(ctx)

    async def body(session: Session) -> JobStatus:
        await session.client.status(job_id)  # a fast first answer: not found, no daemon, ...
        return await wait_for_end(session, job_id)

    final = remote(settings, body)
    if as_json:
        echo_json(status_json(final))
    finish(final)


@cli.command()
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job has ended.")
@click.option("--stdout", "only_stdout", is_flag=True, help="Only the job's stdout.")
@click.option("--stderr", "only_stderr", is_flag=True, help="Only the job's stderr.")
@click.option(
    "--timestamps",
    is_flag=True,
    help="Prefix each line with the time (RFC 3339, UTC, µs) the daemon received it.",
)
@click.option(
    "--tail",
    type=click.IntRange(min=0),
    metavar="N",
    help="Start at the last N lines (then follow, with -f).",
)
@click.option(
    "--since",
    metavar="DURATION|TIME",
    help="Start at what was received since then: 10m, 1h, or 2026-12-02T07:00:00Z.",
)
@JOB_ID
@click.pass_context
def logs(
    ctx: click.Context,
    follow: bool,
    only_stdout: bool,
    only_stderr: bool,
    timestamps: bool,
    tail: int | None,
    since: str | None,
    job_id: str,
) -> None:
    """Write a job's output to stdout, byte for byte: stdout and stderr interleaved in the
    order the daemon received them, or with --stdout or --stderr that stream alone.

    With -f, stream until the job has ended and every byte is out, the job's stderr to
    stderr (unless --stdout or --stderr picks one stream); a dropped connection is
    re-established and the stream resumes where it stopped.
    """
    settings = settings_of(ctx)
    if only_stdout and only_stderr:
        raise click.UsageError("--stdout and --stderr exclude each other; give neither for both")
    view = Stream.STDOUT if only_stdout else Stream.STDERR if only_stderr else None
    try:
        since_us = None if since is None else parse_since(since)
    except InvalidArgument as e:
        raise click.BadParameter(str(e).removeprefix("--since: "), param_hint="--since") from e
    follow = follow or settings.follow
    out = sys.stdout.buffer
    err = sys.stderr.buffer if follow and view is None else None
    query = Query(view=view, tail=tail, since_us=since_us)
    stamper = Stamper() if timestamps else None

    async def body(session: Session) -> None:
        await session.client.status(job_id)  # a fast first answer: not found, no daemon, ...
        await follow_output(session, job_id, follow, out, err, query=query, stamper=stamper)

    remote(settings, body)


@cli.command()
@click.argument(
    "job_ids", nargs=-1, required=True, metavar="ID...", shell_complete=complete_job_ids
)
@click.pass_context
def rm(ctx: click.Context, job_ids: tuple[str, ...]) -> None:
    """Remove ended jobs: their records and logs, for good (the owner or an admin may).

    A job that still runs is refused (stop it first); the others are removed.
    """
    settings = settings_of(ctx)

    async def body(session: Session) -> None:
        for job_id in job_ids:
            await session.client.remove(job_id)
            click.echo(job_id)

    remote(settings, body)
