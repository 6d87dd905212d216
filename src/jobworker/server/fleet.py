"""A host's membership of a fleet (``workerd --fleet URL``): registration under a lease kept
alive, the host record, and the host's side of the job slots (see :mod:`jobworker.api.fleet`
and docs/fleet.md).

The :class:`Registrar` runs beside the daemon and never gets in its way: when etcd cannot be
reached the jobs go on, RPCs are served, and the registrar keeps trying; once etcd answers again
it registers anew (a new lease, the record, a slot for each running job).
"""

from __future__ import annotations

# isort: off
# Before anything that imports grpc (the etcd client): see jobworker.server.tls13.
from jobworker.server import tls13  # noqa: F401 - imported for that effect

# isort: on
import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import click
from cryptography import x509

from jobworker.api import fleet as layout
from jobworker.api.etcd import EtcdTls, EtcdUnavailable, Store
from jobworker.api.fleet import HostRecord, Slot
from jobworker.errors import InvalidArgument
from jobworker.manager import JobManager
from jobworker.spec import JobState

log = logging.getLogger("jobworker.server.fleet")

PENDING_GRACE = 60.0
"""Seconds a client's pending reservation may wait for its Start before the host reclaims it
(the client's Start timeout is 30 s by default)."""


@dataclass(frozen=True, slots=True)
class FleetConfig:
    endpoints: layout.Endpoints
    name: str
    advertise: str
    labels: dict[str, str] = field(default_factory=dict)
    capacity: int = 0
    """Job slots; 0: one per CPU."""
    ttl: int = layout.DEFAULT_TTL
    etcd_tls: EtcdTls | None = None
    pending_grace: float = PENDING_GRACE


def certificate_names(cert_pem: bytes) -> set[str]:
    """The DNS and IP subject alternative names of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName))
    names |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return names


def check_identity(config: FleetConfig, cert_pem: bytes) -> None:
    """The host's certificate must name it (and its advertised host): clients check the same
    on connect, so a host that would fail there is refused here, at start, with the reason."""
    names = certificate_names(cert_pem)
    host = config.advertise.rpartition(":")[0].strip("[]")
    missing = [n for n in (config.name, host) if n not in names]
    if missing:
        raise InvalidArgument(
            f"--name/--advertise: the server certificate names {sorted(names)}, not "
            f"{' or '.join(missing)}; clients would drop this host (issue one with "
            f"`worker certs host {config.name} --san {host}`)"
        )


def advertise_address(config: FleetConfig, port: int) -> str:
    """``--advertise``'s HOST:PORT, port 0 meaning the port the daemon listens on."""
    host, _, p = config.advertise.rpartition(":")
    return f"{host}:{port if p == '0' else p}"


class Registrar:
    """Keeps this host registered while the daemon runs; :meth:`close` deregisters."""

    def __init__(self, config: FleetConfig, manager: JobManager, port: int) -> None:
        self.config = config
        self.manager = manager
        self.capacity = config.capacity or os.cpu_count() or 1
        self.advertise = advertise_address(config, port)
        self.store = Store(config.endpoints, config.etcd_tls)
        self.lease = 0
        self.registered = asyncio.Event()
        self._closing = asyncio.Event()
        self._published: bytes = b""
        self._used = 0
        self._seen: dict[tuple[str, int], float] = {}
        self._reconciled: tuple[tuple[frozenset[str], int], float] = ((frozenset(), 0), 0.0)
        self._registered_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._clock: Callable[[], float] = time.time

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-registrar")

    async def close(self) -> None:
        """Stop the keepalives and revoke the lease: the host record and its slots go at once."""
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.lease:
            try:
                await self.store.revoke(self.lease)
                log.info("fleet: deregistered %s", self.config.name)
            except EtcdUnavailable as e:
                log.warning("fleet: could not deregister (%s); the lease expires by itself", e)
        await self.store.close()

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    async def _run(self) -> None:
        interval = max(self.config.ttl / 3, 0.5)
        failing = False
        while not self._closing.is_set():
            try:
                if not self.lease:
                    await self._register()
                    failing = False
                await self._pause(interval)
                if self._closing.is_set():
                    return
                if await self.store.keepalive(self.lease) <= 0:
                    log.warning("fleet: lease %x expired; registering again", self.lease)
                    self._lost()
                    continue
                await self._reconcile()
                await self._publish()
            except EtcdUnavailable as e:
                if not failing:
                    log.warning("fleet: %s; jobs go on, retrying every %.1fs", e, interval)
                failing = True
                # A lease we hold may still be alive (a short outage): the next keepalive tells
                # whether to register anew.
                await self._pause(interval)

    def _lost(self) -> None:
        self.lease = 0
        self._published = b""
        self.registered.clear()

    def record(self) -> HostRecord:
        running = sum(1 for s in self.manager.list() if s.state is JobState.RUNNING)
        return HostRecord(
            name=self.config.name,
            advertise=self.advertise,
            labels=self.config.labels,
            capacity=self.capacity,
            running=running,
            used=self._used,
            controllers=tuple(sorted(self.manager.available_controllers)),
            version=version("jobworker"),
            lease=self.lease,
            registered_at=self._registered_at,
        )

    async def _register(self) -> None:
        key = layout.host_key(self.config.name)
        lease = await self.store.grant(self.config.ttl)
        self.lease, self._registered_at = lease, self._clock()
        record = self.record()
        if not await self.store.create(key, record.to_json(), lease):
            await self.store.revoke(lease)
            self.lease = 0
            existing = await self.store.get(key)
            raise EtcdUnavailable(
                f"another live host is registered as {self.config.name!r}"
                + (f" (lease {existing.lease:x})" if existing else "")
                + "; waiting for it to go"
            )
        self._published = record.to_json()
        log.info(
            "fleet: registered %s at %s (capacity %d, lease %x, ttl %ds) with %s",
            self.config.name,
            self.advertise,
            self.capacity,
            lease,
            self.config.ttl,
            self.store.describe(),
        )
        await self._reconcile(fresh=True)
        self.registered.set()

    async def _publish(self) -> None:
        """Rewrite the host record when what it says changed (the running count)."""
        data = self.record().to_json()
        if data != self._published:
            await self.store.put(layout.host_key(self.config.name), data, self.lease)
            self._published = data

    async def _reconcile(self, *, fresh: bool = False) -> None:
        """Make the slots tell the truth: a slot per running job (a job started with --addr, or
        whose client died before handing its slot over, takes a free one after the grace), no
        slot for an ended job, no pending reservation older than the grace. ``fresh``: just
        registered on a new lease, so no slot of ours survived: every running job takes one."""
        now = self._clock()
        grace = self.config.pending_grace
        everything = self.manager.list()
        jobs = {s.id: s for s in everything if s.state is JobState.RUNNING}
        # Read the slots only when the jobs changed (one that started and ended between two
        # ticks changes the count), or a quarter grace has passed (pending reservations to
        # reclaim): a tick of an idle host costs etcd no read.
        signature, last = (frozenset(jobs), len(everything)), self._reconciled
        if not fresh and signature == last[0] and now - last[1] < grace / 4:
            return
        self._reconciled = (signature, now)
        kvs, _ = await self.store.get_prefix(layout.slots_prefix(self.config.name))
        slotted: set[str] = set()
        stale: list[tuple[str, int]] = []
        used: set[int] = set()
        # A pending slot's age is how long this host has seen it unchanged, not the time the
        # client wrote in it (a client could write any).
        seen = {
            (kv.key, kv.mod_revision): self._seen.get((kv.key, kv.mod_revision), now) for kv in kvs
        }
        self._seen = seen
        for kv in kvs:
            index = layout.slot_index(kv.key)
            slot = Slot.from_json(kv.value)
            if index is None or slot is None or index >= self.capacity:
                await self.store.delete(kv.key, kv.mod_revision)
                continue
            used.add(index)
            if slot.state == layout.JOB and slot.job in jobs and slot.job not in slotted:
                slotted.add(slot.job)
                if kv.lease != self.lease:  # handed over on an older lease of ours
                    await self.store.replace(kv.key, kv.mod_revision, kv.value, self.lease)
            elif (
                slot.state == layout.PENDING
                and now - seen.get((kv.key, kv.mod_revision), now) < grace
            ):
                continue
            else:
                stale.append((kv.key, kv.mod_revision))
        orphans = [
            j
            for j in jobs.values()
            if j.id not in slotted and (fresh or now - j.started_at.timestamp() > grace)
        ]
        for job in orphans:
            value = Slot(layout.JOB, job=job.id, at=now).to_json()
            if stale:
                key, rev = stale.pop()
                if await self.store.replace(key, rev, value, self.lease):
                    continue
            free = [i for i in range(self.capacity) if i not in used]
            if not free:
                log.warning("fleet: job %s runs beyond the %d slots", job.id, self.capacity)
                break
            used.add(free[0])
            await self.store.create(layout.slot_key(self.config.name, free[0]), value, self.lease)
        for key, rev in stale:
            index = layout.slot_index(key)
            if await self.store.delete(key, rev) and index is not None:
                used.discard(index)
        self._used = len(used)


def new_token() -> str:
    return uuid.uuid4().hex


def parse_advertise(text: str) -> str:
    port = text.rpartition(":")[2]
    if not layout.ADVERTISE_RE.match(text) or int(port) > 65535:
        raise InvalidArgument(f"--advertise: {text!r} is not HOST:PORT (or [V6]:PORT)")
    return text


F = TypeVar("F", bound=Callable[..., Any])


def fleet_options(f: F) -> F:
    """workerd's --fleet options; the command gets them as keyword arguments named as
    :func:`fleet_config`'s parameters."""
    env = "WORKERD_"
    decorators = [
        click.option(
            "--fleet",
            envvar=env + "FLEET",
            metavar="URL",
            help="Join the fleet whose etcd has these client URLs (as etcd writes them: "
            "http://10.0.0.5:2379,http://10.0.0.6:2379, or https://...).  [default: no fleet]",
        ),
        click.option(
            "--name",
            envvar=env + "NAME",
            help="This host's name in the fleet; its server certificate must name it (SAN).",
        ),
        click.option(
            "--advertise",
            envvar=env + "ADVERTISE",
            metavar="HOST:PORT",
            help="Where clients reach this host (port 0: the port it listens on); HOST must "
            "be on the server certificate too.",
        ),
        click.option(
            "--label",
            "labels",
            multiple=True,
            envvar=env + "LABEL",
            metavar="KEY=VALUE",
            help="A label for placement (--on zone=a,gpu); repeatable, or comma-separated.",
        ),
        click.option(
            "--capacity",
            type=click.IntRange(min=1),
            envvar=env + "CAPACITY",
            help="Job slots fleet placement may fill.  [default: one per CPU]",
        ),
        click.option(
            "--fleet-ttl",
            "ttl",
            type=click.IntRange(min=2, max=3600),
            default=layout.DEFAULT_TTL,
            envvar=env + "FLEET_TTL",
            metavar="SECONDS",
            help="A host that stops renewing its registration leaves the fleet after this.",
        ),
        click.option(
            "--fleet-grace",
            "grace",
            type=click.FloatRange(min=1, max=3600),
            default=PENDING_GRACE,
            envvar=env + "FLEET_GRACE",
            metavar="SECONDS",
            help="How long a client's slot reservation may wait for its Start before this "
            "host takes it back (and a job started here without one gets a slot).",
        ),
        click.option(
            "--etcd-ca",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar=env + "ETCD_CA",
            help="CA of etcd's server certificate (https:// endpoints).  [default: the system's]",
        ),
        click.option(
            "--etcd-cert",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar=env + "ETCD_CERT",
            help="Client certificate for etcd's --client-cert-auth.",
        ),
        click.option(
            "--etcd-key",
            type=click.Path(dir_okay=False, path_type=Path),
            envvar=env + "ETCD_KEY",
            help="Key of --etcd-cert.",
        ),
    ]
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def fleet_config(
    fleet: str | None,
    name: str | None,
    advertise: str | None,
    labels: tuple[str, ...],
    capacity: int | None,
    ttl: int,
    grace: float,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
) -> FleetConfig | None:
    """The ``--fleet`` options as a :class:`FleetConfig` (``None`` without ``--fleet``)."""
    if fleet is None:
        if name or advertise or labels or capacity:
            raise InvalidArgument("--name, --advertise, --label and --capacity need --fleet URL")
        return None
    if not name or not advertise:
        raise InvalidArgument(
            "--fleet needs --name NAME (on the server certificate) and --advertise HOST:PORT"
        )
    tls = EtcdTls(etcd_ca, etcd_cert, etcd_key) if etcd_ca or etcd_cert or etcd_key else None
    return FleetConfig(
        endpoints=layout.Endpoints.parse(fleet),
        name=layout.check_name(name),
        advertise=parse_advertise(advertise),
        labels=layout.parse_labels(labels),
        capacity=capacity or 0,
        ttl=ttl,
        etcd_tls=tls,
        pending_grace=grace,
    )
