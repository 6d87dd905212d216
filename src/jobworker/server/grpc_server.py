"""The gRPC server around the service: method handlers, the TLS 1.2 probe gate, health,
reflection and the dynamically replaceable server certificate (:func:`start_server`)."""

from __future__ import annotations

# isort: off
# jobworker.tls must come first: it sets GRPC_SSL_CIPHER_SUITES, which grpc reads on import.
from jobworker.server import tls13
import grpc
from grpc import aio
from grpc._cython import cygrpc  # type: ignore[attr-defined]

# isort: on
import asyncio
import logging
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jobworker.api.proto import pb
from jobworker.errors import HostError
from jobworker.tls import Material

if TYPE_CHECKING:
    from jobworker.server.service import JobWorkerService

log = logging.getLogger("jobworker.server.service")
"""The logger these lines had before this module was split out of the service's."""

_ExecuteBatchError: type[Exception] = cygrpc.ExecuteBatchError
"""What a write to a call raises once the call is over (the client cancelled or left). Not in
grpc's public API; the aio server itself tolerates it only once it has seen the cancellation."""

MAX_REQUEST_BYTES = 4 * 1024 * 1024
"""Largest request accepted: argv + env are capped at 1 MiB (:data:`jobworker.spec.
MAX_ARGV_ENV_BYTES`), so anything bigger is refused by grpc before it is even parsed."""

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Notice clients that vanished without closing (long Logs/Wait calls).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Let clients ping us as often as every 10 s (the default allows one per 5 min).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


SERVICE = "jobworker.v1.JobWorker"
_METHODS: tuple[tuple[str, type[Message], type[Message]], ...] = (
    ("Start", pb.StartRequest, pb.StartResponse),
    ("Stop", pb.StopRequest, pb.StopResponse),
    ("Status", pb.StatusRequest, pb.StatusResponse),
    ("List", pb.ListRequest, pb.ListResponse),
    ("Logs", pb.LogsRequest, pb.LogsChunk),
    ("Wait", pb.WaitRequest, pb.WaitResponse),
    ("Remove", pb.RemoveRequest, pb.RemoveResponse),
    ("Attach", pb.AttachRequest, pb.AttachResponse),
)
"""What the generated ``add_JobWorkerServicer_to_server`` registers (Logs, Attach stream), but with
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
        elif name == "Attach":  # it checks each request itself (jobworker.server.attach)
            handlers[name] = grpc.stream_stream_rpc_method_handler(
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
        elif h.stream_stream is not None:
            gated[name] = h._replace(stream_stream=guard(h.stream_stream))  # type: ignore[attr-defined]
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
