"""The fleet tier: a real etcd (Debian's etcd-server) on loopback ports with a temporary data
directory, and real ``workerd`` processes registered in it, each with its own state dir,
cgroup name, port, labels and a server certificate naming it.

Without etcd the tests skip, and with JW_REQUIRE_TIERS=1 (CI) the run fails: the tier's probe
says why."""

from __future__ import annotations

# isort: off
from jobworker.server import tls13  # noqa: F401 - before grpc (see jobworker.server.tls13)

# isort: on
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobworker import JobManager
from jobworker.api.etcd import EtcdTls, EtcdUnavailable, Store
from jobworker.api.fleet import Endpoints
from jobworker.client.pki import init_pki, issue_server, load_ca, write_pair
from tests.conftest import TIER_PROBES, cgroup2_usable, wait_for

TTL = 3
"""The hosts' lease TTL in these tests (etcd's minimum is about 2 s)."""
HOSTS = {"host-a": "zone=a,gpu", "host-b": "zone=b", "host-c": "zone=b,gpu"}
USERS = [("root", "admin"), ("alice", "user"), ("bob", "user")]


def etcd_binary() -> str | None:
    return shutil.which("etcd")


def why_not_fleet() -> str | None:
    if etcd_binary() is None:
        return "no etcd binary (apt-get install etcd-server)"
    return cgroup2_usable()


TIER_PROBES["fleet"] = why_not_fleet  # JW_REQUIRE_TIERS=1 fails a run where this says no


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Etcd:
    """One etcd member on loopback; :meth:`stop` and :meth:`start` again (``wipe`` starts it
    on an empty data directory: everything registered is gone)."""

    def __init__(self, base: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (ca, cert, key): serve clients over TLS and ask them for a certificate from
        that CA (``--client-cert-auth``)."""
        self.base = base
        self.tls = tls
        self.client_port, self.peer_port = free_port(), free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.client_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "etcd.log"

    @property
    def data(self) -> Path:
        return self.base / "data"

    async def start(self, *, wipe: bool = False) -> None:
        if wipe:
            shutil.rmtree(self.data, ignore_errors=True)
        peer = f"http://127.0.0.1:{self.peer_port}"
        binary = etcd_binary()
        assert binary is not None
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary, "--name", "test", "--data-dir", str(self.data),
                    "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"test={peer}",
                    *self.tls_flags(),
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        async with Store(Endpoints.parse(self.url), self.client_tls(), timeout=1.0) as store:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                try:
                    await store.get("/probe")
                    return
                except EtcdUnavailable:
                    assert self.proc.poll() is None, self.log.read_text()[-2000:]
                    if loop.time() > deadline:
                        pytest.fail("etcd did not answer within 30 s")
                    await asyncio.sleep(0.05)

    def tls_flags(self) -> list[str]:
        if self.tls is None:
            return []
        ca, cert, key = self.tls
        return [
            "--trusted-ca-file", str(ca), "--cert-file", str(cert), "--key-file", str(key),
            "--client-cert-auth",
        ]  # fmt: skip

    def client_tls(self) -> EtcdTls | None:
        """What a client gives etcd: the CA, and alice's client certificate (any from the CA
        will do)."""
        if self.tls is None:
            return None
        ca, cert, _ = self.tls
        return EtcdTls(
            ca, cert.parent.parent.parent / "alice.pem", cert.parent.parent.parent / "alice-key.pem"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[Etcd]:
    if reason := why_not_fleet():
        pytest.skip(reason)
    server = Etcd(tmp_path / "etcd")
    server.base.mkdir()
    try:
        await server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
async def tls_etcd(tmp_path: Path, fleet_pki: Path) -> AsyncIterator[Etcd]:
    """An etcd with client TLS and --client-cert-auth, certificate from the fleet's CA (its
    hosts/etcd/ directory)."""
    if reason := why_not_fleet():
        pytest.skip(reason)
    d = fleet_pki / "hosts" / "etcd"
    server = Etcd(tmp_path / "etcd-tls", (d / "ca.pem", d / "server.pem", d / "server-key.pem"))
    server.base.mkdir()
    try:
        await server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, users, and for each test host ``hosts/NAME/`` with ca.pem and a server
    certificate naming NAME (and 127.0.0.1, where the hosts listen)."""
    directory = tmp_path_factory.mktemp("fleet-pki")
    init_pki(directory, USERS)
    ca_cert, ca_key = load_ca(directory)
    for name in [*HOSTS, "etcd"]:
        out = directory / "hosts" / name
        out.mkdir(parents=True)
        write_pair(out, "server", *issue_server(ca_cert, ca_key, [name]))
        (out / "ca.pem").write_bytes((directory / "ca.pem").read_bytes())
    return directory


@dataclass
class Host:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    state: Path
    cgroup: str
    port: int = 0
    extra: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


class Fleet:
    """Starts workerd hosts registered in ``etcd``; :meth:`close` ends and cleans them."""

    def __init__(self, base: Path, pki: Path, etcd: Etcd) -> None:
        self.base, self.pki, self.etcd = base, pki, etcd
        self.hosts: dict[str, Host] = {}

    async def start(
        self,
        name: str,
        labels: str,
        *extra: str,
        cert_of: str | None = None,
        wait: bool = True,
        etcd_url: str | None = None,
    ) -> Host:
        cgroup = f"jobworker-fleet-{uuid.uuid4().hex[:10]}"
        state = self.base / f"state-{name}-{uuid.uuid4().hex[:6]}"
        log = self.base / f"{name}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jobworker.server.daemon",
                "--pki", str(self.pki / "hosts" / (cert_of or name)),
                "--listen", "127.0.0.1:0", "--state-dir", str(state), "--cgroup-name", cgroup,
                "--stop-grace", "1", "--job-user", "root",
                "--fleet", etcd_url or self.etcd.url, "--name", name, "--advertise", "127.0.0.1:0",
                "--label", labels, "--fleet-ttl", str(TTL), *extra,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
        host = Host(name, proc, log, state, cgroup, extra=list(extra))
        self.hosts[f"{name}-{id(host)}"] = host
        if wait:
            await self.wait_registered(host)
        return host

    async def wait_registered(self, host: Host, after: int = 0) -> None:
        """Until the host's log says it registered (the ``after``-th time)."""

        def registered() -> bool:
            text = host.log.read_text()
            if m := re.search(r"listening on \S+ \(port (\d+)\)", text):
                host.port = int(m.group(1))
            assert host.proc.returncode is None, text
            return len(re.findall(r"fleet: registered ", text)) > after

        await wait_for(registered, timeout=30, what=f"{host.name} to register")

    async def close(self) -> None:
        for host in self.hosts.values():
            if host.proc.returncode is None:
                host.proc.send_signal(signal.SIGTERM)
        for host in self.hosts.values():
            try:
                await asyncio.wait_for(host.proc.wait(), 20)
            except TimeoutError:
                host.kill()
                await host.proc.wait()
            # A killed daemon leaves its jobs: a manager on its state recovers (kills) them and
            # removes the group.
            mgr = await JobManager.open(host.state, cgroup_name=host.cgroup)
            parent = mgr.cgroup_parent
            await mgr.close()
            assert not parent.exists()
            shutil.rmtree(host.state, ignore_errors=True)


@pytest.fixture
async def fleet(tmp_path: Path, fleet_pki: Path, etcd: Etcd) -> AsyncIterator[Fleet]:
    """The etcd and no host yet; :meth:`Fleet.start` adds them."""
    f = Fleet(tmp_path, fleet_pki, etcd)
    try:
        yield f
    finally:
        await f.close()


@pytest.fixture
async def three(fleet: Fleet) -> dict[str, Host]:
    """host-a (zone=a,gpu), host-b (zone=b) and host-c (zone=b,gpu), capacity 20 each."""
    started = await asyncio.gather(
        *(fleet.start(n, labels, "--capacity", "20") for n, labels in HOSTS.items())
    )
    return {h.name: h for h in started}


class Proxy:
    """A TCP relay to etcd on a port of its own: :meth:`cut` drops every connection through it
    and refuses new ones (a partition between one host and etcd), :meth:`heal` lets them in."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.cut_off = False
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            t = asyncio.get_running_loop().create_task(task)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)

    def cut(self) -> None:
        self.cut_off = True
        for w in self.writers:
            w.close()
        self.writers.clear()

    def heal(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Result:
    code: int
    out: str
    err: str


async def worker(
    fleet: Fleet, *args: str, user: str = "alice", timeout: float = 60, fleet_url: bool = True
) -> Result:
    """Run the real ``worker`` CLI against the fleet."""
    env = {
        **os.environ,
        "WORKER_PKI": str(fleet.pki),
        "WORKER_USER": user,
        **({"WORKER_FLEET": fleet.etcd.url} if fleet_url else {}),
    }
    env.pop("WORKER_ADDR", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobworker", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def worker_argv(fleet: Fleet, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "WORKER_PKI": str(fleet.pki), "WORKER_USER": "alice"}
    env["WORKER_FLEET"] = fleet.etcd.url
    return [sys.executable, "-m", "jobworker", *args], env


@contextlib.asynccontextmanager
async def store_of(etcd: Etcd) -> AsyncIterator[Store]:
    async with Store(Endpoints.parse(etcd.url), timeout=2.0) as store:
        yield store


__all__: Sequence[str] = [
    "HOSTS", "TTL", "Etcd", "Fleet", "Host", "Proxy", "Result", "store_of", "worker",
]  # fmt: skip
