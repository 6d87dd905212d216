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
    is a sampling profiler instead (:mod:`jobworker.server.profiling`): a thread reads every
    other thread's frame (``sys._current_frames()``) every
    :data:`~jobworker.server.profiling.SAMPLE_INTERVAL` for N seconds (default 10, at most
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
import contextlib
import ipaddress
import logging
import math
import re
import socketserver
import threading
import time
import tracemalloc
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST

from jobworker.errors import HostError, InvalidArgument
from jobworker.server.authz import Policy, Revocations
from jobworker.server.debug_listeners import (
    CONNECTION_TIMEOUT,
    _bind_unix,
    _Peer,
    _tls_context,
    _TLSServer,
    _UnixServer,
)
from jobworker.server.metrics import Metrics
from jobworker.server.profiling import heap, profile, task_stacks, thread_stacks
from jobworker.tls import Material

__all__ = ["DebugServer", "Metrics", "parse_address"]
""":class:`~jobworker.server.metrics.Metrics` is re-exported: the daemon imports it from here."""

log = logging.getLogger(__name__)

SHUTDOWN_POLL = 0.02
"""How often the HTTP server's loop checks for :meth:`DebugServer.close` (the stdlib's 0.5 s
default made every daemon shutdown half a second longer)."""
MAX_PROFILE_SECONDS = 120.0
LOOP_CALL_TIMEOUT = 5.0
MAX_QUERY_FIELDS = 8
T = TypeVar("T")


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


class DebugServer:
    """The debug HTTP endpoint, on a Unix socket (:meth:`start_unix`) and/or HTTPS with mutual
    TLS (:meth:`start_tcp`). Create and start it from the event loop it reports on."""

    def __init__(
        self,
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        policy: Policy | None = None,
        revocations: Revocations | None = None,
    ) -> None:
        self.metrics = metrics
        self._loop = loop
        self._policy = policy
        self._revocations = revocations or Revocations()
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

    def reconfigure(self, policy: Policy | None, revocations: Revocations) -> None:
        """A reloaded policy and CRL, for HTTPS connections from the next one on. (The
        endpoint's own certificate is the one it started with.)"""
        self._policy, self._revocations = policy, revocations
        if self._tcp is not None:
            self._tcp.access = (policy, revocations)

    def start_tcp(self, address: str, material: Material) -> None:
        """Serve HTTPS with mutual TLS on loopback ``HOST:PORT``, for admin certificates."""
        host, port = parse_address(address)
        context = _tls_context(material)
        try:
            server = _TLSServer(
                (host, port), _handler_class(self, host), context, self._policy, self._revocations
            )
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
