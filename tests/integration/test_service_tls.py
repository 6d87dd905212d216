"""Transport security: each refused client is refused during the TLS handshake, for the reason
we claim (read from the server's own handshake error), and executes nothing. A control in each
test shows the same path succeeds with acceptable credentials, so the refusals cannot be an
artefact of the test."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness
import grpc

# isort: on
import asyncio
import errno
import os
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobworker import JobManager
from jobworker.api.proto import pb, pb_grpc
from jobworker.client.pki import init_pki, issue_client, load_ca, write_pair
from jobworker.errors import HostError
from jobworker.server import service, tls13
from jobworker.server.daemon import Daemon
from jobworker.server.tls13 import CIPHER_SUITES_ENV, TLS12_SUITES, accepts_tls12
from jobworker.tls import Paths, load_server
from tests.conftest import wait_for

pki_dir, daemon = harness.pki_dir, harness.daemon


@pytest.fixture(scope="module")
def bad_certs(tmp_path_factory: pytest.TempPathFactory, pki_dir: Path) -> Path:
    """Certificates the daemon must refuse, next to a copy of the good CA."""
    d = tmp_path_factory.mktemp("bad")
    other = d / "other-ca"
    init_pki(other, [("alice", "user")])  # same name, another CA
    ca_cert, ca_key = load_ca(pki_dir)
    expired = issue_client(
        ca_cert, ca_key, "alice", "user", now=datetime.now(UTC) - timedelta(days=30), days=1
    )
    write_pair(d, "expired", *expired)
    future = issue_client(
        ca_cert, ca_key, "alice", "user", now=datetime.now(UTC) + timedelta(days=30)
    )
    write_pair(d, "future", *future)
    return d


def credentials(pki: Path, bad: Path, case: str) -> tuple[bytes, bytes | None, bytes | None]:
    ca = (pki / "ca.pem").read_bytes()
    pairs = {
        "good": (pki / "alice-key.pem", pki / "alice.pem"),
        "other-ca": (bad / "other-ca/alice-key.pem", bad / "other-ca/alice.pem"),
        "expired": (bad / "expired-key.pem", bad / "expired.pem"),
        "not-yet-valid": (bad / "future-key.pem", bad / "future.pem"),
        "server-cert": (pki / "server-key.pem", pki / "server.pem"),
    }
    if case == "no-cert":
        return ca, None, None
    key, cert = pairs[case]
    return ca, key.read_bytes(), cert.read_bytes()


async def try_start(d: Daemon, ca: bytes, key: bytes | None, cert: bytes | None) -> grpc.StatusCode:
    ch = harness.channel(d.port, ca, key, cert)
    try:
        await pb_grpc.JobWorkerStub(ch).Start(pb.StartRequest(argv=["true"]), timeout=30)
    except grpc.aio.AioRpcError as e:
        return e.code()
    finally:
        await ch.close(None)
    return grpc.StatusCode.OK


async def server_logged(capfd: pytest.CaptureFixture[str], reason: str) -> None:
    """Wait for grpc's handshake failure log line (written by its C core to fd 2)."""
    log = ""

    def logged() -> bool:
        nonlocal log
        log += capfd.readouterr().err
        return "Handshake failed with error SSL_ERROR_SSL: " in log and reason in log

    await wait_for(logged, what=f"the server to log {reason!r}")


REFUSALS = {
    # case: what BoringSSL on the server reports when it aborts the handshake
    "no-cert": "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "other-ca": "CERTIFICATE_VERIFY_FAILED: unable to get local issuer certificate",
    "expired": "CERTIFICATE_VERIFY_FAILED: certificate has expired",
    "not-yet-valid": "CERTIFICATE_VERIFY_FAILED: certificate is not yet valid",
    "server-cert": "CERTIFICATE_VERIFY_FAILED: unsupported certificate purpose",
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_client_certificates(
    daemon: Daemon,
    pki_dir: Path,
    bad_certs: Path,
    case: str,
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert await try_start(daemon, *credentials(pki_dir, bad_certs, "good")) == grpc.StatusCode.OK
    started = len(daemon.manager.list())
    capfd.readouterr()
    code = await try_start(daemon, *credentials(pki_dir, bad_certs, case))
    assert code == grpc.StatusCode.UNAVAILABLE  # the connection never came up
    assert len(daemon.manager.list()) == started  # nothing ran
    await server_logged(capfd, REFUSALS[case])


# -- TLS 1.2 ----------------------------------------------------------------------------------


def handshake(port: int, pki: Path, version: ssl.TLSVersion) -> str:
    """A full handshake with alice's valid certificate, pinned to one TLS version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki / "ca.pem")
    ctx.load_cert_chain(pki / "alice.pem", pki / "alice-key.pem")
    ctx.minimum_version = ctx.maximum_version = version
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        return f"{tls.version()} {tls.cipher()}"


async def test_tls12_client_is_refused(
    daemon: Daemon, pki_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    assert (
        await asyncio.to_thread(handshake, daemon.port, pki_dir, ssl.TLSVersion.TLSv1_3)
    ).startswith("TLSv1.3 ")
    capfd.readouterr()
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(handshake, daemon.port, pki_dir, ssl.TLSVersion.TLSv1_2)
    await server_logged(capfd, "NO_SHARED_CIPHER")
    assert not await asyncio.to_thread(accepts_tls12, "127.0.0.1", daemon.port)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize(("flag", "accepted"), [("-tls1_2", False), ("-tls1_3", True)])
async def test_openssl_s_client(
    daemon: Daemon,
    pki_dir: Path,
    flag: str,
    accepted: bool,
    capfd: pytest.CaptureFixture[str],
) -> None:
    argv = [
        "openssl", "s_client", flag, "-connect", f"127.0.0.1:{daemon.port}",
        "-servername", "localhost", "-alpn", "h2", "-CAfile", str(pki_dir / "ca.pem"),
        "-cert", str(pki_dir / "alice.pem"), "-key", str(pki_dir / "alice-key.pem"),
        "-verify_return_error", "-brief",
    ]  # fmt: skip
    capfd.readouterr()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if accepted:
        assert "Protocol version: TLSv1.3" in text, text
    else:
        assert proc.returncode != 0, text
        assert "Protocol version" not in text, text
        await server_logged(capfd, "NO_SHARED_CIPHER")


CONTROL_SERVER = textwrap.dedent(
    """
    import grpc, sys, time
    from pathlib import Path
    d = Path(sys.argv[1])
    server = grpc.server(__import__("concurrent.futures").futures.ThreadPoolExecutor(1))
    creds = grpc.ssl_server_credentials(
        [((d / "server-key.pem").read_bytes(), (d / "server.pem").read_bytes())],
        root_certificates=(d / "ca.pem").read_bytes(),
        require_client_auth=True,
    )
    print(server.add_secure_port("127.0.0.1:0", creds), flush=True)
    server.start()
    sys.stdin.read()
    """
)


async def test_control_without_the_cipher_restriction_tls12_is_accepted(pki_dir: Path) -> None:
    """The same certificates in a grpc server without GRPC_SSL_CIPHER_SUITES do speak TLS 1.2:
    so the refusal above comes from the restriction, and both probes can see the difference."""
    env = {k: v for k, v in os.environ.items() if k != CIPHER_SUITES_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CONTROL_SERVER, str(pki_dir),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    try:
        port = int(await proc.stdout.readline())
        assert await asyncio.to_thread(accepts_tls12, "127.0.0.1", port)
        version = await asyncio.to_thread(handshake, port, pki_dir, ssl.TLSVersion.TLSv1_2)
        assert version.startswith("TLSv1.2 ")
    finally:
        proc.stdin.close()
        await proc.wait()


START_AFTER_GRPC = textwrap.dedent(
    """
    import asyncio, sys
    import grpc  # too early: grpc reads GRPC_SSL_CIPHER_SUITES on import
    from pathlib import Path
    from jobworker.server.service import JobWorkerService, start_server
    from jobworker.tls import Paths, load_server

    async def main():
        material = load_server(Paths.from_pki(Path(sys.argv[1]), "server"))
        try:
            await start_server(JobWorkerService(None), material, "127.0.0.1:0")
        except Exception as e:
            print(type(e).__name__, e)

    asyncio.run(main())
    """
)


async def test_server_refuses_to_start_when_grpc_was_imported_first(pki_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != CIPHER_SUITES_ENV}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", START_AFTER_GRPC, str(pki_dir),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert out.decode().startswith("HostError grpc was imported before jobworker.tls")


def test_this_process_restricts_tls12_suites() -> None:
    assert os.environ[CIPHER_SUITES_ENV] == TLS12_SUITES


# -- the TLS 1.2 self-probe fails closed and runs before any RPC is served -------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def admin_list(port: int, pki: Path) -> tuple[grpc.StatusCode, str]:
    """A List RPC as the admin: its status code and details."""
    ca = (pki / "ca.pem").read_bytes()
    ch = harness.channel(
        port, ca, (pki / "root-key.pem").read_bytes(), (pki / "root.pem").read_bytes()
    )
    try:
        await pb_grpc.JobWorkerStub(ch).List(pb.ListRequest(all=True), timeout=30)
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    finally:
        await ch.close(None)
    return grpc.StatusCode.OK, ""


async def test_probe_error_refuses_to_serve(
    manager: JobManager, pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OSError during the probe (it could not tell) stops the start, naming the cause; the
    port is released."""

    def broken(host: str, port: int, timeout: float = 5.0) -> bool:
        raise ConnectionResetError(errno.ECONNRESET, "injected reset")

    monkeypatch.setattr(tls13, "accepts_tls12", broken)
    port = free_port()
    servicer = service.JobWorkerService(manager)
    material = load_server(Paths.from_pki(pki_dir, "server"))
    with pytest.raises(HostError, match=r"TLS 1\.2 self-probe .* failed: .*injected reset"):
        await service.start_server(servicer, material, f"127.0.0.1:{port}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again: the server was stopped


async def test_no_rpc_is_served_before_the_probe_passed(
    manager: JobManager, pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    probed: list[int] = []
    real_probe = tls13.accepts_tls12

    def blocking(host: str, port: int, timeout: float = 5.0) -> bool:
        probed.append(port)
        entered.set()
        release.wait(30)
        return real_probe(host, port, timeout)

    monkeypatch.setattr(tls13, "accepts_tls12", blocking)
    servicer = service.JobWorkerService(manager)
    material = load_server(Paths.from_pki(pki_dir, "server"))
    starting = asyncio.create_task(service.start_server(servicer, material, "127.0.0.1:0"))
    try:
        await asyncio.to_thread(entered.wait, 30)
        assert entered.is_set()
        code, details = await admin_list(probed[0], pki_dir)
        assert code is grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "not serving yet" in details
        assert not starting.done()
    finally:
        release.set()
        running = await starting
    try:
        assert await admin_list(running.port, pki_dir) == (grpc.StatusCode.OK, "")
    finally:
        await running.server.stop(None)
