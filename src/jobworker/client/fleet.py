"""The client's side of a fleet: discovery of the registered hosts (each one checked to hold a
certificate naming it), placement on the least-loaded matching host with a slot reserved in
etcd first, and a :class:`~jobworker.client.Client` per host.

::

    async with Fleet(Endpoints.parse("http://10.0.0.5:2379"), tls.Paths(...)) as fleet:
        placed = await fleet.start(Selector.parse("zone=a"), ["make", "-j4"])
        print(placed.fleet_id)               # "host-a/4f0c..."

A reservation is a slot key created by a transaction that fails when the key exists, on the
host's lease, marked ``pending`` with a token of this client. After the Start the client
rewrites it (if it still holds its token) to name the job; if the Start fails it deletes it; if
the client dies in between, the host reclaims it after its grace (see docs/fleet.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jobworker import tls
from jobworker.api import fleet as layout
from jobworker.api.etcd import EtcdTls, Store
from jobworker.api.fleet import Endpoints, HostRecord, Selector, Slot
from jobworker.client.client import Client
from jobworker.errors import JobworkerError, ResourceExhausted
from jobworker.spec import JobStatus

log = logging.getLogger("jobworker.client.fleet")

PLACEMENT_ATTEMPTS = 200
"""Transactions one placement may lose to other clients before it gives up."""
VERIFY_TIMEOUT = 3.0


@dataclass(frozen=True, slots=True)
class Host:
    record: HostRecord
    slots_used: int = 0
    heartbeat_age: float | None = None
    """Seconds since the host's last keepalive (from its lease), when asked for."""
    problem: str = ""
    """Why the host could not be checked (it did not answer); "" when it did."""

    @property
    def name(self) -> str:
        return self.record.name


@dataclass(frozen=True, slots=True)
class Placed:
    host: Host
    status: JobStatus

    @property
    def fleet_id(self) -> str:
        return f"{self.host.name}/{self.status.id}"


class NameMismatch(JobworkerError):
    """A host's certificate does not name it."""


async def verify_host(record: HostRecord, paths: tls.Paths, timeout: float = VERIFY_TIMEOUT) -> str:
    """Connect to the host's advertised address and check, in the TLS handshake, that its
    certificate chains to our CA and names ``record.name``. Returns "" when it does, the reason
    when it did not answer; raises :class:`NameMismatch` when it answered with a certificate for
    another name (or from another CA)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    try:
        context.load_verify_locations(cafile=str(paths.ca))
        context.load_cert_chain(str(paths.cert), str(paths.key))
    except (OSError, ssl.SSLError) as e:
        return f"cannot load our certificates: {e}"
    host, _, port = record.advertise.rpartition(":")
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                host.strip("[]"), int(port), ssl=context, server_hostname=record.name
            )
    except ssl.SSLCertVerificationError as e:
        raise NameMismatch(
            f"host {record.name!r} at {record.advertise} has a certificate that does not "
            f"prove that name ({e.verify_message}); dropped"
        ) from None
    except (OSError, TimeoutError, ValueError) as e:
        return f"{record.advertise}: {e or type(e).__name__}"
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return ""


class Fleet:
    """The fleet as one client sees it: etcd for where, each host for the jobs."""

    def __init__(
        self,
        endpoints: Endpoints,
        paths: tls.Paths,
        *,
        etcd_tls: EtcdTls | None = None,
        timeout: float | None = None,
        warn: Callable[[str], None] = log.warning,
    ) -> None:
        self.store = Store(endpoints, etcd_tls)
        self.paths = paths
        self.material = tls.load_client(paths)
        self.timeout = timeout
        self.warn = warn
        self._verified: dict[tuple[str, str], str] = {}

    async def close(self) -> None:
        await self.store.close()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def client(self, host: Host | HostRecord) -> Client:
        record = host.record if isinstance(host, Host) else host
        return Client(
            record.advertise, self.material, server_name=record.name, timeout=self.timeout
        )

    async def records(self) -> list[HostRecord]:
        kvs, _ = await self.store.get_prefix(layout.HOSTS)
        records = []
        for kv in kvs:
            try:
                record = layout.HostRecord.from_json(kv.value)
            except JobworkerError as e:
                self.warn(f"ignoring {kv.key!r}: {e}")
                continue
            if kv.key != layout.host_key(record.name):
                self.warn(f"ignoring {kv.key!r}: it is the record of {record.name!r}")
                continue
            records.append(record)
        return records

    async def _verify(self, record: HostRecord) -> str | None:
        """ "" (checked), a reason (no answer), or ``None`` (a name mismatch: warned, dropped)."""
        key = (record.name, record.advertise)
        if key not in self._verified:
            try:
                self._verified[key] = await verify_host(record, self.paths)
            except NameMismatch as e:
                self.warn(str(e))
                return None
        return self._verified[key]

    async def hosts(
        self, selector: Selector | None = None, *, heartbeats: bool = False, verify: bool = True
    ) -> list[Host]:
        """The registered hosts (matching ``selector``), each checked to hold a certificate
        naming it (a host that fails is dropped with a warning), sorted by name. Without
        ``verify``, unchecked (placement checks only the host it chose)."""
        records = [
            r for r in await self.records() if selector is None or selector.matches(r.labels)
        ]

        async def unchecked(_: HostRecord) -> str | None:
            return ""

        check = self._verify if verify else unchecked
        checks = await asyncio.gather(*(check(r) for r in records))
        ages: list[float | None] = [None] * len(records)
        if heartbeats:
            ages = list(await asyncio.gather(*(self._age(r) for r in records)))
        return sorted(
            (
                Host(r, r.used, age, problem)
                for r, problem, age in zip(records, checks, ages, strict=True)
                if problem is not None
            ),
            key=lambda h: h.name,
        )

    async def _age(self, record: HostRecord) -> float | None:
        granted, remaining = await self.store.lease_ttl(record.lease)
        return None if remaining < 0 else float(max(granted - remaining, 0))

    async def host(self, name: str) -> Host:
        """The registered host ``name``, checked; :class:`LookupError` when it is not there."""
        kv = await self.store.get(layout.host_key(name))
        if kv is None:
            raise LookupError(name)
        record = HostRecord.from_json(kv.value)
        problem = await self._verify(record)
        if problem is None:
            raise LookupError(name)
        return Host(record, problem=problem)

    # -- placement -------------------------------------------------------------------------

    async def _free(self, host: Host) -> list[int]:
        """The host's free slot indexes, read now (keys only: one small range read)."""
        kvs, _ = await self.store.get_prefix(layout.slots_prefix(host.name), keys_only=True)
        taken = {layout.slot_index(kv.key) for kv in kvs}
        return [i for i in range(host.record.capacity) if i not in taken]

    async def reserve(self, selector: Selector) -> tuple[Host, str, bytes]:
        """A slot on the least-loaded matching host: ``(host, slot key, our pending value)``.
        Raises :class:`ResourceExhausted` when every matching host is full.

        Hosts are ranked by the load their records state (as of their last reconcile); the
        live slots of the best are read, and of the next ones while their stated load is
        below the best live load found, so a stale record costs a read, not a wrong choice."""
        token = uuid.uuid4().hex
        hosts = await self.hosts(selector, verify=False)
        if not hosts:
            raise ResourceExhausted(
                f"no registered host answers and matches {selector_text(selector)}"
            )
        full: set[str] = set()
        for _ in range(PLACEMENT_ATTEMPTS):
            ranked = sorted(
                (h for h in hosts if h.name not in full),
                key=lambda h: (h.record.used / h.record.capacity, h.record.running, h.name),
            )
            best: tuple[float, str, Host, list[int]] | None = None
            for h in ranked:
                if best is not None and h.record.used / h.record.capacity >= best[0]:
                    break
                free = await self._free(h)
                if not free:
                    full.add(h.name)
                    continue
                load = 1 - len(free) / h.record.capacity
                if best is None or (load, h.name) < best[:2]:
                    best = (load, h.name, h, free)
            if best is None:
                raise ResourceExhausted(
                    f"every host matching {selector_text(selector)} is full or does not answer "
                    f"({', '.join(f'{h.name} {h.record.capacity}' for h in hosts)} slots)"
                )
            host, index = best[2], random.choice(best[3])
            if await self._verify(host.record) != "":  # a mismatch (warned) or no answer
                full.add(host.name)
                continue
            value = Slot(layout.PENDING, token=token).to_json()
            key = layout.slot_key(host.name, index)
            if await self.store.create(
                key, value, host.record.lease, while_exists=layout.host_key(host.name)
            ):
                return host, key, value
        raise ResourceExhausted(f"placement lost {PLACEMENT_ATTEMPTS} races for a slot; try again")

    async def start(self, selector: Selector, argv: Sequence[str], **options: Any) -> Placed:
        """Reserve a slot, start the job there, hand the slot to the job (or release it when
        the Start fails)."""
        host, key, pending = await self.reserve(selector)
        try:
            async with self.client(host) as client:
                status = await client.start(argv, **options)
        except BaseException:
            with contextlib.suppress(JobworkerError):
                await self.store.swap(key, pending, None)
            raise
        held = Slot(layout.JOB, job=status.id, at=time.time()).to_json()
        try:
            handed = await self.store.swap(key, pending, held, host.record.lease)
        except JobworkerError as e:  # the job runs; the host gives it a slot (its reconcile)
            handed, why = False, str(e)
        else:
            why = "it was reclaimed first"
        if not handed:
            self.warn(f"job {status.id} started, but its slot {key} was not handed over ({why})")
        return Placed(host, status)


def selector_text(selector: Selector) -> str:
    parts = [f"{k}={v}" for k, v in sorted(selector.equal.items())]
    parts += sorted(selector.present) + [f"!{k}" for k in sorted(selector.absent)]
    return ",".join(parts) or "any"
