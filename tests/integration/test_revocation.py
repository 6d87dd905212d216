"""Revocation, renewal and reload through a real daemon.

Each test works on its own copy of the test PKI (revoking in the shared one would lock the
other tests out). A revoked certificate still verifies in TLS: the refusal must come from the
service, on every call, also on a connection opened before the revocation and on a TLS session
resumed from a ticket issued before it.

grpc's Python client does not resume TLS 1.3 sessions (its session cache stays unused: measured,
``ssl_session_reused`` is false on every channel), so the resumed session is Python's ``ssl``
with ``session=`` and one hand-framed HTTP/2 gRPC request; the daemon's own record of the call
(the auth context's ``ssl_session_reused``, the outcome) says it was resumed and refused.
"""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import asyncio
import os
import shutil
import signal
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from jobworker.api.proto import pb
from jobworker.client import Client
from jobworker.client.pki import init_pki, renew, revoke
from jobworker.errors import InvalidArgument, PermissionDenied, Unauthenticated
from jobworker.server.daemon import Daemon, serve
from tests.conftest import cgroup2_usable, wait_for

pki_dir = harness.pki_dir


@pytest.fixture
def pki(tmp_path: Path, pki_dir: Path) -> Path:
    """A private copy of the test PKI (0700, as `certs` wants it)."""
    copy = tmp_path / "pki"
    shutil.copytree(pki_dir, copy)
    os.chmod(copy, 0o700)
    return copy


Serve = Callable[..., Any]


@pytest.fixture
async def start(tmp_path: Path, pki: Path, cgroup_name: str) -> AsyncIterator[Serve]:
    """``await start(**config)`` -> a daemon on the private PKI; closed at the end, leaving no
    cgroup, task or thread."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    tasks_before = harness.other_tasks()
    daemons: list[Daemon] = []

    async def make(**kwargs: object) -> Daemon:
        d = await serve(harness.make_config(tmp_path / "state", pki, cgroup_name, **kwargs))
        daemons.append(d)
        return d

    yield make
    for d in daemons:
        parent = d.manager.cgroup_parent
        await d.close()
        assert not parent.exists(), f"cgroup {parent} left behind"
    assert harness.other_tasks() <= tasks_before
    assert not harness.new_threads(threads_before)


@pytest.fixture
async def clients(start: Serve) -> AsyncIterator[list[Client]]:
    made: list[Client] = []
    yield made
    for c in made:
        await c.close()


def connect(made: list[Client], d: Daemon, pki: Path, user: str) -> Client:
    c = Client.from_pki(f"127.0.0.1:{d.port}", pki, user)
    made.append(c)
    return c


def record_calls(d: Daemon) -> list[tuple[bytes, str]]:
    """What the daemon saw of each call: the auth context's ``ssl_session_reused`` (``b"true"``
    on a resumed TLS session) and the outcome of authentication (``"ok"`` or the error)."""
    servicer: Any = d._servicer
    seen: list[tuple[bytes, str]] = []
    identity = servicer._identity

    def spy(context: Any) -> Any:
        reused = b"".join(context.auth_context().get("ssl_session_reused", [b"?"]))
        try:
            result = identity(context)
        except Exception as e:
            seen.append((reused, str(e)))
            raise
        seen.append((reused, "ok"))
        return result

    servicer._identity = spy
    return seen


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload
    )


def _literal(name: str, value: str) -> bytes:
    """HPACK: a literal header field without indexing, new name, no Huffman coding."""
    out = b"\x00"
    for text in (name.encode(), value.encode()):
        assert len(text) < 127
        out += bytes([len(text)]) + text
    return out


def grpc_list_on(tls: ssl.SSLSocket) -> bool:
    """One List call framed by hand over an established TLS connection; whether a response
    message came back (a refused call gets only trailers)."""
    headers = b"".join(
        _literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "https"),
            (":path", "/jobworker.v1.JobWorker/List"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    body = pb.ListRequest().SerializeToString()
    tls.sendall(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(4, 0, 0, b"")  # SETTINGS
        + _frame(1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + _frame(0, 0x1, 1, b"\x00" + len(body).to_bytes(4, "big") + body)  # DATA, END_STREAM
    )
    buf, got_message = b"", False
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            data = tls.recv(65536)
            assert data, "the daemon closed the connection before the call ended"
            buf += data
        size = int.from_bytes(buf[:3], "big")
        kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
        buf = buf[9 + size :]
        if kind == 4 and not flags & 0x1:
            tls.sendall(_frame(4, 0x1, 0, b""))  # SETTINGS ACK
        if stream == 1 and kind == 0 and size:
            got_message = True
        if stream == 1 and kind in (0, 1) and flags & 0x1:
            return got_message


def tls_context(pki: Path, user: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    ctx.load_cert_chain(pki / f"{user}.pem", pki / f"{user}-key.pem")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    return ctx


def call_list(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[bool, bool, ssl.SSLSession | None]:
    """A new connection (resuming ``session`` if given) and one List on it: ``(resumed,
    answered with a message, the session to resume next)``."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost", session=session) as tls,
    ):
        answered = grpc_list_on(tls)
        return bool(tls.session_reused), answered, tls.session


def server_serial(port: int, pki: Path, user: str = "alice") -> int:
    """The serial of the certificate a new TLS 1.3 handshake gets (client certificate shown)."""
    ctx = tls_context(pki, user)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


async def test_revoked_refused_on_open_new_and_resumed_connections(
    start: Serve, clients: list[Client], pki: Path
) -> None:
    d = await start()
    seen = record_calls(d)
    alice, bob = connect(clients, d, pki, "alice"), connect(clients, d, pki, "bob")
    assert await alice.list() == [] and await bob.list() == []
    ctx = tls_context(pki, "alice")
    resumed, answered, ticket = await asyncio.to_thread(call_list, d.port, ctx, None)
    assert (resumed, answered) == (False, True), "full handshake, call answered"
    resumed, answered, _ = await asyncio.to_thread(call_list, d.port, ctx, ticket)
    assert (resumed, answered) == (True, True), "the control: resumed and answered"
    assert seen[-1] == (b"true", "ok")

    done = revoke(pki, "alice")
    assert done.serial == serial_of(pki / "alice.pem")
    assert await alice.list() == [], "revoked but not reloaded: still accepted"
    d.reload()

    with pytest.raises(Unauthenticated, match="certificate revoked"):
        await alice.list()  # the same Client: its connection handshook before the revocation
    resumed, answered, _ = await asyncio.to_thread(call_list, d.port, ctx, ticket)
    assert (resumed, answered) == (True, False), "resumed from the old ticket, and refused"
    reused, outcome = seen[-1]
    assert reused == b"true" and outcome.startswith("certificate revoked"), seen[-1]
    with pytest.raises(Unauthenticated, match="certificate revoked"):
        await connect(clients, d, pki, "alice").list()  # a brand-new connection
    assert await bob.list() == [], "bob is not revoked: his open connection still works"
    assert await connect(clients, d, pki, "bob").list() == []

    revoke(pki, "bob")
    d.reload()
    with pytest.raises(Unauthenticated, match="certificate revoked"):
        await bob.list()
    with pytest.raises(Unauthenticated, match="certificate revoked"):
        await alice.list()  # alice's revocation was kept


async def test_bad_crl_changes_nothing(
    start: Serve, clients: list[Client], pki: Path, tmp_path: Path
) -> None:
    d = await start()
    alice = connect(clients, d, pki, "alice")
    other = tmp_path / "other"
    init_pki(other, [("alice", "user")])
    revoke(other, "alice")  # signed by another CA
    shutil.copy(other / "crl.pem", pki / "crl.pem")
    with pytest.raises(InvalidArgument, match="not signed by the daemon's CA"):
        d.reload()
    assert await alice.list() == []
    (pki / "crl.pem").write_text("garbage\n")
    with pytest.raises(InvalidArgument, match="is not a CRL"):
        d.reload()
    assert await alice.list() == []


async def test_explicit_crl_applies_at_start(
    start: Serve, clients: list[Client], pki: Path, tmp_path: Path
) -> None:
    revoke(pki, "alice")
    crl = tmp_path / "elsewhere.pem"
    (pki / "crl.pem").rename(crl)
    d = await start(crl=crl)
    with pytest.raises(Unauthenticated, match="certificate revoked"):
        await connect(clients, d, pki, "alice").list()
    assert await connect(clients, d, pki, "bob").list() == []


async def test_reload_applies_a_policy_role_change(
    start: Serve, clients: list[Client], pki: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text("[roles]\n")
    d = await start(policy_file=policy)
    alice = connect(clients, d, pki, "alice")
    job = await alice.start(["true"])
    await alice.wait(job.id)
    policy.write_text('[roles]\nalice = "viewer"\n')
    await alice.wait(job.id)  # a cached identity ...
    d.reload()
    with pytest.raises(PermissionDenied, match="role viewer"):
        await alice.start(["true"])  # ... does not outlive the reload
    policy.write_text("[roles\n")
    with pytest.raises(InvalidArgument, match="policy file"):
        d.reload()
    with pytest.raises(PermissionDenied, match="role viewer"):
        await alice.start(["true"])  # a bad policy leaves the last good one


async def test_reload_serves_a_renewed_server_certificate(
    start: Serve, clients: list[Client], pki: Path
) -> None:
    d = await start()
    alice = connect(clients, d, pki, "alice")
    assert await alice.list() == []
    old = serial_of(pki / "server.pem")
    assert await asyncio.to_thread(server_serial, d.port, pki) == old
    renew(pki, "server")
    new = serial_of(pki / "server.pem")
    assert new != old
    assert await asyncio.to_thread(server_serial, d.port, pki) == old, "not before the reload"
    d.reload()
    assert await asyncio.to_thread(server_serial, d.port, pki) == new
    assert await alice.list() == [], "the connection made before the reload goes on"
    assert await connect(clients, d, pki, "bob").list() == []


async def test_renewed_certificate_keeps_role_and_is_accepted(
    start: Serve, clients: list[Client], pki: Path
) -> None:
    d = await start()
    old = serial_of(pki / "vera.pem")
    renew(pki, "vera")
    assert serial_of(pki / "vera.pem") != old
    vera = connect(clients, d, pki, "vera")
    assert await vera.list() == []  # accepted without a reload: same CA
    with pytest.raises(PermissionDenied, match="role viewer"):
        await vera.start(["true"])


async def test_sighup_to_workerd_revokes_and_keeps_jobs_and_followers(
    tmp_path: Path, pki: Path, cgroup_name: str
) -> None:
    async with harness.start_workerd(tmp_path, pki, cgroup_name) as w:
        alice = Client.from_pki(w.address, pki, "alice")
        bob = Client.from_pki(w.address, pki, "bob")
        try:
            assert await alice.list() == []
            job = await bob.start(["sh", "-c", "echo up; exec sleep 60"])
            chunks: list[bytes] = []
            up = asyncio.Event()

            async def follow() -> None:
                async for _, data in bob.logs(job.id, follow=True):
                    chunks.append(data)
                    up.set()

            follower = asyncio.create_task(follow())
            await asyncio.wait_for(up.wait(), 10)
            revoke(pki, "alice")
            os.kill(w.proc.pid, signal.SIGHUP)
            await wait_for(lambda: "reloaded:" in w.log.read_text(), what="the reload")
            with pytest.raises(Unauthenticated, match="certificate revoked"):
                await alice.list()
            assert (await bob.status(job.id)).state.value == "running"
            assert not follower.done()
            await bob.stop(job.id, grace=0)
            await asyncio.wait_for(follower, 10)
            assert b"".join(chunks) == b"up\n"
            assert w.proc.returncode is None
            w.proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(w.proc.wait(), 30) == 0
        finally:
            await alice.close()
            await bob.close()


async def test_the_debug_endpoint_follows_revocation_and_policy_reloads(
    start: Serve, pki: Path, tmp_path: Path
) -> None:
    import http.client

    policy = tmp_path / "policy.toml"
    policy.write_text('[roles]\nroot = "admin"\n')
    d = await start(debug_address="127.0.0.1:0", policy_file=policy)
    assert d.debug_port is not None

    def get_metrics(user: str) -> tuple[int, str]:
        ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
        ctx.load_cert_chain(pki / f"{user}.pem", pki / f"{user}-key.pem")
        conn = http.client.HTTPSConnection("127.0.0.1", d.debug_port, context=ctx, timeout=30)
        try:
            conn.request("GET", "/metrics")
            r = conn.getresponse()
            return r.status, r.read().decode()
        finally:
            conn.close()

    assert (await asyncio.to_thread(get_metrics, "root"))[0] == 200
    assert (await asyncio.to_thread(get_metrics, "alice"))[0] == 403
    policy.write_text('[roles]\nroot = "admin"\nalice = "admin"\n')
    d.reload()
    assert (await asyncio.to_thread(get_metrics, "alice"))[0] == 200, "policy reload ignored"
    revoke(pki, "root")
    d.reload()
    status, text = await asyncio.to_thread(get_metrics, "root")
    assert status == 403 and "certificate revoked" in text, (status, text)
    assert "jobworker_jobs" not in text
    assert (await asyncio.to_thread(get_metrics, "alice"))[0] == 200
