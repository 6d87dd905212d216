"""The fleet commands (docs/fleet.md): ``hosts``, ``--on`` for ``start`` and ``run``, the merged
``list``, ``HOST/ID`` job ids for ``status``, ``logs``, ``wait``, ``stop`` and ``rm``, and
``certs host``.

The job commands themselves live in :mod:`.jobs`; this module adds the fleet to them from the
outside (an option, and a callback that routes or fans out before calling the original), so
without ``--fleet`` and fleet ids they behave exactly as before.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shlex
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from jobworker import tls
from jobworker.client.cli import jobs as _jobs  # noqa: F401 - registers what is wrapped here
from jobworker.client.cli.app import cli
from jobworker.client.cli.certs import certs
from jobworker.client.cli.exits import CommandExit, Exit, error_exit, warn
from jobworker.client.cli.render import _safe, _short_exit, _time, echo_json, status_json
from jobworker.client.cli.session import run_sync
from jobworker.client.cli.settings import Settings, settings_of
from jobworker.errors import InvalidArgument, JobworkerError
from jobworker.spec import JobStatus

if TYPE_CHECKING:
    # The fleet's client (and with it aetcd) is imported only by a command that uses the fleet.
    from jobworker.client.fleet import Fleet, Host

T = TypeVar("T")


def need_fleet(settings: Settings, what: str) -> str:
    if not settings.fleet:
        raise click.UsageError(f"{what} needs --fleet URL (or WORKER_FLEET): etcd's client URLs")
    return settings.fleet


def open_fleet(settings: Settings) -> Fleet:
    from jobworker.api.etcd import EtcdTls
    from jobworker.api.fleet import Endpoints
    from jobworker.client.fleet import Fleet

    url = need_fleet(settings, "a fleet command")
    try:
        endpoints = Endpoints.parse(url)
    except InvalidArgument as e:
        raise click.UsageError(str(e)) from e
    etcd_tls = None
    if settings.etcd_ca or settings.etcd_cert or settings.etcd_key:
        etcd_tls = EtcdTls(settings.etcd_ca, settings.etcd_cert, settings.etcd_key)
    try:
        return Fleet(
            endpoints,
            tls.Paths(*settings.tls_paths()),
            etcd_tls=etcd_tls,
            timeout=settings.timeout,
            warn=warn,
        )
    except InvalidArgument as e:
        raise CommandExit(Exit.CONFIG, str(e)) from e


def fleet_remote(settings: Settings, body: Callable[[Fleet], Coroutine[Any, Any, T]]) -> T:
    """Run ``body`` with a :class:`Fleet`; etcd down is "unavailable", with etcd's address."""
    from jobworker.api.etcd import EtcdUnavailable

    async def go() -> T:
        async with open_fleet(settings) as fleet:
            return await body(fleet)

    try:
        return run_sync(go())
    except EtcdUnavailable as e:
        raise CommandExit(
            Exit.UNAVAILABLE,
            f"fleet: {e} (jobs on the hosts go on; reach a host with --addr HOST:PORT)",
        ) from e
    except JobworkerError as e:
        raise error_exit(e, settings.addr) from e


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        (
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        ).rstrip()
        for r in [header, *rows]
    )


def labels_text(labels: dict[str, str] | Any) -> str:
    return ",".join(f"{k}={v}" if v else k for k, v in sorted(labels.items())) or "-"


# -- hosts -------------------------------------------------------------------------------------


def host_json(h: Host) -> dict[str, Any]:
    r = h.record
    return {
        "name": r.name,
        "address": r.advertise,
        "labels": dict(r.labels),
        "capacity": r.capacity,
        "slots_used": h.slots_used,
        "running": r.running,
        "controllers": list(r.controllers),
        "version": r.version,
        "heartbeat_age_seconds": h.heartbeat_age,
        "registered_at": r.registered_at,
        "problem": h.problem or None,
    }


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array.")
@click.pass_context
def hosts(ctx: click.Context, as_json: bool) -> None:
    """Show the fleet's hosts: name, address, labels, slots, running jobs, last heartbeat.

    A host whose certificate does not carry its registered name is left out, with a warning.
    """
    found = fleet_remote(settings_of(ctx), lambda f: f.hosts(heartbeats=True))
    if as_json:
        echo_json([host_json(h) for h in found])
        return
    if not found:
        warn("no hosts registered")
        return
    now = time.time()
    rows = [
        (
            h.name,
            h.record.advertise,
            _safe(labels_text(h.record.labels)),
            f"{h.slots_used}/{h.record.capacity}",
            str(h.record.running),
            "-" if h.heartbeat_age is None else f"{h.heartbeat_age:.0f}s ago",
            f"{max(now - h.record.registered_at, 0):.0f}s",
            h.record.version,
            f"not answering: {h.problem}" if h.problem else "",
        )
        for h in found
    ]
    header = ("HOST", "ADDRESS", "LABELS", "SLOTS", "RUNNING", "HEARTBEAT", "UP", "VERSION", "")
    click.echo(table(header, rows))


# -- routing: HOST/ID ------------------------------------------------------------------------


def route(ctx: click.Context, fleet_id: str) -> str:
    """For a fleet id, point the command's settings at its host and return the job's own id;
    a plain id is returned as it is (the command goes to --addr)."""
    if "/" not in fleet_id:  # a plain id (the fleet's module is not needed to tell)
        return fleet_id
    from jobworker.api.fleet import split_fleet_id

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


def _wrap(name: str, param: str) -> None:
    command = cli.commands[name]
    original = command.callback
    assert original is not None

    def callback(**kwargs: Any) -> Any:
        ctx = click.get_current_context()
        value = kwargs[param]
        if isinstance(value, str):
            return original(**{**kwargs, param: route(ctx, value)})
        # several ids (rm): one call per host, in the order given
        base = ctx.obj
        groups: dict[str, list[str]] = {}
        order: list[str] = []
        for fid in value:
            host = fid.partition("/")[0] if "/" in fid else ""
            if host not in groups:
                order.append(host)
            groups.setdefault(host, []).append(fid)
        for host in order:
            ctx.obj = base
            ids = tuple(route(ctx, fid) for fid in groups[host])
            original(**{**kwargs, param: ids})
        return None

    command.callback = callback


for _name in ("status", "logs", "wait", "stop"):
    _wrap(_name, "job_id")
_wrap("rm", "job_ids")


# -- list ----------------------------------------------------------------------------------


def _list_wrapper() -> None:
    command = cli.commands["list"]
    original = command.callback
    assert original is not None

    def callback(all_jobs: bool, as_json: bool) -> Any:
        settings = settings_of(click.get_current_context())
        if not settings.fleet:
            return original(all_jobs=all_jobs, as_json=as_json)
        return fleet_list(settings, all_jobs, as_json)

    command.callback = callback
    command.help = (command.help or "") + (
        "\n\nWith --fleet: every host's jobs, with a HOST column; hosts that do not answer are "
        "named on stderr."
    )


async def gather_lists(
    fleet: Fleet, all_jobs: bool
) -> tuple[list[tuple[str, JobStatus]], dict[str, str]]:
    found = await fleet.hosts()
    failed = {h.name: h.problem for h in found if h.problem}

    async def one(h: Host) -> list[tuple[str, JobStatus]]:
        try:
            async with fleet.client(h) as client:
                return [(h.name, s) for s in await client.list(all=all_jobs)]
        except JobworkerError as e:
            failed[h.name] = str(e)
            return []

    lists = await asyncio.gather(*(one(h) for h in found if not h.problem))
    return [row for rows in lists for row in rows], failed


def fleet_list(settings: Settings, all_jobs: bool, as_json: bool) -> None:
    rows, failed = fleet_remote(settings, lambda f: gather_lists(f, all_jobs))
    rows.sort(key=lambda r: (r[1].started_at, r[0], r[1].id))
    if as_json:
        echo_json([{"host": h, "fleet_id": f"{h}/{s.id}", **status_json(s)} for h, s in rows])
    elif rows:
        header = ("HOST", "ID", "STATE", "EXIT", "OWNER", "STARTED", "COMMAND")
        click.echo(
            table(
                header,
                [
                    (
                        h,
                        s.id,
                        s.state.value,
                        _short_exit(s),
                        _safe(s.owner),
                        _time(s.started_at),
                        _safe(shlex.join(s.argv)),
                    )
                    for h, s in rows
                ],
            )
        )
    else:
        warn("no jobs on any host that answered")
    for name, why in sorted(failed.items()):
        warn(f"host {name} did not answer: {why}")


_list_wrapper()


# -- certs host ----------------------------------------------------------------------------


@certs.command(name="host")
@click.argument("name")
@click.option(
    "--san",
    multiple=True,
    metavar="NAME",
    help="Another DNS name or IP the certificate names (the address in --advertise); repeatable.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The PKI (from `worker certs init`) whose CA signs it.",
)
def certs_host(name: str, san: tuple[str, ...], directory: Path) -> None:
    """A server certificate for fleet host NAME, in DIR/hosts/NAME/ (ca.pem, server.pem,
    server-key.pem): `workerd --pki DIR/hosts/NAME --fleet URL --name NAME ...`.

    NAME is always among its names (clients check it); localhost, 127.0.0.1 and ::1 too.
    """
    from jobworker.api.fleet import check_name
    from jobworker.client.pki import PkiError, issue_server, load_ca, write_pair

    try:
        check_name(name)
        ca_cert, ca_key = load_ca(directory)
        out = directory / "hosts" / name
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key = issue_server(ca_cert, ca_key, (name, *san))
        write_pair(out, "server", cert, key)
        (out / "ca.pem").write_bytes((directory / "ca.pem").read_bytes())
    except (PkiError, InvalidArgument) as e:
        raise CommandExit(Exit.CONFIG, str(e)) from e
    except OSError as e:
        raise CommandExit(Exit.CONFIG, f"cannot write the certificate of {name}: {e}") from e
    click.echo(str(out))


__all__ = ["fleet_remote", "open_fleet", "route"]
