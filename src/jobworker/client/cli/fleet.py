"""The fleet (docs/fleet.md): the ``hosts`` command, the merged ``list --fleet``
(:func:`fleet_list`), and how the other fleet code reaches etcd (:func:`fleet_remote`).

The job commands themselves live in :mod:`.control` and :mod:`.jobs`: ``HOST/ID`` job ids are
routed by :func:`.control.route`, ``--on`` is added to ``start`` and ``run`` by
:mod:`.fleet_run`, ``certs host`` is in :mod:`.certs`. Each imports this module only when the
fleet is used.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from jobworker import tls
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


@click.command()
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


# -- list --fleet ----------------------------------------------------------------------------


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


__all__ = ["fleet_list", "fleet_remote", "need_fleet", "open_fleet", "table"]
