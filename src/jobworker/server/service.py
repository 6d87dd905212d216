"""The gRPC service: jobworker.v1.JobWorker over a :class:`~jobworker.manager.JobManager`.

With :mod:`jobworker.server.grpc_server` (which serves it), the daemon's only module that
imports grpc. Every RPC goes the same way through :meth:`JobWorkerService._rpc`: the caller's
identity from its verified certificate, the permission check (:mod:`jobworker.server.authz`),
the call, and on a :mod:`jobworker.errors` error the status code from the one table in
:mod:`jobworker.api.errors`.
"""

from __future__ import annotations

# isort: off
# jobworker.tls must come first: it sets GRPC_SSL_CIPHER_SUITES, which grpc reads on import.
from jobworker.server import tls13  # noqa: F401 - imported for that effect
import grpc
from grpc import aio

# isort: on
import asyncio
import base64
import binascii
import contextlib
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass

from jobworker.api import convert
from jobworker.api.errors import ERROR_TRAILER, code_for, name_for
from jobworker.api.proto import pb, pb_grpc
from jobworker.cgroup.devices import resolve_limits
from jobworker.errors import HostError, InvalidArgument, JobNotFound, JobworkerError
from jobworker.manager import JobManager, PageKey
from jobworker.server import attach, logs
from jobworker.server.accounts import printable
from jobworker.server.authz import (
    Action,
    Identity,
    RevocationKey,
    Revocations,
    authorize,
    identity_from_auth_context,
    revocation_key,
    visible,
)
from jobworker.server.grpc_server import (
    _METHODS,
    HEALTH_SERVICE,
    SERVER_OPTIONS,
    SERVICE,
    RunningServer,
    start_server,
)
from jobworker.server.listing import Listing
from jobworker.server.metrics import Metrics
from jobworker.server.policy import effective_limits
from jobworker.server.quotas import Quotas
from jobworker.server.settings import Settings
from jobworker.spec import JobSpec, JobStatus

__all__ = [
    "HEALTH_SERVICE",
    "SERVER_OPTIONS",
    "SERVICE",
    "_METHODS",
    "JobWorkerService",
    "RunningServer",
    "Settings",
    "start_server",
]
"""Names that live in :mod:`jobworker.server.grpc_server` and :mod:`jobworker.server.settings`
are re-exported here: the daemon, the tests and the benchmarks import them from this module."""

log = logging.getLogger(__name__)

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
        self._listing = Listing(self._has_job)
        """List's pages, from each job's encoding at its last listing."""

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

    def _has_job(self, job_id: str) -> bool:
        try:
            self._mgr.spec(job_id)
        except JobNotFound:
            return False
        return True

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
                stdin=request.stdin,
                terminal=self._settings.terminal_for(
                    identity, convert.window_from_pb(request.window) if request.tty else None
                ),
            )
            status = await self._start_within_quotas(identity, spec)
            _note_job(status.id)
            if log.isEnabledFor(logging.INFO):
                who = printable(identity.name)
                log.info("job %s started by %s: %s", status.id, who, _argv(spec))
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
            return self._listing.response(jobs, "" if last is None else _page_token(last))
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

    def Attach(
        self, requests: AsyncIterator[object], context: aio.ServicerContext[object, object]
    ) -> AsyncGenerator[pb.AttachResponse]:
        return attach.serve(self, requests, context)  # see jobworker.server.attach

    async def Logs(
        self, request: pb.LogsRequest, context: aio.ServicerContext[object, object]
    ) -> AsyncGenerator[pb.LogsChunk]:
        async with self._rpc("Logs", context) as identity:
            self._job(identity, Action.LOGS, request.id)
            query = convert.query_from_pb(request)
            with self._quotas.stream(identity.name, "Logs"):
                self._metrics.followers.inc()
                output = self._mgr.chunks(request.id, query)
                try:
                    async for chunk in output:
                        yield convert.chunk_to_pb(chunk)
                        self._metrics.bytes_streamed.inc(len(chunk.data))
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


async def _aclose(iterator: AsyncIterator[object]) -> None:
    """Close an output reader now (its fd), not whenever it is garbage-collected."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()
