"""The daemon's metrics and its debug HTTP endpoint (the Go original's pprof on :6060).

Off by default. It shows every thread's stack, profiles and allocation sites of a process
that holds the CA-signed server key, so no job may reach it, whatever its network:

* a Unix socket (:meth:`DebugServer.start_unix`, ``workerd --debug-socket PATH``), mode 0600,
  owned by the daemon's user; a peer whose uid (``SO_PEERCRED``) is neither the daemon's nor
  root is refused as well. Jobs run as other accounts, so the mode keeps them out;
* or HTTPS on loopback with mutual TLS (:meth:`DebugServer.start_tcp`, ``--debug-addr``): the
  daemon's CA, certificate and key, TLS 1.3, and only client certificates whose role is admin
  (403 otherwise; no certificate: the handshake fails). The Host header must name the listen
  address (or ``localhost``) with its port: 421 otherwise, against DNS rebinding. Plain HTTP
  over TCP is not offered.

Endpoints:

``/metrics``
    Prometheus text: jobs by state, active log followers, bytes streamed, RPC counts (by method
    and status code) and latency.
``/debug/stacks``
    Every thread's stack, then every asyncio task's.
``/debug/profile?seconds=N``
    A CPU profile of the whole process. cProfile only sees the thread that enables it, so this
    is a sampling profiler instead: a thread reads every other thread's frame
    (``sys._current_frames()``) every :data:`SAMPLE_INTERVAL` for N seconds (default 10, at most
    :data:`MAX_PROFILE_SECONDS`). The answer is the top functions by samples, then the stacks in
    the "folded" format flame graph tools read. Native code (grpc's C core) shows up as the
    Python frame that called into it.
``/debug/profile?seconds=N``
    One at a time: a second request while one runs gets 429 with ``Retry-After``.
``/debug/heap?limit=N``
    The top allocation sites from ``tracemalloc``. Tracing costs memory and time, so the first
    request starts it and says so; later requests show what was allocated since.
    ``/debug/heap?stop=1`` stops tracing. While on, every allocation in the daemon records a
    traceback of up to 16 frames (slower allocations, more memory); each request takes a
    snapshot of all traces (time and memory proportional to the live blocks).

A malformed query gets 400 with a one-line message; an unexpected failure gets 500 with a
generic message, the traceback going only to the daemon's log.

The HTTP server runs in its own threads (stdlib ``ThreadingHTTPServer``) so a profile request
does not stop the event loop it is measuring; anything that must read loop state (the job list,
task stacks) is run on the loop with ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import ipaddress
import logging
import math
import os
import re
import socket
import socketserver
import ssl
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from jobworker.errors import HostError, InvalidArgument, Unauthenticated
from jobworker.identity import Role
from jobworker.retention import REASONS, Removal
from jobworker.server.authz import Policy, identity_from_certificate
from jobworker.spec import JobState
from jobworker.tls import Material

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.005
SHUTDOWN_POLL = 0.02
"""How often the HTTP server's loop checks for :meth:`DebugServer.close` (the stdlib's 0.5 s
default made every daemon shutdown half a second longer)."""
MAX_PROFILE_SECONDS = 120.0
LOOP_CALL_TIMEOUT = 5.0
SOCKET_MODE = 0o600
CONNECTION_TIMEOUT = 10.0
"""Socket timeout of a connection: the TLS handshake, reading the request, writing the answer
(a profile's sampling time is not counted: nothing is read or written meanwhile)."""
MAX_CONNECTIONS = 16
"""Connections served at once (each has a thread); more are closed at once."""
MAX_QUERY_FIELDS = 8
T = TypeVar("T")


class _JobsCollector(Collector):
    def __init__(self, states: Callable[[], Iterable[JobState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "jobworker_jobs", "Jobs known to the daemon, by state.", labels=["state"]
        )
        counts = collections.Counter(self._states())
        for state in JobState:
            family.add_metric([state.value], counts[state])
        yield family


class Metrics:
    """The daemon's Prometheus metrics, in a registry of their own (so several daemons can run
    in one process, as in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rpcs = Counter(
            "jobworker_rpcs",
            "RPCs handled, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "jobworker_rpc_duration_seconds",
            "RPC latency by method (a Logs stream counts until it ends).",
            ["method"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "jobworker_rpcs_in_flight",
            "RPCs being handled now, by method.",
            ["method"],
            registry=self.registry,
        )
        self.followers = Gauge(
            "jobworker_log_streams_active", "Logs streams being served now.", registry=self.registry
        )
        self.bytes_streamed = Counter(
            "jobworker_log_streamed_bytes",
            "Output bytes sent to Logs clients.",
            registry=self.registry,
        )
        self.jobs_removed = Counter(
            "jobworker_jobs_removed",
            "Ended jobs removed by retention (record and log), by the limit that removed them.",
            ["reason"],
            registry=self.registry,
        )
        for reason in REASONS:
            self.jobs_removed.labels(reason)

    def job_removed(self, removal: Removal) -> None:
        self.jobs_removed.labels(removal.reason).inc()

    def observe_jobs(self, states: Callable[[], Iterable[JobState]]) -> None:
        """Report jobs by state, read with ``states()`` at each scrape (from the HTTP thread)."""
        self.registry.register(_JobsCollector(states))

    def rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpcs.labels(method, code).inc()
        self.rpc_seconds.labels(method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# -- stacks, profile, heap ------------------------------------------------------------------


def thread_stacks() -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    out = io.StringIO()
    for ident, frame in sys._current_frames().items():
        out.write(f"--- thread {names.get(ident, '?')} ({ident})\n")
        out.write("".join(traceback.format_stack(frame)))
    return out.getvalue()


async def task_stacks() -> str:
    """Every asyncio task of the running loop with its stack (call on the loop).

    Not ``Task.print_stack``: it fails on frames without a line number (Cython coroutines)."""
    out = io.StringIO()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        out.write(f"--- task {task.get_name()}: {task.get_coro()!r}\n")
        for frame in task.get_stack():
            code = frame.f_code
            out.write(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
    return out.getvalue()


def _frame_key(frame: FrameType) -> str:
    code = frame.f_code
    return f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"


def profile(
    seconds: float, interval: float = SAMPLE_INTERVAL, stop: threading.Event | None = None
) -> str:
    """Sample every other thread's stack for ``seconds`` (less if ``stop`` is set); see the
    module docstring."""
    stop = stop or threading.Event()
    me = threading.get_ident()
    folded: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not stop.is_set():
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            stack: list[str] = []
            f: FrameType | None = frame
            while f is not None:
                stack.append(_frame_key(f))
                f = f.f_back
            if not stack:
                continue
            samples += 1
            own[stack[0]] += 1
            for key in set(stack):
                total[key] += 1
            folded[";".join(reversed(stack))] += 1
        stop.wait(interval)
    out = io.StringIO()
    out.write(f"# {samples} thread samples over {seconds:g}s every {interval * 1000:g} ms\n")
    out.write("# top functions: self samples, total samples, function\n")
    for key, n in own.most_common(40):
        out.write(f"{n:8d} {total[key]:8d}  {key}\n")
    out.write("# folded stacks (flamegraph.pl / speedscope input)\n")
    for stack_text, n in folded.most_common():
        out.write(f"{stack_text} {n}\n")
    return out.getvalue()


def heap(limit: int = 25) -> str:
    if not tracemalloc.is_tracing():
        tracemalloc.start(16)
        return (
            "tracemalloc was off and is now tracing (it slows allocations down); request this "
            "page again for the top allocation sites, and /debug/heap?stop=1 to stop tracing.\n"
        )
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    stats = snapshot.statistics("lineno")
    current, peak = tracemalloc.get_traced_memory()
    out = io.StringIO()
    out.write(f"# traced now {current} bytes, peak {peak} bytes; top {limit} sites by size\n")
    for site in stats[:limit]:
        out.write(f"{site.size:12d} B {site.count:8d} blocks  {site.traceback[0]}\n")
    return out.getvalue()


# -- the HTTP server ------------------------------------------------------------------------


class BadRequest(Exception):
    """A malformed query: answered 400 with this one-line message."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: HTTPStatus
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] | None = None


def _text(status: HTTPStatus, message: str, **headers: str) -> Answer:
    return Answer(status, message.encode() + b"\n", headers=headers or None)


INTERNAL_ERROR = "internal error in the debug endpoint; see the daemon's log"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for the debug endpoint; the host must be a loopback address (or
    ``localhost``). Raises :class:`InvalidArgument`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"debug address {text!r} must be HOST:PORT, e.g. 127.0.0.1:6060")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise InvalidArgument(
                f"debug address {text!r} must be on loopback (127.0.0.1, ::1 or localhost): "
                "it exposes stacks, profiles and memory"
            )
    return host, int(port)


def _one(query: Mapping[str, list[str]], name: str, default: str) -> str:
    values = query.get(name, [default])
    if len(values) != 1:
        raise BadRequest(f"{name} is given more than once")
    return values[0]


def _seconds(query: Mapping[str, list[str]]) -> float:
    text = _one(query, "seconds", "10")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_PROFILE_SECONDS):
        raise BadRequest(f"seconds must be a number in (0, {MAX_PROFILE_SECONDS:g}]")
    return seconds


def _limit(query: Mapping[str, list[str]]) -> int:
    text = _one(query, "limit", "25")
    if not re.fullmatch(r"[0-9]{1,6}", text):
        raise BadRequest("limit must be a whole number from 0 to 999999")
    return int(text)


def _host_port(header: str) -> tuple[str, int | None] | None:
    """``Host`` header -> (host, port or None); ``None`` if it does not parse."""
    m = re.fullmatch(
        r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?|([^:\[\]]+)(?::([0-9]{1,5}))?", header
    )
    if m is None:
        return None
    host = (m[1] or m[3]).lower()
    port = m[2] or m[4]
    return host, int(port) if port else None


def _same_host(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return False


class _Peer(threading.local):
    refused: str | None = None
    """Why this thread's connection may not be answered (403), or ``None``."""


class _Limited(socketserver.ThreadingMixIn):
    """Bounded thread-per-connection serving, with each connection vetted by :meth:`admit`."""

    daemon_threads = False
    """Request threads are joined at close (a profile is cut short first)."""
    block_on_close = True

    def setup_limits(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.peer = _Peer()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("debug endpoint: more than %d connections; closing one", MAX_CONNECTIONS)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Not the stdlib's traceback on stderr: a client that went away is no failure.
        log.debug("debug endpoint: connection failed", exc_info=True)


class _TLSServer(_Limited, ThreadingHTTPServer):
    """HTTPS with mutual TLS; the handshake runs in the connection's thread, not the accept
    loop, so a peer that stalls it holds up nobody else."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        policy: Policy | None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        self.policy = policy
        self.setup_limits()
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            # wrap_socket takes over the fd: closing ``tls`` closes the connection.
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.info("debug endpoint: TLS handshake with %s failed: %s", client_address[0], e)
            return
        try:
            self.peer.refused = self._refusal(tls)
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            self.peer.refused = None
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()

    def _refusal(self, tls: ssl.SSLSocket) -> str | None:
        der = tls.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - CERT_REQUIRED fails the handshake first
            return "a client certificate is required"
        try:
            identity = identity_from_certificate(
                ssl.DER_cert_to_PEM_cert(der).encode(), self.policy
            )
        except Unauthenticated as e:
            return f"the debug endpoint is for admins: {e}"
        if identity.role is not Role.ADMIN:
            log.warning("debug endpoint: refused %s (role %s)", identity.name, identity.role)
            return f"the debug endpoint is for admins; {identity.name} is {identity.role}"
        return None


class _UnixServer(_Limited, socketserver.UnixStreamServer):
    def __init__(self, sock: socket.socket, path: str, handler: type[BaseHTTPRequestHandler]):
        self.setup_limits()
        super().__init__(path, handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        # The socket's mode already keeps other accounts out; this holds if it is ever widened.
        self.peer.refused = (
            None if uid in (0, os.geteuid()) else f"uid {uid} may not use the debug endpoint"
        )
        try:
            super().finish_request(request, client_address)
        finally:
            self.peer.refused = None


def _bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start.

    It is bound in a fresh 0700 directory next to ``path``, chmod-ed, then renamed into place,
    so no other account can connect in between (no process-wide umask is touched). A stale
    socket left by a daemon that died is replaced; a live one, or any other file, is not."""
    if len(os.fsencode(path)) > 100:
        raise InvalidArgument(f"debug socket path {path} is too long for a Unix socket")
    with contextlib.suppress(FileNotFoundError):
        mode = path.lstat().st_mode
        if not stat.S_ISSOCK(mode):
            raise HostError(f"debug socket {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # stale
            else:
                raise HostError(f"debug socket {path} is in use by another process")
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".dbg", dir=path.parent))
    except OSError as e:
        raise HostError(f"cannot create the debug socket in {path.parent}: {e.strerror}") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bound = scratch / "s"
        sock.bind(str(bound))
        os.chmod(bound, SOCKET_MODE)
        sock.listen(socketserver.TCPServer.request_queue_size)
        os.rename(bound, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            (scratch / "s").unlink()
        raise HostError(f"cannot create the debug socket {path}: {e.strerror}") from e
    finally:
        scratch.rmdir()
    return sock


def _tls_context(material: Material) -> ssl.SSLContext:
    """Server side of mutual TLS 1.3 with the gRPC server's CA, certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=material.ca.decode())
    # ssl loads a key only from a file: an anonymous memory file, never on disk.
    fd = os.memfd_create("jobworker-debug-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, material.cert + b"\n" + material.key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx


class DebugServer:
    """The debug HTTP endpoint, on a Unix socket (:meth:`start_unix`) and/or HTTPS with mutual
    TLS (:meth:`start_tcp`). Create and start it from the event loop it reports on."""

    def __init__(
        self, metrics: Metrics, loop: asyncio.AbstractEventLoop, policy: Policy | None = None
    ) -> None:
        self.metrics = metrics
        self._loop = loop
        self._policy = policy
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self._tcp: _TLSServer | None = None
        self._socket: tuple[Path, int] | None = None
        """The socket file and its inode (removed at close only if it is still ours)."""
        self._closing = threading.Event()
        self._profile_lock = threading.Lock()
        self._profile_ends = 0.0

    @property
    def port(self) -> int:
        assert self._tcp is not None
        return self._tcp.server_address[1]

    @property
    def tcp_port(self) -> int | None:
        return self._tcp.server_address[1] if self._tcp else None

    @property
    def url(self) -> str:
        """Where HTTPS is served, e.g. ``https://127.0.0.1:6060/``."""
        assert self._tcp is not None
        host = str(self._tcp.server_address[0])
        return f"https://[{host}]:{self.port}/" if ":" in host else f"https://{host}:{self.port}/"

    @property
    def socket_path(self) -> Path | None:
        return self._socket[0] if self._socket else None

    @property
    def profiling(self) -> bool:
        """Whether a /debug/profile is running now."""
        return self._profile_lock.locked()

    def _serve(self, server: socketserver.BaseServer, name: str) -> None:
        self._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever, args=(SHUTDOWN_POLL,), name=name, daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def start_unix(self, path: Path) -> None:
        """Serve plain HTTP on a Unix socket at ``path`` (mode 0600; see the module doc)."""
        path = path.absolute()
        sock = _bind_unix(path)
        try:
            server = _UnixServer(sock, str(path), _handler_class(self, None))
        except BaseException:
            sock.close()
            path.unlink()
            raise
        self._socket = (path, path.stat().st_ino)
        self._serve(server, "jobworker-debug-unix")

    def start_tcp(self, address: str, material: Material) -> None:
        """Serve HTTPS with mutual TLS on loopback ``HOST:PORT``, for admin certificates."""
        host, port = parse_address(address)
        context = _tls_context(material)
        try:
            server = _TLSServer((host, port), _handler_class(self, host), context, self._policy)
        except OSError as e:
            raise HostError(f"cannot listen on debug address {address}: {e.strerror}") from e
        self._tcp = server
        self._serve(server, "jobworker-debug-https")

    def close(self) -> None:
        """Stop serving, cut running profiles short, join every server thread, remove the
        socket file."""
        self._closing.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join()
        self._servers.clear()
        self._threads.clear()
        self._tcp = None
        if self._socket is not None:
            path, inode = self._socket
            self._socket = None
            with contextlib.suppress(FileNotFoundError):
                if path.lstat().st_ino == inode:
                    path.unlink()

    def on_loop(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the daemon's loop and wait for its result (from an HTTP thread)."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(LOOP_CALL_TIMEOUT)

    def _profile(self, seconds: float) -> Answer:
        if not self._profile_lock.acquire(blocking=False):
            wait = max(1, math.ceil(self._profile_ends - time.monotonic()))
            return _text(
                HTTPStatus.TOO_MANY_REQUESTS,
                "a profile is already running; one at a time",
                **{"Retry-After": str(wait)},
            )
        try:
            self._profile_ends = time.monotonic() + seconds
            return Answer(HTTPStatus.OK, profile(seconds, stop=self._closing).encode())
        finally:
            self._profile_lock.release()

    def route(self, path: str, query: Mapping[str, list[str]]) -> Answer:
        """The answer to ``GET path?query``; raises :class:`BadRequest` for a bad query."""
        if path == "/metrics":
            return Answer(HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE_LATEST)
        if path == "/debug/stacks":
            tasks = self.on_loop(task_stacks)
            body = f"=== threads\n{thread_stacks()}\n=== asyncio tasks\n{tasks}"
            return Answer(HTTPStatus.OK, body.encode())
        if path == "/debug/profile":
            return self._profile(_seconds(query))
        if path == "/debug/heap":
            if query.get("stop"):
                tracemalloc.stop()
                return _text(HTTPStatus.OK, "tracemalloc stopped")
            return Answer(HTTPStatus.OK, heap(_limit(query)).encode())
        if path == "/":
            index = "/metrics\n/debug/stacks\n/debug/profile?seconds=N\n/debug/heap?limit=N\n"
            return Answer(HTTPStatus.OK, index.encode())
        return _text(HTTPStatus.NOT_FOUND, "not found")


def _handler_class(server: DebugServer, tcp_host: str | None) -> type[BaseHTTPRequestHandler]:
    """The request handler; ``tcp_host``: the configured listen host when serving TCP (the
    Host header is checked), ``None`` on the Unix socket."""

    class Handler(BaseHTTPRequestHandler):
        timeout = CONNECTION_TIMEOUT

        def _host_ok(self) -> bool:
            if tcp_host is None:
                return True
            parsed = _host_port(self.headers.get("Host", ""))
            if parsed is None:
                return False
            host, port = parsed
            address = self.server.server_address
            assert isinstance(address, tuple)
            bound, listen_port = str(address[0]), int(address[1])
            if (port or 443) != listen_port:
                return False
            return host == "localhost" or _same_host(host, tcp_host) or _same_host(host, bound)

        def _answer(self) -> Answer:
            refused = getattr(self.server, "peer", _Peer()).refused
            if refused is not None:
                return _text(HTTPStatus.FORBIDDEN, refused)
            if not self._host_ok():
                return _text(
                    HTTPStatus.MISDIRECTED_REQUEST,
                    "the Host header must name the debug endpoint's address and port",
                )
            url = urlsplit(self.path)
            try:
                query = parse_qs(url.query, errors="strict", max_num_fields=MAX_QUERY_FIELDS)
            except ValueError:
                return _text(HTTPStatus.BAD_REQUEST, "malformed query string")
            try:
                return server.route(url.path, query)
            except BadRequest as e:
                return _text(HTTPStatus.BAD_REQUEST, str(e))
            except Exception:
                log.exception("debug endpoint: GET %s failed", url.path)
                return _text(HTTPStatus.INTERNAL_SERVER_ERROR, INTERNAL_ERROR)

        def do_GET(self) -> None:
            answer = self._answer()
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for name, value in (answer.headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(answer.body)

        def address_string(self) -> str:
            return str(self.client_address[0]) if self.client_address else "unix"

        def log_message(self, format: str, *args: object) -> None:
            log.debug("debug endpoint: %s %s", self.address_string(), format % args)

    return Handler
