"""An in-process workerd on 127.0.0.1 with real certificates, for service and CLI tests.

Import the fixtures into a test module (``from tests.integration.daemon_harness import ...``)."""

from __future__ import annotations

# isort: off
from jobworker.server import service  # noqa: F401 - first: jobworker.tls must precede grpc
import grpc

# isort: on
import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.client.pki import init_pki
from jobworker.server.daemon import Config, Daemon, serve
from jobworker.tls import Paths
from tests.conftest import cgroup2_usable
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
