"""The gRPC service: jobworker.v1.JobWorker over a :class:`~jobworker.manager.JobManager`.

The daemon's only module that imports grpc. Every RPC goes the same way through
:meth:`JobWorkerService._rpc`: the caller's identity from its verified certificate, the
permission check (:mod:`jobworker.server.authz`), the call, and on a :mod:`jobworker.errors`
error the status code from the one table in :mod:`jobworker.api.errors`.
"""

from __future__ import annotations

# isort: off
# jobworker.tls must come first: it sets GRPC_SSL_CIPHER_SUITES, which grpc reads on import.
from jobworker.server import tls13
import grpc
from grpc import aio
from grpc._cython import cygrpc  # type: ignore[attr-defined]

# isort: on
import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobworker.api import convert
from jobworker.api.errors import ERROR_TRAILER, code_for, name_for
from jobworker.api.proto import pb, pb_grpc
from jobworker.cgroup.devices import resolve_limits
from jobworker.errors import HostError, InvalidArgument, JobworkerError, PermissionDenied
from jobworker.identity import Role
from jobworker.limits import Limits
from jobworker.manager import JobManager, PageKey
from jobworker.server import logs
from jobworker.server.accounts import Accounts, printable
from jobworker.server.authz import (
    Action,
    Identity,
    Policy,
    RevocationKey,
    Revocations,
    authorize,
    identity_from_auth_context,
    revocation_key,
    visible,
)
from jobworker.server.debug import Metrics
from jobworker.server.policy import effective_limits, effective_timeout
from jobworker.server.quotas import Quotas
from jobworker.spec import Credentials, JobSpec, JobState, JobStatus, Network, Sandbox
from jobworker.tls import Material

log = logging.getLogger(__name__)

_ExecuteBatchError: type[Exception] = cygrpc.ExecuteBatchError
"""What a write to a call raises once the call is over (the client cancelled or left). Not in
grpc's public API; the aio server itself tolerates it only once it has seen the cancellation."""

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Largest request accepted: argv + env are capped at 1 MiB (:data:`jobworker.spec.
MAX_ARGV_ENV_BYTES`), so anything bigger is refused by grpc before it is even parsed."""
MAX_JOB_ID_BYTES = 128
IDENTITY_CACHE_SIZE = 4096
MAX_STOP_GRACE = 3600.0
DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
"""List: jobs per page when the request says 0, and the most it gets whatever it says."""
MAX_DETAILS_BYTES = 1024
"""Longest error message sent back. grpc carries it in a header, percent-encoded, and a client
refuses headers over 16 KiB (RESOURCE_EXHAUSTED instead of the real code): an error that quotes
a 128 KiB argument must be cut."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Notice clients that vanished without closing (long Logs/Wait calls).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Let clients ping us as often as every 10 s (the default allows one per 5 min).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


LISTED_CACHE = 4096
"""How many List conversions the service keeps: a few pages' worth (a page is at most 1000)."""


@dataclass(frozen=True, slots=True)
class Settings:
    """What the service adds to the library: roles and limit policy."""

    policy: Policy | None = None
    default_limits: Limits = field(default_factory=Limits)
    """Applied to every field a Start request leaves unset."""
    max_limits: Limits = field(default_factory=Limits)
    """Caps: a request above one is refused; an unset field gets the cap."""
    job_account: str | None = None
    """Unix account (``user[:group]``) for every identity the policy does not map; ``None``:
    each identity's own uid from ``accounts.uids``."""
    accounts: Accounts = field(default_factory=Accounts)
    default_network: Network = Network.HOST
    """The network of a sandboxed job that does not say."""
    host_network_roles: frozenset[Role] = frozenset(Role)
    """Roles whose jobs may use the host's network; the others must ask for ``none``."""
    max_runtime: float | None = None
    """Seconds a job may run at most (``--max-runtime``); a job asking for none gets it. The
    policy's ``[runtime]`` entry for a role replaces it for that role."""

    def timeout_for(self, identity: Identity, requested: float | None) -> float | None:
        """The deadline of a job ``identity`` asks to run ``requested`` seconds: capped by its
        role's ``[runtime]`` entry, else by :attr:`max_runtime`."""
        role_cap = self.policy.runtime_roles.get(identity.role) if self.policy else None
        if role_cap is not None:
            return effective_timeout(requested, role_cap, f"the policy's [runtime] {identity.role}")
        return effective_timeout(requested, self.max_runtime, "workerd --max-runtime")

    def sandbox_for(
        self, identity: Identity, network: Network | None, no_sandbox: bool
    ) -> Sandbox | None:
        """The sandbox of a job ``identity`` asks for; raises :class:`PermissionDenied` or
        :class:`InvalidArgument` for what it may not have."""
        if no_sandbox:
            if identity.role is not Role.ADMIN:
                raise PermissionDenied(
                    f"{identity.name} (role {identity.role}) may not start a job without the "
                    "sandbox; only admins may"
                )
            if network is not None:
                raise InvalidArgument("network applies to the sandbox: drop it, or no_sandbox")
            return None
        network = self.default_network if network is None else network
        if network is Network.HOST and identity.role not in self.host_network_roles:
            raise PermissionDenied(
                f"{identity.name} (role {identity.role}) may not use the host's network; "
                "ask for network none"
            )
        return Sandbox(network)

    def credentials_for(self, identity: Identity) -> Credentials | None:
        """Who ``identity``'s jobs run as: the policy's ``[run_as.identities]`` entry, else its
        ``[run_as.roles]`` entry, else ``job_account``, else the identity's own uid."""
        named = self.policy.account_for(identity) if self.policy else None
        return self.accounts.for_identity(
            identity.name, named if named is not None else self.job_account
        )


def _check_id(job_id: str) -> str:
    if not job_id:
        raise InvalidArgument("a job id is required")
    if len(job_id.encode()) > MAX_JOB_ID_BYTES:
        raise InvalidArgument(f"a job id is at most {MAX_JOB_ID_BYTES} bytes")
    return job_id


MAX_LOGGED_ARGV = 512
"""Characters of a job's argv in the daemon's log line for its start (argv may be 1 MiB)."""


def _argv(spec: JobSpec) -> str:
    """The argv for a log line: each argument escaped (``repr``), cut at :data:`MAX_LOGGED_ARGV`
    characters. The environment is never logged: its values are the place for secrets."""
    text = repr(list(spec.argv))
    if len(text) <= MAX_LOGGED_ARGV:
        return text
    return f"{text[:MAX_LOGGED_ARGV]}... ({len(spec.argv)} arguments, cut)"


@dataclass(slots=True)
class _Call:
    """What the audit line of the RPC under way needs to learn from its handler."""

    job: str = "-"


_CALL: ContextVar[_Call | None] = ContextVar("jobworker_rpc_call", default=None)
"""The record of the RPC the current task serves (grpc runs each call in a task of its own)."""


def _note_job(job_id: str) -> None:
    """Name the job of the RPC under way in its audit line."""
    call = _CALL.get()
    if call is not None:
        call.job = printable(job_id) if job_id else "-"


def _details(message: str) -> str:
    raw = message.encode(errors="backslashreplace")
    if len(raw) <= MAX_DETAILS_BYTES:
        return message
    return raw[:MAX_DETAILS_BYTES].decode(errors="ignore") + f"... ({len(raw)} bytes, cut)"


class JobWorkerService(pb_grpc.JobWorkerServicer):
    """One handler per RPC; see the proto for what each does."""

    def __init__(
        self,
        manager: JobManager,
        settings: Settings | None = None,
        metrics: Metrics | None = None,
        revocations: Revocations | None = None,
        quotas: Quotas | None = None,
    ) -> None:
        self._mgr = manager
        self._quotas = quotas or Quotas()
        self._ending: set[asyncio.Future[JobStatus]] = set()
        """Per job under --max-running-per-user: waits for its end to give its slot back."""
        self._settings = settings or Settings()
        self._metrics = metrics or Metrics()
        self._revocations = revocations or Revocations()
        self._identities: dict[bytes, tuple[Identity, RevocationKey]] = {}
        """Verified certificate -> identity and serial: parsing it is a measurable part of a
        short RPC. The serial is checked against the current CRL on every call, hit or miss;
        :meth:`reconfigure` empties the cache (the policy may change roles)."""
        self._listed: collections.OrderedDict[str, tuple[JobStatus, pb.JobStatus]] = (
            collections.OrderedDict()
        )
        """Last List conversion per job, least recently listed first: an ended job's status
        never changes again, and a running one's only in the fields List refreshes. At most
        :data:`LISTED_CACHE` entries, so jobs removed since (retention, rm) do not stay."""

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def revocations(self) -> Revocations:
        return self._revocations

    def reconfigure(self, settings: Settings, revocations: Revocations) -> None:
        """Apply a reloaded policy and CRL from the next call on (running calls keep the
        identity they started with). Empties the identity cache."""
        self._settings = settings
        self._revocations = revocations
        self._identities.clear()

    def _identity(self, context: aio.ServicerContext[object, object]) -> Identity:
        auth = {k: list(v) for k, v in context.auth_context().items()}
        certs = auth.get("x509_pem_cert") or []
        cached = None
        if len(certs) == 1 and auth.get("transport_security_type") == [b"ssl"]:
            cached = self._identities.get(certs[0])
        if cached is None:
            identity = identity_from_auth_context(auth, self._settings.policy)
            cached = identity, revocation_key(certs[0])
            if len(self._identities) >= IDENTITY_CACHE_SIZE:
                self._identities.clear()
            self._identities[certs[0]] = cached
        # Every call, cached or not, on a resumed TLS session or an old connection alike.
        self._revocations.check(cached[1], cached[0].name)
        return cached[0]

    def _status_pb(self, status: JobStatus) -> pb.JobStatus:
        cached = self._listed.get(status.id)
        if cached is not None:
            self._listed.move_to_end(status.id)
            old, msg = cached
            if old is status:
                return msg
            if old.state is status.state is JobState.RUNNING:
                msg.output_bytes = status.output_bytes
                return msg
        msg = convert.status_to_pb(status)
        self._listed[status.id] = (status, msg)
        if len(self._listed) > LISTED_CACHE:
            self._listed.popitem(last=False)
        return msg

    @contextlib.asynccontextmanager
    async def _rpc(
        self, method: str, context: aio.ServicerContext[object, object]
    ) -> AsyncIterator[Identity]:
        """Authenticate, time and translate errors for one call, and leave its audit line
        (:func:`jobworker.server.logs.audit`): handlers name their job with :func:`_note_job`
        (:meth:`_job` does)."""
        started = time.monotonic()
        in_flight = self._metrics.in_flight.labels(method)
        in_flight.inc()
        recorded = False
        call = _Call()
        _CALL.set(call)
        who: Identity | None = None

        def done(code: grpc.StatusCode) -> None:
            # Before abort(), which sends the status: a caller that then reads /metrics must
            # find its call counted.
            nonlocal recorded
            if not recorded:
                recorded = True
                in_flight.dec()
                elapsed = time.monotonic() - started
                self._metrics.rpc(method, code.name, elapsed)
                logs.audit(
                    method=method,
                    code=code.name,
                    peer=printable(context.peer() or "-"),
                    identity=printable(who.name) if who else "-",
                    role=str(who.role) if who else "-",
                    job=call.job,
                    duration=elapsed,
                )

        try:
            who = self._identity(context)
            yield who
        except JobworkerError as e:
            code = grpc.StatusCode[code_for(e)]
            if isinstance(e, HostError):
                log.error("%s: %s", method, e, exc_info=e)
            done(code)
            await context.abort(
                code, _details(str(e)), trailing_metadata=((ERROR_TRAILER, name_for(e)),)
            )
        except asyncio.CancelledError:
            done(grpc.StatusCode.CANCELLED)
            raise
        except Exception:
            log.exception("%s failed", method)
            done(grpc.StatusCode.INTERNAL)
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error in the daemon; see its log"
            )
        finally:
            done(grpc.StatusCode.OK)

    async def refuse(
        self, method: str, context: aio.ServicerContext[object, object], error: str
    ) -> None:
        """End a call whose request did not parse: INVALID_ARGUMENT, after authentication."""
        async with self._rpc(method, context):
            raise InvalidArgument(error)

    def _job(self, identity: Identity, action: Action, job_id: str) -> None:
        """Returns if ``identity`` may do ``action`` on the job; raises otherwise. Looks only at
        the owner: Status is the one call that pays for reading live usage."""
        _note_job(job_id)
        authorize(identity, action, job_id, self._mgr.spec(_check_id(job_id)).owner)

    async def Start(
        self, request: pb.StartRequest, context: aio.ServicerContext[object, object]
    ) -> pb.StartResponse:
        async with self._rpc("Start", context) as identity:
            authorize(identity, Action.START)
            requested = convert.limits_from_pb(request.limits)
            if requested.io:
                # Caps and defaults name devices as MAJ:MIN of the whole disk: so must the
                # request, or "/dev/sda" would slip past a cap on "8:0".
                requested = resolve_limits(requested)
            limits = effective_limits(
                requested, self._settings.default_limits, self._settings.max_limits
            )
            timeout = request.timeout_seconds if request.HasField("timeout_seconds") else None
            if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
                raise InvalidArgument(
                    f"timeout_seconds must be a positive number of seconds, got {timeout:g}"
                )
            spec = JobSpec(
                argv=tuple(request.argv),
                env=dict(request.env),
                cwd=request.cwd if request.HasField("cwd") else "/",
                owner=identity.name,
                limits=limits,
                sandbox=self._settings.sandbox_for(
                    identity, convert.network_from_pb(request.network), request.no_sandbox
                ),
                timeout=self._settings.timeout_for(identity, timeout),
            )
            status = await self._start_within_quotas(identity, spec)
            _note_job(status.id)
            log.info("job %s started by %s: %s", status.id, printable(identity.name), _argv(spec))
            return pb.StartResponse(id=status.id, status=convert.status_to_pb(status))
        raise AssertionError("unreachable")  # pragma: no cover - _rpc aborts or returns

    async def _start_within_quotas(self, identity: Identity, spec: JobSpec) -> JobStatus:
        """Start ``spec`` if the identity's quotas allow: its running slot is taken before the
        start (two racing starts cannot both take the last one) and given back when the job
        ends, or at once if the start fails."""
        name = identity.name
        counted = self._quotas.take_running(name)
        try:
            self._quotas.take_start(name)
            status = await self._mgr.start(spec, self._settings.credentials_for(identity))
        except BaseException:
            if counted:
                self._quotas.release_running(name)
            raise
        if counted:
            ending = asyncio.ensure_future(self._mgr.wait(status.id))
            self._ending.add(ending)
            ending.add_done_callback(lambda task: self._job_ended(task, name))
        return status

    def _job_ended(self, task: asyncio.Future[JobStatus], name: str) -> None:
        self._ending.discard(task)
        self._quotas.release_running(name)
        if not task.cancelled() and task.exception() is not None:
            log.error("waiting for a job of %s failed", name, exc_info=task.exception())

    async def Stop(
        self, request: pb.StopRequest, context: aio.ServicerContext[object, object]
    ) -> pb.StopResponse:
        async with self._rpc("Stop", context) as identity:
            self._job(identity, Action.STOP, request.id)
            grace = request.grace_seconds if request.HasField("grace_seconds") else None
            if grace is not None and not (math.isfinite(grace) and 0 <= grace <= MAX_STOP_GRACE):
                raise InvalidArgument(
                    f"grace_seconds must be from 0 to {MAX_STOP_GRACE:g}, got {grace}"
                )
            status = await self._mgr.stop(request.id, grace, reason=f"stopped by {identity.name}")
            return pb.StopResponse(status=convert.status_to_pb(status))
        raise AssertionError("unreachable")  # pragma: no cover

    async def Status(
        self, request: pb.StatusRequest, context: aio.ServicerContext[object, object]
    ) -> pb.StatusResponse:
        async with self._rpc("Status", context) as identity:
            self._job(identity, Action.STATUS, request.id)
            status = self._mgr.status(request.id)
            return pb.StatusResponse(status=convert.status_to_pb(status))
        raise AssertionError("unreachable")  # pragma: no cover

    async def List(
        self, request: pb.ListRequest, context: aio.ServicerContext[object, object]
    ) -> pb.ListResponse:
        async with self._rpc("List", context) as identity:
            authorize(identity, Action.LIST)
            size = request.page_size
            if size < 0:
                raise InvalidArgument(
                    f"page_size must be 0 (the default, {DEFAULT_PAGE_SIZE}) or more, got {size}"
                )
            after = _page_after(request.page_token) if request.page_token else None
            # A role sees everyone's jobs or only its own: "" stands for any other owner.
            everyone = request.all and visible(identity, "")
            jobs, last = self._mgr.list_page(
                after,
                min(size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE),
                owner=None if everyone else identity.name,
            )
            response = pb.ListResponse(jobs=[self._status_pb(s) for s in jobs])
            if last is not None:
                response.next_page_token = _page_token(last)
            return response
        raise AssertionError("unreachable")  # pragma: no cover

    async def Wait(
        self, request: pb.WaitRequest, context: aio.ServicerContext[object, object]
    ) -> pb.WaitResponse:
        async with self._rpc("Wait", context) as identity:
            self._job(identity, Action.WAIT, request.id)
            with self._quotas.stream(identity.name, "Wait"):
                status = await self._mgr.wait(request.id)
            return pb.WaitResponse(status=convert.status_to_pb(status))
        raise AssertionError("unreachable")  # pragma: no cover

    async def Remove(
        self, request: pb.RemoveRequest, context: aio.ServicerContext[object, object]
    ) -> pb.RemoveResponse:
        async with self._rpc("Remove", context) as identity:
            self._job(identity, Action.REMOVE, request.id)
            await self._mgr.remove(request.id)
            log.info("job %s removed by %s", request.id, printable(identity.name))
            return pb.RemoveResponse()
        raise AssertionError("unreachable")  # pragma: no cover

    async def Logs(
        self, request: pb.LogsRequest, context: aio.ServicerContext[object, object]
    ) -> AsyncGenerator[pb.LogsChunk]:
        async with self._rpc("Logs", context) as identity:
            self._job(identity, Action.LOGS, request.id)
            with self._quotas.stream(identity.name, "Logs"):
                offset = request.offset
                self._metrics.followers.inc()
                output = self._mgr.output(request.id, offset=offset, follow=request.follow)
                try:
                    async for data in output:
                        yield pb.LogsChunk(offset=offset, data=data)
                        offset += len(data)
                        self._metrics.bytes_streamed.inc(len(data))
                finally:
                    self._metrics.followers.dec()
                    await _aclose(output)


PAGE_TOKEN_VERSION = "1"
BAD_PAGE_TOKEN = (
    "page_token is not one this daemon gave: pass a List response's next_page_token "
    "unchanged, or none to start from the first job"
)


def _page_token(key: PageKey) -> str:
    """Opaque to clients: where the page ended (the last job's start time and id)."""
    micros, job_id = key
    raw = f"{PAGE_TOKEN_VERSION}:{micros}:{job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _page_after(token: str) -> PageKey:
    """The key a page token stands for; :class:`InvalidArgument` for one that does not parse."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, micros, job_id = raw.split(":", 2)
        if version != PAGE_TOKEN_VERSION or not job_id:
            raise ValueError(version)
        return int(micros), job_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument(BAD_PAGE_TOKEN) from None


async def _aclose(iterator: AsyncIterator[bytes]) -> None:
    """Close an output reader now (its fd), not whenever it is garbage-collected."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


SERVICE = "jobworker.v1.JobWorker"
_METHODS: tuple[tuple[str, type[Message], type[Message]], ...] = (
    ("Start", pb.StartRequest, pb.StartResponse),
    ("Stop", pb.StopRequest, pb.StopResponse),
    ("Status", pb.StatusRequest, pb.StatusResponse),
    ("List", pb.ListRequest, pb.ListResponse),
    ("Logs", pb.LogsRequest, pb.LogsChunk),
    ("Wait", pb.WaitRequest, pb.WaitResponse),
    ("Remove", pb.RemoveRequest, pb.RemoveResponse),
)
"""What the generated ``add_JobWorkerServicer_to_server`` registers (Logs streams), but with
request parsing that cannot fail inside grpc: see :func:`_lenient`."""


class _Malformed:
    """Stands for request bytes that do not parse as the method's message."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def _lenient(message: type[Message]) -> Callable[[bytes], object]:
    """A request deserializer that returns :class:`_Malformed` instead of raising: grpc answers
    a raising deserializer with UNKNOWN and the exception's class name, where the caller's
    mistake is INVALID_ARGUMENT."""

    def parse(data: bytes) -> object:
        try:
            return message.FromString(data)
        except DecodeError as e:
            return _Malformed(f"malformed request: {e}")

    return parse


def _method_handlers(service: JobWorkerService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, request, response in _METHODS:
        method = getattr(service, name)
        if name == "Logs":
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _checked_stream(service, name, method),
                request_deserializer=_lenient(request),
                response_serializer=response.SerializeToString,
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _checked_unary(service, name, method),
                request_deserializer=_lenient(request),
                response_serializer=response.SerializeToString,
            )
    return handlers


Context = aio.ServicerContext[Any, Any]


def _checked_unary(
    service: JobWorkerService, name: str, method: Callable[[Any, Context], Awaitable[Any]]
) -> Callable[[object, Context], Awaitable[Any]]:
    async def handler(request: object, context: Context) -> Any:
        if isinstance(request, _Malformed):
            await service.refuse(name, context, request.error)
        return await method(request, context)

    return handler


def _checked_stream(
    service: JobWorkerService, name: str, method: Callable[[Any, Context], AsyncGenerator[Any]]
) -> Callable[[object, Context], Awaitable[None]]:
    """A streaming handler that writes the responses itself (grpc's reader-writer API), so that
    a write failing because the client went away ends the call quietly. Left to grpc (an async
    generator handler), such a write raced grpc noticing the cancellation and, when it lost,
    was logged as an ``ExecuteBatchError`` with a traceback."""

    async def handler(request: object, context: Context) -> None:
        if isinstance(request, _Malformed):
            await service.refuse(name, context, request.error)
        responses = method(request, context)
        try:
            async for item in responses:
                try:
                    await context.write(item)
                except _ExecuteBatchError:
                    # The reader left (`worker logs ID | head`): a cancelled call, not a
                    # failure. The method records it as CANCELLED, ends and re-raises; grpc
                    # takes CancelledError from a handler as the end of a cancelled call.
                    log.debug("%s: the client went away during a write", name)
                    await responses.athrow(asyncio.CancelledError("the client went away"))
        finally:
            await responses.aclose()

    return handler


def _certificate_configuration(material: Material) -> Any:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.ca
    )


class ServerCertificates:
    """The daemon's certificate, key and client CA as grpc serves them: grpc asks
    :meth:`fetch` before every new handshake, so :meth:`replace` takes effect for the next
    connection while open connections keep theirs. grpc calls :meth:`fetch` from its own
    threads, hence the lock."""

    def __init__(self, material: Material) -> None:
        self.initial = _certificate_configuration(material)
        self._material = material
        self._pending: Any = None
        self._lock = threading.Lock()

    def replace(self, material: Material) -> bool:
        """Serve ``material`` from the next handshake on; ``False`` (nothing to do) when it is
        what is served already: a new configuration is a new TLS context, whose new session
        ticket keys would make every client do a full handshake again."""
        if material == self._material:
            return False
        configuration = _certificate_configuration(material)
        with self._lock:
            self._pending = configuration
        self._material = material
        return True

    def fetch(self) -> Any:
        """The new configuration once after :meth:`replace`, else ``None`` (no change)."""
        with self._lock:
            configuration, self._pending = self._pending, None
        return configuration


NOT_READY = "the daemon is not serving yet (it is checking its own TLS settings); retry"
CLOSING = "the daemon is shutting down; retry once it is back (or against another one)"
HEALTH_SERVICE = grpc_health.SERVICE_NAME
"""``grpc.health.v1.Health``: answers for the whole server (``""``) and for :data:`SERVICE`."""


class _Gate:
    """Closed until the TLS 1.2 self-probe has passed: grpc.aio accepts connections as soon as
    the server starts, and the probe needs the port listening, so every RPC that arrives before
    the probe is answered UNAVAILABLE without reaching the service. Closed again when shutdown
    begins (``closing``): the health service goes on answering NOT_SERVING while the jobs stop,
    new JobWorker calls are answered UNAVAILABLE (:data:`CLOSING`)."""

    __slots__ = ("closing", "open")

    def __init__(self) -> None:
        self.open = False
        self.closing = False


@dataclass(slots=True)
class RunningServer:
    server: aio.Server
    port: int
    health: Any = None
    """The ``grpc.health.v1.Health`` servicer (grpc_health's asyncio one, untyped)."""
    gate: _Gate = field(default_factory=_Gate)
    certificates: ServerCertificates | None = None
    """Replace the served certificate (SIGHUP); ``None`` for a server made elsewhere."""

    async def begin_shutdown(self) -> None:
        """Health NOT_SERVING for good, and new JobWorker calls UNAVAILABLE; in-flight calls
        go on. The listener stays open until :meth:`aio.Server.stop`."""
        self.gate.open = False
        self.gate.closing = True
        if self.health is not None:
            await self.health.enter_graceful_shutdown()


def _gated(
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]], gate: _Gate
) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    def guard(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def handler(request: object, context: Context) -> Any:
            if not gate.open:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, CLOSING if gate.closing else NOT_READY
                )
            return await behavior(request, context)

        return handler

    gated: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, h in handlers.items():
        if h.unary_unary is not None:
            gated[name] = h._replace(unary_unary=guard(h.unary_unary))  # type: ignore[attr-defined]
        else:
            assert h.unary_stream is not None
            gated[name] = h._replace(unary_stream=guard(h.unary_stream))  # type: ignore[attr-defined]
    return gated


async def start_server(
    service: JobWorkerService, material: Material, address: str
) -> RunningServer:
    """Serve ``service`` on ``address`` (``HOST:PORT``; port 0 picks one) with mutual TLS.

    Refuses to start (:class:`HostError`) if grpc was imported before
    :mod:`jobworker.server.tls13`, if the listening port turns out to accept a TLS 1.2
    handshake after all, or if that self-probe cannot be made (fail closed). Until the probe
    has passed, every RPC is answered UNAVAILABLE (:data:`NOT_READY`) without reaching
    ``service``, and the health service says NOT_SERVING.

    Also served, behind the same mutual TLS, for any role: ``grpc.health.v1.Health``
    (:data:`HEALTH_SERVICE`) and server reflection (``grpc.reflection.v1alpha``).
    """
    if not tls13.TLS13_ONLY:
        raise HostError(
            "grpc was imported before jobworker.tls, so TLS 1.2 cannot be refused; import "
            "jobworker.server.service (or jobworker.server.tls13) before grpc"
        )
    server = aio.server(options=SERVER_OPTIONS)
    gate = _Gate()
    handlers = _gated(_method_handlers(service), gate)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    # As the generated code does (grpc finds registered methods faster); not in the stubs.
    server.add_registered_method_handlers(SERVICE, handlers)  # type: ignore[attr-defined]
    health = health_aio.HealthServicer()
    for name in (grpc_health.OVERALL_HEALTH, SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    certificates = ServerCertificates(material)
    credentials = grpc.dynamic_ssl_server_credentials(
        certificates.initial, certificates.fetch, require_client_authentication=True
    )
    try:
        port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise HostError(f"cannot listen on {address}: {e}") from e
    await server.start()
    try:
        await _probe(address, port)
    except BaseException:
        await server.stop(None)
        raise
    gate.open = True
    for name in (grpc_health.OVERALL_HEALTH, SERVICE):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, port, health, gate, certificates)


async def _probe(address: str, port: int) -> None:
    """The TLS 1.2 self-probe of a started server; raises :class:`HostError` unless it ran and
    the handshake was refused."""
    host = address.rpartition(":")[0].strip("[]")
    probe_host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    # grpc's C core logs the refusal it is meant to cause ("Handshake failed ...
    # NO_SHARED_CIPHER") on stderr, out of Python logging's reach: say around it what it is.
    log.info(
        "TLS 1.2 self-probe of %s:%d: a TLS 1.2 handshake that must be refused (grpc logs the "
        "refusal as 'Handshake failed ... NO_SHARED_CIPHER')",
        probe_host,
        port,
    )
    try:
        accepted = await asyncio.to_thread(tls13.accepts_tls12, probe_host, port)
    except OSError as e:
        # Fail closed: a probe that could not run proves nothing about TLS 1.2.
        raise HostError(
            f"the TLS 1.2 self-probe of {probe_host}:{port} failed: {e}; refusing to serve "
            "without it"
        ) from e
    if accepted:
        raise HostError(f"{address} accepted a TLS 1.2 handshake; refusing to serve")
    log.info(
        "TLS 1.2 self-probe: refused as expected (grpc's NO_SHARED_CIPHER 'Handshake "
        "failed' line is this probe, not a client's failure); serving TLS 1.3 only"
    )
