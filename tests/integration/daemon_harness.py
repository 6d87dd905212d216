"""An in-process workerd on 127.0.0.1 with real certificates, for service and CLI tests.

Import the fixtures into a test module (``from tests.integration.daemon_harness import ...``)."""

from __future__ import annotations

# isort: off
from jobworker.server import service  # noqa: F401 - first: jobworker.tls must precede grpc
import grpc

# isort: on
import asyncio
import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker import JobManager
from jobworker.client import Client
from jobworker.client.issuing import _issue
from jobworker.client.pki import init_pki, load_ca, write_pair
from jobworker.server.daemon import Config, Daemon, serve
from jobworker.tls import Paths
from tests.conftest import cgroup2_usable, wait_for
from tests.conftest import new_threads as new_threads  # noqa: PLC0414 - re-exported for tests

USERS = [("root", "admin"), ("alice", "user"), ("bob", "user"), ("vera", "viewer")]
"""Two users so one can own jobs the other must not see."""


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, USERS)
    return directory


def make_config(state_dir: Path, pki: Path, cgroup_name: str, **kwargs: object) -> Config:
    return Config(
        tls=Paths.from_pki(pki, "server"),
        listen="127.0.0.1:0",
        state_dir=state_dir,
        cgroup_name=cgroup_name,
        stop_grace=1.0,
        # Tests' jobs read and write files under pytest's 0700 tmp dirs: run them as root,
        # granted explicitly. Least privilege has tests of its own.
        **{"job_account": "root", **kwargs},  # type: ignore[arg-type]
    )


def forged_cert(pki: Path, out: Path, common_name: str, unit: str) -> tuple[Path, Path]:
    """A clientAuth certificate from the test CA with any common name (``certs init`` refuses
    reserved and odd names; another CA might not): ``(cert, key)`` in ``out``."""
    ca_cert, ca_key = load_ca(pki)
    out.mkdir(exist_ok=True)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = datetime.now(UTC) - timedelta(minutes=5)
    pair = write_pair(
        out,
        "forged",
        *_issue(ca_cert, ca_key, subject, ExtendedKeyUsageOID.CLIENT_AUTH, now=now, days=1),
    )
    return pair.cert, pair.key


def other_tasks() -> set[asyncio.Task[object]]:
    """Tasks of the running loop other than the caller's."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.fixture
async def daemon(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Daemon]:
    """A running daemon; at the end it is closed and must leave no cgroup, task or thread."""
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    tasks_before = other_tasks()
    d = await serve(make_config(tmp_path / "state", pki_dir, cgroup_name))
    parent = d.manager.cgroup_parent
    try:
        yield d
    finally:
        await d.close()
    assert not parent.exists(), f"cgroup {parent} left behind"
    assert other_tasks() <= tasks_before
    assert not new_threads(threads_before)


Connect = Callable[[str], Client]


@pytest.fixture
async def connect(daemon: Daemon, pki_dir: Path) -> AsyncIterator[Connect]:
    """``connect("alice")`` -> a client with alice's certificate, closed at the end."""
    clients: list[Client] = []

    def make(user: str) -> Client:
        client = Client.from_pki(f"127.0.0.1:{daemon.port}", pki_dir, user)
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


def channel(port: int, ca: bytes, key: bytes | None, cert: bytes | None) -> grpc.aio.Channel:
    """A raw channel with arbitrary (possibly wrong) client credentials."""
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


class Workerd:
    def __init__(self, proc: asyncio.subprocess.Process, log: Path, port: int) -> None:
        self.proc, self.log, self.port = proc, log, port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def start_workerd(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, *extra: str
) -> AsyncIterator[Workerd]:
    """A real ``workerd`` process, once it serves; killed (if still running) at the end, and
    whatever it left recovered and removed."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    log = tmp_path / "workerd.log"
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "jobworker.server.daemon",
            "--pki", str(pki_dir), "--listen", "127.0.0.1:0",
            "--state-dir", str(tmp_path / "state"), "--cgroup-name", cgroup_name,
            "--stop-grace", "1", "--job-user", "root", *extra,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    port: list[int] = []

    def listening() -> bool:
        m = re.search(r"listening on \S+ \(port (\d+)\)", log.read_text())
        if m:
            port.append(int(m.group(1)))
        assert proc.returncode is None, log.read_text()
        return bool(m)

    try:
        await wait_for(listening, timeout=30, what="workerd to listen")
        yield Workerd(proc, log, port[0])
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        # Whatever the test did to the process, leave no job and no cgroup behind: a manager on
        # the same state and group recovers (kills) what a killed daemon left, then removes it.
        mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name)
        parent = mgr.cgroup_parent
        await mgr.close()
        assert not parent.exists()
