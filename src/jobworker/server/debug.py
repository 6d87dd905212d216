"""The daemon's metrics and its debug HTTP endpoint (the Go original's pprof on :6060).

Off by default; when on it listens on loopback only. Endpoints:

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
``/debug/heap?limit=N``
    The top allocation sites from ``tracemalloc``. Tracing costs memory and time, so the first
    request starts it and says so; later requests show what was allocated since.
    ``/debug/heap?stop=1`` stops tracing.

The HTTP server runs in its own threads (stdlib ``ThreadingHTTPServer``) so a profile request
does not stop the event loop it is measuring; anything that must read loop state (the job list,
task stacks) is run on the loop with ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import io
import ipaddress
import socket
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable, Coroutine, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from jobworker.errors import InvalidArgument
from jobworker.spec import JobState

SAMPLE_INTERVAL = 0.005
SHUTDOWN_POLL = 0.02
"""How often the HTTP server's loop checks for :meth:`DebugServer.close` (the stdlib's 0.5 s
default made every daemon shutdown half a second longer)."""
MAX_PROFILE_SECONDS = 120.0
LOOP_CALL_TIMEOUT = 5.0
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
    for stat in stats[:limit]:
        out.write(f"{stat.size:12d} B {stat.count:8d} blocks  {stat.traceback[0]}\n")
    return out.getvalue()


# -- the HTTP server ------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False
    """Request threads are joined at close (a profile is cut short first)."""


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` for the debug endpoint; the host must be a loopback address (or
    ``localhost``). Raises :class:`InvalidArgument`."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
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


class DebugServer:
    """The debug HTTP endpoint. Start with :meth:`start` (from the event loop it reports on)."""

    def __init__(self, metrics: Metrics, loop: asyncio.AbstractEventLoop) -> None:
        self.metrics = metrics
        self._loop = loop
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        """Where it serves, e.g. ``http://127.0.0.1:6060/``."""
        assert self._httpd is not None
        host = str(self._httpd.server_address[0])
        return f"http://[{host}]:{self.port}/" if ":" in host else f"http://{host}:{self.port}/"

    def start(self, address: str) -> None:
        host, port = parse_address(address)
        server_class = _HTTPServer6 if ":" in host else _HTTPServer
        self._httpd = server_class((host, port), _handler_class(self))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            args=(SHUTDOWN_POLL,),
            name="jobworker-debug-http",
            daemon=True,
        )
        self._thread.start()

    def close(self) -> None:
        """Stop serving, cut running profiles short and join every server thread."""
        if self._httpd is None:
            return
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()
        self._httpd = None

    def on_loop(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run a coroutine on the daemon's loop and wait for its result (from an HTTP thread)."""
        return asyncio.run_coroutine_threadsafe(make(), self._loop).result(LOOP_CALL_TIMEOUT)

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[HTTPStatus, str, bytes]:
        text = "text/plain; charset=utf-8"
        if path == "/metrics":
            return HTTPStatus.OK, CONTENT_TYPE_LATEST, self.metrics.exposition()
        if path == "/debug/stacks":
            tasks = self.on_loop(task_stacks)
            body = f"=== threads\n{thread_stacks()}\n=== asyncio tasks\n{tasks}"
            return HTTPStatus.OK, text, body.encode()
        if path == "/debug/profile":
            try:
                seconds = float(query.get("seconds", ["10"])[0])
            except ValueError:
                seconds = -1
            if not 0 < seconds <= MAX_PROFILE_SECONDS:
                msg = f"seconds must be a number in (0, {MAX_PROFILE_SECONDS:g}]\n"
                return HTTPStatus.BAD_REQUEST, text, msg.encode()
            return HTTPStatus.OK, text, profile(seconds, stop=self._closing).encode()
        if path == "/debug/heap":
            if query.get("stop"):
                tracemalloc.stop()
                return HTTPStatus.OK, text, b"tracemalloc stopped\n"
            limit = query.get("limit", ["25"])[0]
            if not limit.isdigit():
                return HTTPStatus.BAD_REQUEST, text, b"limit must be a whole number\n"
            return HTTPStatus.OK, text, heap(int(limit)).encode()
        if path == "/":
            index = "/metrics\n/debug/stacks\n/debug/profile?seconds=N\n/debug/heap?limit=N\n"
            return HTTPStatus.OK, text, index.encode()
        return HTTPStatus.NOT_FOUND, text, b"not found\n"


def _handler_class(server: DebugServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            try:
                status, ctype, body = server.route(url.path, parse_qs(url.query))
            except Exception:
                status = HTTPStatus.INTERNAL_SERVER_ERROR
                ctype, body = "text/plain; charset=utf-8", traceback.format_exc().encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler
