"""The debug endpoint of a real daemon: metrics, stacks, profile, heap; out of every job's reach
(a 0600 Unix socket, or HTTPS with mutual TLS for admin certificates only), one profile at a
time, and no traceback in any answer."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import asyncio
import http.client
import logging
import os
import re
import socket
import ssl
import stat
import threading
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.errors import InvalidArgument, JobNotFound
from jobworker.server import debug as debug_module
from jobworker.server.daemon import Daemon, serve
from jobworker.server.debug import DebugServer, parse_address
from tests.conftest import cgroup2_usable, wait_for
from tests.integration.as_nobody import attempt, run_as_nobody

pki_dir = harness.pki_dir


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (what ``curl --unix-socket`` does)."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(str(self.unix_path))
        except BaseException:
            sock.close()
            raise
        self.sock = sock


Reply = tuple[int, str, dict[str, str]]


def request(conn: http.client.HTTPConnection, path: str, host: str | None = None) -> Reply:
    try:
        headers = {"Host": host} if host is not None else {}
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode(), dict(r.getheaders())
    finally:
        conn.close()


def tls_context(pki: Path, user: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if user is not None:
        ctx.load_cert_chain(pki / f"{user}.pem", pki / f"{user}-key.pem")
    return ctx


def https(d: Daemon, pki: Path, user: str | None) -> http.client.HTTPSConnection:
    return http.client.HTTPSConnection(
        "127.0.0.1", d.debug_port, context=tls_context(pki, user), timeout=30
    )


@pytest.fixture
def socket_dir(tmp_path: Path) -> Path:
    """A directory other accounts can traverse (pytest's are 0700): then only the socket's own
    mode can keep them out."""
    for parent in (tmp_path, *tmp_path.parents):
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    d = tmp_path / "sock"
    d.mkdir(mode=0o711)
    d.chmod(0o711)
    return d


@pytest.fixture
async def debug_daemon(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, socket_dir: Path
) -> AsyncIterator[Daemon]:
    """A daemon with the debug endpoint on a Unix socket and on HTTPS; at the end no thread
    and no socket file is left."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    sock = socket_dir / "debug.sock"
    d = await serve(
        harness.make_config(
            tmp_path / "state",
            pki_dir,
            cgroup_name,
            debug_socket=sock,
            debug_address="127.0.0.1:0",
        )
    )
    try:
        yield d
    finally:
        await d.close()
    assert not harness.new_threads(threads_before)
    assert not sock.exists() and not sock.is_symlink()
    assert os.listdir(socket_dir) == []  # nor the scratch directory it was bound in


async def get(d: Daemon, path: str) -> tuple[int, str]:
    """GET over the Unix socket."""
    assert d.debug_socket is not None
    status, body, _ = await asyncio.to_thread(request, UnixHTTPConnection(d.debug_socket), path)
    return status, body


async def get_tls(
    d: Daemon, pki: Path, user: str | None, path: str, host: str | None = None
) -> Reply:
    return await asyncio.to_thread(request, https(d, pki, user), path, host)


# -- who can reach it -----------------------------------------------------------------------


async def test_the_unix_socket_is_the_daemons_users_only(debug_daemon: Daemon) -> None:
    sock = debug_daemon.debug_socket
    assert sock is not None
    st = sock.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    # The daemon's own user gets the metrics...
    status, text = await get(debug_daemon, "/metrics")
    assert status == 200 and "jobworker_jobs" in text
    # ...another account (what jobs run as) can reach the file but not connect to it.
    assert run_as_nobody(attempt(f"os.stat({str(sock)!r})")) == "ok"
    connect = f"socket.socket(socket.AF_UNIX).connect({str(sock)!r})"
    assert run_as_nobody(attempt(connect)) == "PermissionError EACCES"


async def test_a_widened_socket_still_refuses_other_uids(debug_daemon: Daemon) -> None:
    """Defence in depth: the peer's uid is checked too (SO_PEERCRED), should the mode change."""
    sock = debug_daemon.debug_socket
    assert sock is not None
    sock.chmod(0o666)
    code = f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(sock)!r})
        s.sendall(b"GET /metrics HTTP/1.0\\r\\n\\r\\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        print(answer.split(b"\\r\\n")[0].decode(), b"jobworker_jobs" in answer)
    """
    assert run_as_nobody(code) == "HTTP/1.0 403 Forbidden False"


async def test_https_needs_an_admin_certificate(debug_daemon: Daemon, pki_dir: Path) -> None:
    status, text, _ = await get_tls(debug_daemon, pki_dir, "root", "/metrics")
    assert status == 200 and "jobworker_jobs" in text
    for user in ("alice", "vera"):  # user and viewer roles
        status, text, _ = await get_tls(debug_daemon, pki_dir, user, "/metrics")
        assert status == 403, (user, status, text)
        assert "jobworker_jobs" not in text and "for admins" in text


async def test_https_without_a_client_certificate_fails_the_handshake(
    debug_daemon: Daemon, pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The client learns it from an alert or a closed connection, depending on timing; the
    reason is read from the daemon's log."""
    caplog.set_level(logging.INFO, logger="jobworker.server.debug")
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        await get_tls(debug_daemon, pki_dir, None, "/metrics")
    await wait_for(
        lambda: "PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text, what="the refusal logged"
    )
    assert "TLS handshake with 127.0.0.1 failed" in caplog.text


async def test_plain_http_over_tcp_is_not_served(debug_daemon: Daemon) -> None:
    def plain() -> bytes:
        with socket.create_connection(("127.0.0.1", debug_daemon.debug_port), timeout=30) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except ConnectionResetError:
                pass  # the TLS server gave up on the non-TLS bytes
            return answer

    answer = await asyncio.to_thread(plain)
    assert not answer.startswith(b"HTTP/") and b"jobworker_jobs" not in answer


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("127.0.0.1:{port}", 200),
        ("localhost:{port}", 200),
        ("LOCALHOST:{port}", 200),
        ("evil.example:{port}", 421),
        ("127.0.0.1:1", 421),
        ("127.0.0.2:{port}", 421),
        ("localhost", 421),  # no port: 443
        ("", 421),
        ("[::1]:{port}", 421),
    ],
)
async def test_https_checks_the_host_header(
    debug_daemon: Daemon, pki_dir: Path, host: str, status: int
) -> None:
    header = host.format(port=debug_daemon.debug_port)
    got, text, _ = await get_tls(debug_daemon, pki_dir, "root", "/metrics", host=header)
    assert got == status, (header, text)
    assert ("jobworker_jobs" in text) is (status == 200)


# -- what it answers ------------------------------------------------------------------------


async def test_metrics(debug_daemon: Daemon, pki_dir: Path) -> None:
    async with Client.from_pki(f"127.0.0.1:{debug_daemon.port}", pki_dir, "alice") as c:
        st = await c.start(["sh", "-c", "echo twelve bytes"])
        await c.wait(st.id)
        assert [x async for x in c.logs(st.id)] == [(0, b"twelve bytes\n")]
        with pytest.raises(JobNotFound):
            await c.status("nope")
    status, text = await get(debug_daemon, "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert 'jobworker_jobs{state="exited"} 1.0' in lines
    assert 'jobworker_jobs{state="running"} 0.0' in lines
    assert 'jobworker_rpcs_total{code="OK",method="Start"} 1.0' in lines
    assert 'jobworker_rpcs_total{code="NOT_FOUND",method="Status"} 1.0' in lines
    assert 'jobworker_rpc_duration_seconds_count{method="Wait"} 1.0' in lines
    assert "jobworker_log_streamed_bytes_total 13.0" in lines
    assert "jobworker_log_streams_active 0.0" in lines


async def test_stacks_show_threads_and_tasks(debug_daemon: Daemon) -> None:
    status, text = await get(debug_daemon, "/debug/stacks")
    assert status == 200
    assert "=== threads" in text and "--- thread MainThread" in text
    assert "=== asyncio tasks" in text and "--- task " in text
    assert "test_stacks_show_threads_and_tasks" in text  # this very test's task


async def test_profile_samples_the_event_loop(debug_daemon: Daemon) -> None:
    status, text = await get(debug_daemon, "/debug/profile?seconds=0.3")
    assert status == 200
    assert "thread samples over 0.3s" in text
    assert "# folded stacks" in text
    assert "MainThread" not in text  # functions, not thread names
    assert "select" in text or "run_forever" in text  # the loop, seen from outside


async def test_one_profile_at_a_time(debug_daemon: Daemon) -> None:
    endpoint = debug_daemon.debug
    assert endpoint is not None and not endpoint.profiling
    first = asyncio.create_task(get(debug_daemon, "/debug/profile?seconds=1"))
    await wait_for(lambda: endpoint.profiling or first.done(), what="the first profile to run")
    assert debug_daemon.debug_socket is not None
    status, text, headers = await asyncio.to_thread(
        request, UnixHTTPConnection(debug_daemon.debug_socket), "/debug/profile?seconds=1"
    )
    assert status == 429, text
    assert text == "a profile is already running; one at a time\n"
    assert headers["Retry-After"] == "1"  # what is left of the first, rounded up
    status, text = await first
    assert status == 200 and "thread samples over 1s" in text
    assert not endpoint.profiling
    # and the next one may run
    assert (await get(debug_daemon, "/debug/profile?seconds=0.05"))[0] == 200


async def test_heap(debug_daemon: Daemon) -> None:
    was_tracing = tracemalloc.is_tracing()
    try:
        status, text = await get(debug_daemon, "/debug/heap")
        assert status == 200
        if not was_tracing:
            assert "now tracing" in text
            status, text = await get(debug_daemon, "/debug/heap?limit=5")
        assert "top 5 sites by size" in text
        assert len([line for line in text.splitlines() if " blocks " in line]) <= 5
        assert (await get(debug_daemon, "/debug/heap?stop=1"))[1] == "tracemalloc stopped\n"
        assert not tracemalloc.is_tracing()
    finally:
        if was_tracing and not tracemalloc.is_tracing():
            tracemalloc.start()


async def test_unknown_path(debug_daemon: Daemon) -> None:
    assert await get(debug_daemon, "/nope") == (404, "not found\n")


# -- no traceback in any answer -------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("/debug/profile?seconds=abc", "seconds must be a number in (0, 120]"),
        ("/debug/profile?seconds=1e309", "seconds must be a number in (0, 120]"),
        ("/debug/profile?seconds=nan", "seconds must be a number in (0, 120]"),
        ("/debug/profile?seconds=0", "seconds must be a number in (0, 120]"),
        ("/debug/profile?seconds=-1", "seconds must be a number in (0, 120]"),
        ("/debug/profile?seconds=1000", "seconds must be a number in (0, 120]"),
        ("/debug/profile?seconds=1&seconds=2", "seconds is given more than once"),
        ("/debug/heap?limit=-1", "limit must be a whole number from 0 to 999999"),
        ("/debug/heap?limit=x", "limit must be a whole number from 0 to 999999"),
        # str.isdigit() accepts a superscript two, int() does not: was a 500 with a traceback
        ("/debug/heap?limit=%C2%B2", "limit must be a whole number from 0 to 999999"),
        ("/debug/heap?limit=%FF", "malformed query string"),
        ("/debug/heap?" + "&".join(f"a{i}=1" for i in range(20)), "malformed query string"),
    ],
)
async def test_malformed_queries_get_a_one_line_400(
    debug_daemon: Daemon, query: str, message: str
) -> None:
    assert await get(debug_daemon, query) == (400, message + "\n")
    assert not tracemalloc.is_tracing() or "heap" not in query


async def test_an_unexpected_error_is_a_generic_500_and_logged(
    debug_daemon: Daemon, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> str:
        raise RuntimeError("secret detail of the failure")

    monkeypatch.setattr(debug_module, "thread_stacks", broken)
    with caplog.at_level(logging.ERROR, logger="jobworker.server.debug"):
        status, text = await get(debug_daemon, "/debug/stacks")
    assert (status, text) == (500, "internal error in the debug endpoint; see the daemon's log\n")
    logged = [r for r in caplog.records if r.name == "jobworker.server.debug"]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert "secret detail of the failure" in caplog.text and "Traceback" in caplog.text


# -- configuration --------------------------------------------------------------------------


def test_a_live_socket_is_not_taken_over(socket_dir: Path) -> None:
    loop = asyncio.new_event_loop()
    first, second = (
        DebugServer(debug_module.Metrics(), loop),
        DebugServer(debug_module.Metrics(), loop),
    )
    path = socket_dir / "debug.sock"
    try:
        first.start_unix(path)
        with pytest.raises(Exception, match="in use by another process"):
            second.start_unix(path)
        assert path.exists()
    finally:
        first.close()
        second.close()
        loop.close()
    assert not path.exists()
    # a stale socket (its server gone) is replaced
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    third = DebugServer(debug_module.Metrics(), loop)
    try:
        third.start_unix(path)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600
    finally:
        third.close()
    assert os.listdir(socket_dir) == []


@pytest.mark.parametrize("address", ["0.0.0.0:6060", "192.0.2.1:6060", "example.com:6060", "::"])
def test_debug_address_must_be_loopback(address: str) -> None:
    with pytest.raises(InvalidArgument, match="debug address"):
        parse_address(address)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:6060", ("127.0.0.1", 6060)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_debug_address_loopback(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


async def test_workerd_serves_both_and_logs_where(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, socket_dir: Path
) -> None:
    """The command line: ``--debug-socket`` and ``--debug-addr`` of a real workerd process."""
    sock = socket_dir / "workerd-debug.sock"
    extra = ("--debug-socket", str(sock), "--debug-addr", "127.0.0.1:0")
    async with harness.start_workerd(tmp_path, pki_dir, cgroup_name, *extra) as w:
        log = w.log.read_text()
        assert f"debug endpoint on unix socket {sock} " in log
        m = re.search(r"debug endpoint on https://127\.0\.0\.1:(\d+)/ \(HTTPS, admin", log)
        assert m, log
        status, text, _ = await asyncio.to_thread(request, UnixHTTPConnection(sock), "/metrics")
        assert status == 200 and "jobworker_jobs" in text
        conn = http.client.HTTPSConnection(
            "127.0.0.1", int(m[1]), context=tls_context(pki_dir, "root"), timeout=30
        )
        status, text, _ = await asyncio.to_thread(request, conn, "/metrics")
        assert status == 200 and "jobworker_jobs" in text
        w.proc.terminate()
        assert await w.proc.wait() == 0, w.log.read_text()
    assert not sock.exists()
