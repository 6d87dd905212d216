"""The commands that start jobs: start and run (the others are in :mod:`.control`; the
fleet's ``--on`` is added to these two by :mod:`.fleet_run`)."""

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
from jobworker.client.cli.exits import CommandExit, Exit, StdoutClosed, finish, warn
from jobworker.client.cli.render import outcome
from jobworker.client.cli.session import Session, follow_output, remote, wait_for_end
from jobworker.client.cli.settings import settings_of
from jobworker.errors import InvalidArgument, JobworkerError
from jobworker.limits import Limits
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


@click.command(context_settings=JOB_CONTEXT)
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


@click.command(context_settings=JOB_CONTEXT)
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
