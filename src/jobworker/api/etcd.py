"""A typed face on etcd for the fleet: the few key-value, transaction and lease calls the hosts
and the clients make, over :mod:`aetcd` (an asyncio etcd v3 client on grpc.aio; see
docs/fleet.md for why that one).

aetcd connects to one ``host:port`` over plain gRPC; :class:`Store` adds etcd's TLS (a CA, and
a client certificate when etcd asks for one) and several endpoints: it connects to the first
that answers, and to the next one after a failure. Every failure to reach etcd is
:class:`EtcdUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import grpc
from grpc import aio

from jobworker.api.fleet import Endpoints
from jobworker.errors import ConfigError, ShuttingDown

DEFAULT_ETCD_TIMEOUT = 5.0


class EtcdUnavailable(ShuttingDown):
    """etcd cannot be reached, or did not answer in time (a :class:`ShuttingDown`, so the CLI
    maps it to "unavailable")."""


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """Files for etcd's own TLS: the CA that etcd's certificate chains to, and, when etcd
    checks clients (``--client-cert-auth``), a client certificate and key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(p: Path | None) -> bytes | None:
            if p is None:
                return None
            try:
                return p.read_bytes()
            except OSError as e:
                raise ConfigError(f"cannot read {p} (etcd TLS): {e.strerror}") from e

        if (self.cert is None) != (self.key is None):
            raise ConfigError("--etcd-cert and --etcd-key go together")
        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int


class _Client(aetcd.Client):  # type: ignore[misc]
    """aetcd's client over a channel made here (TLS or not)."""

    def __init__(self, target: str, creds: grpc.ChannelCredentials | None, timeout: float):
        host, _, port = target.rpartition(":")
        super().__init__(host=host, port=int(port), timeout=timeout)
        self._target = target
        self._creds = creds

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options = [("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 3000)]
        if self._creds is None:
            self.channel = aio.insecure_channel(self._target, options=options)
        else:
            self.channel = aio.secure_channel(self._target, self._creds, options=options)
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.Watcher(aetcd.rpc.WatchStub(self.channel), timeout=self._timeout)
        self._connected.set()


def _kv(kv: Any) -> KV:
    return KV(
        kv.key.decode(), bytes(kv.value), int(kv.create_revision), int(kv.mod_revision), kv.lease
    )


_ERRORS = (aetcd.ClientError, grpc.RpcError, OSError, asyncio.TimeoutError)


class Store:
    """One connection to etcd (see the module docstring). Use as an async context manager."""

    def __init__(
        self,
        endpoints: Endpoints,
        tls: EtcdTls | None = None,
        timeout: float = DEFAULT_ETCD_TIMEOUT,
    ) -> None:
        if endpoints.tls and tls is None:
            tls = EtcdTls()
        self._endpoints = endpoints
        self._creds = tls.credentials() if endpoints.tls and tls is not None else None
        self._timeout = timeout
        self._next = 0
        self._client: _Client | None = None

    def describe(self) -> str:
        scheme = "https" if self._endpoints.tls else "http"
        return ",".join(f"{scheme}://{h}:{p}" for h, p in self._endpoints.hosts)

    async def _call(self, what: str, op: Any) -> Any:
        """``op(client)``, on the current endpoint, then once on each other one."""
        errors: list[str] = []
        for _ in range(len(self._endpoints.hosts)):
            if self._client is None:
                host, port = self._endpoints.hosts[self._next % len(self._endpoints.hosts)]
                self._client = _Client(f"{host}:{port}", self._creds, self._timeout)
            try:
                async with asyncio.timeout(self._timeout):
                    return await op(self._client)
            except _ERRORS as e:
                errors.append(f"{self._client._target}: {e or type(e).__name__}")
                await self._drop()
                self._next += 1
        raise EtcdUnavailable(f"etcd ({self.describe()}) did not answer {what}: {errors[-1]}")

    async def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*_ERRORS):
                await client.close()

    async def close(self) -> None:
        await self._drop()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- keys ------------------------------------------------------------------------------

    async def get_prefix(self, prefix: str, *, keys_only: bool = False) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (without values, with ``keys_only``) and the store's
        revision they were read at."""

        async def op(c: _Client) -> tuple[list[KV], int]:
            r = await c.get_prefix(prefix.encode(), keys_only=keys_only)
            return [_kv(kv) for kv in r.kvs], int(r.header.revision)

        result: tuple[list[KV], int] = await self._call(f"a read of {prefix}", op)
        return result

    async def get(self, key: str) -> KV | None:
        async def op(c: _Client) -> KV | None:
            r = await c.get(key.encode())
            return None if r is None else _kv(r)

        result: KV | None = await self._call(f"a read of {key}", op)
        return result

    async def put(self, key: str, value: bytes, lease: int = 0) -> None:
        await self._call(f"a write of {key}", lambda c: c.put(key.encode(), value, lease=lease))

    async def create(
        self, key: str, value: bytes, lease: int = 0, *, while_exists: str | None = None
    ) -> bool:
        """Write ``key`` only if it does not exist (and ``while_exists`` does): one transaction."""

        async def op(c: _Client) -> bool:
            t = c.transactions
            compare = [t.create(key.encode()) == 0]
            if while_exists is not None:
                compare.append(t.create(while_exists.encode()) > 0)
            ok, _ = await c.transaction(compare, [t.put(key.encode(), value, lease=lease)], [])
            return bool(ok)

        result: bool = await self._call(f"a transaction on {key}", op)
        return result

    async def replace(self, key: str, mod_revision: int, value: bytes, lease: int = 0) -> bool:
        """Rewrite ``key`` only if nobody changed it since ``mod_revision``."""

        async def op(c: _Client) -> bool:
            t = c.transactions
            ok, _ = await c.transaction(
                [t.mod(key.encode()) == mod_revision], [t.put(key.encode(), value, lease=lease)], []
            )
            return bool(ok)

        result: bool = await self._call(f"a transaction on {key}", op)
        return result

    async def swap(self, key: str, expected: bytes, value: bytes | None, lease: int = 0) -> bool:
        """Rewrite ``key`` (delete it, for ``None``) only if it still holds ``expected``."""

        async def op(c: _Client) -> bool:
            t = c.transactions
            change = (
                t.delete(key.encode()) if value is None else t.put(key.encode(), value, lease=lease)
            )
            ok, _ = await c.transaction([t.value(key.encode()) == expected], [change], [])
            return bool(ok)

        result: bool = await self._call(f"a transaction on {key}", op)
        return result

    async def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete ``key`` (only if unchanged since ``mod_revision``, when given)."""

        async def op(c: _Client) -> bool:
            t = c.transactions
            compare = [t.mod(key.encode()) == mod_revision] if mod_revision is not None else []
            ok, _ = await c.transaction(compare, [t.delete(key.encode())], [])
            return bool(ok)

        result: bool = await self._call(f"a delete of {key}", op)
        return result

    # -- leases ----------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        async def op(c: _Client) -> int:
            return int((await c.lease(ttl)).id)

        result: int = await self._call("a lease grant", op)
        return result

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease``; its TTL now, 0 or less when it no longer exists."""

        async def op(c: _Client) -> int:
            reply = await c.refresh_lease(lease)
            return int(reply.TTL) if reply is not None else 0

        result: int = await self._call("a lease keepalive", op)
        return result

    async def revoke(self, lease: int) -> None:
        async def op(c: _Client) -> None:
            try:
                await c.revoke_lease(lease)
            except aetcd.ClientError as e:
                if "not found" not in str(e):
                    raise

        await self._call("a lease revoke", op)

    async def lease_ttl(self, lease: int) -> tuple[int, int]:
        """``(granted, remaining)`` seconds of ``lease``; remaining is -1 once it expired."""

        async def op(c: _Client) -> tuple[int, int]:
            r = await c.get_lease_info(lease, keys=False)
            return int(r.grantedTTL), int(r.TTL)

        result: tuple[int, int] = await self._call("a lease lookup", op)
        return result
