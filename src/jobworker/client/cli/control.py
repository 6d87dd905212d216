"""The commands on jobs that exist: stop, status, list, wait, logs and rm (start and run are in
:mod:`.jobs`). A job id may be a fleet id, ``HOST/ID`` (docs/fleet.md): :func:`route` sends the
command to that host; with ``--fleet``, list shows every host's jobs (:mod:`.fleet`). Neither
imports the fleet's modules for a plain id or without ``--fleet``."""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING

import click

from jobworker.client.cli.exits import CommandExit, Exit, finish, warn
from jobworker.client.cli.render import echo_json, list_text, outcome, status_json, status_text
from jobworker.client.cli.session import Session, follow_output, remote, wait_for_end
from jobworker.client.cli.settings import settings_of
from jobworker.errors import InvalidArgument
from jobworker.spec import JobStatus

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

    from jobworker.client.fleet import Fleet, Host


def complete_job_ids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Job ids for shell completion (:func:`.completion.complete_job_ids`, imported when the
    shell asks)."""
    from jobworker.client.cli import completion

    return completion.complete_job_ids(ctx, param, incomplete)


JOB_ID = click.argument("job_id", metavar="ID", shell_complete=complete_job_ids)


def route(ctx: click.Context, fleet_id: str) -> str:
    """For a fleet id, point the command's settings at its host and return the job's own id;
    a plain id is returned as it is (the command goes to --addr)."""
    if "/" not in fleet_id:  # a plain id (the fleet's module is not needed to tell)
        return fleet_id
    from jobworker.api.fleet import split_fleet_id
    from jobworker.client.cli.fleet import fleet_remote, need_fleet

    try:
        parts = split_fleet_id(fleet_id)
    except InvalidArgument as e:
        raise click.BadParameter(str(e)) from e
    if parts is None:
        return fleet_id
    name, job_id = parts
    settings = settings_of(ctx)
    need_fleet(settings, f"the fleet job id {fleet_id}")

    async def find(fleet: Fleet) -> Host:
        try:
            return await fleet.host(name)
        except LookupError:
            raise CommandExit(
                Exit.NOT_FOUND, f"host {name!r} is not in the fleet (`worker hosts` lists them)"
            ) from None

    host = fleet_remote(settings, find)
    ctx.obj = dataclasses.replace(settings, addr=host.record.advertise, server_name=name)
    return job_id


@click.command()
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
    job_id = route(ctx, job_id)

    async def body(session: Session) -> JobStatus:
        return await session.client.stop(job_id, grace)

    status = remote(settings_of(ctx), body)
    if as_json:
        echo_json(status_json(status))
    else:
        click.echo(f"{status.id} {outcome(status)}")


@click.command()
@JOB_ID
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
@click.pass_context
def status(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Show a job: state, exit code or signal, owner, command, times, limits, usage."""
    job_id = route(ctx, job_id)

    async def body(session: Session) -> JobStatus:
        return await session.client.status(job_id)

    s = remote(settings_of(ctx), body)
    if as_json:
        echo_json(status_json(s))
    else:
        click.echo(status_text(s))


@click.command(name="list")
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
    """List your jobs, oldest first.

    With --fleet: every host's jobs, with a HOST column; hosts that do not answer are named on
    stderr.
    """
    settings = settings_of(ctx)
    if settings.fleet:
        from jobworker.client.cli.fleet import fleet_list

        fleet_list(settings, all_jobs, as_json)
        return

    async def body(session: Session) -> list[JobStatus]:
        return await session.client.list(all=all_jobs)

    jobs = sorted(remote(settings, body), key=lambda s: (s.started_at, s.id))
    if as_json:
        echo_json([status_json(s) for s in jobs])
    elif jobs:
        click.echo(list_text(jobs))
    else:
        warn("no jobs" + ("" if all_jobs else " (`worker list --all` shows others' jobs)"))


@click.command()
@JOB_ID
@click.option("--json", "as_json", is_flag=True, help="Print the final status as JSON.")
@click.pass_context
def wait(ctx: click.Context, job_id: str, as_json: bool) -> None:
    """Wait for a job to end; exit with its exit code (128+N when signal N ended it)."""
    job_id = route(ctx, job_id)
    settings = settings_of(ctx)

    async def body(session: Session) -> JobStatus:
        await session.client.status(job_id)  # a fast first answer: not found, no daemon, ...
        return await wait_for_end(session, job_id)

    final = remote(settings, body)
    if as_json:
        echo_json(status_json(final))
    finish(final)


@click.command()
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
    from jobworker.client.cli.stamps import Stamper, parse_since
    from jobworker.outlog import Stream
    from jobworker.outread import Query

    job_id = route(ctx, job_id)
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


@click.command()
@click.argument(
    "job_ids", nargs=-1, required=True, metavar="ID...", shell_complete=complete_job_ids
)
@click.pass_context
def rm(ctx: click.Context, job_ids: tuple[str, ...]) -> None:
    """Remove ended jobs: their records and logs, for good (the owner or an admin may).

    A job that still runs is refused (stop it first); the others are removed. Fleet ids
    (HOST/ID) are removed host by host, in the order their hosts first appear.
    """
    base = ctx.obj
    by_host: dict[str, list[str]] = {}  # in the order given ("": --addr's plain ids)
    for fid in job_ids:
        by_host.setdefault(fid.partition("/")[0] if "/" in fid else "", []).append(fid)
    for fids in by_host.values():
        ctx.obj = base
        ids = [route(ctx, fid) for fid in fids]

        async def body(session: Session, ids: list[str] = ids) -> None:
            for job_id in ids:
                await session.client.remove(job_id)
                click.echo(job_id)

        remote(settings_of(ctx), body)
