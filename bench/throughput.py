"""Throughput of one follower beside two baselines — a Python TLS 1.3 socket pair, and a bare
grpc.aio stream with the same TLS (:mod:`bench._bare_server`: grpc's own ceiling, in messages of
the daemon's read size and of 1 MiB) — and how fast a job can write its log (beside the same
writer writing a file directly).

Beside the rates, the CPU each side spent per GiB (``*_cpu_s_per_gib``: the daemon, the
client — this process —, the job; the bare server and its client): on a machine of few CPUs,
their sum bounds the rate whatever the code does (``throughput_cpu_bound_mib_s``: all CPUs busy
for the whole follow), and the bound against the bare stream is the ratio no scheduling could
beat (``throughput_ratio_cpu_bound_vs_bare_grpc_1m``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import resource
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from bench import _writer
from bench._followers import BareChannel
from bench.common import (
    ROOT,
    USER,
    Settings,
    Workerd,
    expected_output,
    go_file,
    median,
    proc_sample,
)
from jobworker.client import Client
from jobworker.outread import READ_CHUNK

MIB = 1 << 20
GIB = 1 << 30
BIG_CHUNK = MIB
SOCK_BUF = 8 * MIB
TIMEOUT = 600.0


def own_cpu_s() -> float:
    """CPU seconds of this process so far (all its threads: the client and grpc's)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclasses.dataclass(frozen=True)
class Follow:
    """One follow: its rate, and the CPU seconds per GiB each side spent on it."""

    mib_s: float
    daemon_cpu: float
    client_cpu: float
    job_cpu: float


async def follow_once(client: Client, daemon: Workerd, total: int) -> Follow:
    """A follower of a job writing ``total`` bytes, from the go signal to the last byte."""
    size, _ = expected_output(total)
    report = daemon.shared / "report-follow"
    with go_file(daemon.shared, "throughput") as go:
        status = await client.start(daemon.writer("bytes", total, go, report))
        received = 0
        t0 = daemon0 = client0 = 0.0
        async with asyncio.timeout(TIMEOUT):
            async for _, data in client.logs(status.id, follow=True):
                if not received:
                    t0 = time.monotonic()
                    daemon0, client0 = daemon.sample().cpu_s, own_cpu_s()
                    go.touch()
                received += len(data)
        elapsed = time.monotonic() - t0
        daemon_cpu, client_cpu = daemon.sample().cpu_s - daemon0, own_cpu_s() - client0
    daemon.drop_log(status.id)
    if received != size:
        raise SystemExit(f"bench: follower got {received} bytes, the job wrote {size}")
    _, job_cpu = _report(report)
    gib = total / GIB
    return Follow((total / MIB) / elapsed, daemon_cpu / gib, client_cpu / gib, job_cpu / gib)


def tls_contexts(pki: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Mutual TLS 1.3 with the daemon's own certificates."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_3
    server.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    server.load_verify_locations(pki / "ca.pem")
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_3
    client.load_cert_chain(pki / "bench.pem", pki / "bench-key.pem")
    client.load_verify_locations(pki / "ca.pem")
    return server, client


def tls_baseline(pki: Path, total: int) -> tuple[float, str]:
    """MiB/s of ``total`` bytes of the job's pattern over a Python TLS 1.3 socket pair on
    loopback with large buffers (sender in a thread; ssl releases the GIL); and the cipher."""
    server_ctx, client_ctx = tls_contexts(pki)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    doubled = memoryview(_writer.pattern_block())
    plan = _writer.chunks(total)
    go = threading.Event()
    failure: list[BaseException] = []

    def send() -> None:
        try:
            conn, _ = listener.accept()
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCK_BUF)
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                go.wait(TIMEOUT)
                for rotation, length in plan:
                    tls.sendall(doubled[rotation : rotation + length])
        except BaseException as e:  # reported by the receiving side
            failure.append(e)

    sender = threading.Thread(target=send, name="tls-baseline-sender")
    sender.start()
    try:
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCK_BUF)
        with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            cipher = (tls.cipher() or ("?",))[0]
            buf = bytearray(MIB)
            received = 0
            t0 = time.monotonic()
            go.set()
            while received < total:
                n = tls.recv_into(buf)
                if not n:
                    break
                received += n
            elapsed = time.monotonic() - t0
    finally:
        go.set()
        sender.join(TIMEOUT)
        listener.close()
    if failure:
        raise failure[0]
    if received != total:
        raise SystemExit(f"bench: TLS baseline got {received} of {total} bytes")
    return (total / MIB) / elapsed, cipher


@contextlib.asynccontextmanager
async def bare_server(pki: Path) -> AsyncIterator[tuple[BareChannel, int]]:
    """:mod:`bench._bare_server` in a process of its own, a channel to it, and its pid."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench._bare_server", str(pki)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        port = int(await asyncio.to_thread(proc.stdout.readline))
        bare = BareChannel(f"127.0.0.1:{port}", pki, USER)
        try:
            yield bare, proc.pid
        finally:
            await bare.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def bare_stream(
    bare: BareChannel, server_pid: int, total: int, chunk: int, cold: bool = False
) -> tuple[float, float, float]:
    """MiB/s of ``total`` bytes in ``chunk``-byte messages from the bare grpc.aio server, and
    the CPU seconds per GiB it and this client spent. ``cold``: distinct messages, not the
    same one over and over (see :mod:`bench._bare_server`)."""
    received = 0
    server0, client0 = proc_sample(server_pid).cpu_s, own_cpu_s()
    t0 = time.monotonic()
    async with asyncio.timeout(TIMEOUT):
        async for data in bare.stream(f"{total}:{chunk}" + (":cold" if cold else "")):
            received += len(data)
    elapsed = time.monotonic() - t0
    server, client = proc_sample(server_pid).cpu_s - server0, own_cpu_s() - client0
    if received != total:
        raise SystemExit(f"bench: bare grpc stream got {received} of {total} bytes")
    gib = total / GIB
    return (total / MIB) / elapsed, server / gib, client / gib


def _report(path: Path) -> tuple[float, float]:
    """The writer's report: the seconds its writes took, wall and CPU."""
    wall_ns, cpu_ns = path.read_text().split()
    path.unlink()
    return int(wall_ns) / 1e9, int(cpu_ns) / 1e9


async def write_to_log(client: Client, daemon: Workerd, total: int) -> float:
    """MiB/s the job itself measured writing ``total`` bytes to its stdout (the log pipe)."""
    report = daemon.shared / "report-log"
    status = await client.start(daemon.writer("bytes", total, "-", report))
    async with asyncio.timeout(TIMEOUT):
        await client.wait(status.id)
    daemon.drop_log(status.id)
    return (total / MIB) / _report(report)[0]


def write_to_file(daemon: Workerd, total: int) -> float:
    """MiB/s of the same writer with its stdout a regular file (same filesystem)."""
    report = daemon.shared / "report-file"
    target = daemon.workdir / "direct-output"
    try:
        with target.open("wb") as out:
            subprocess.run(
                daemon.writer("bytes", total, "-", report),
                stdout=out,
                stdin=subprocess.DEVNULL,
                check=True,
                timeout=TIMEOUT,
            )
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
    return (total / MIB) / _report(report)[0]


async def run(
    settings: Settings, daemon: Workerd, log: Callable[[str], None]
) -> dict[str, float | str]:
    total = settings.throughput_bytes
    follows: list[Follow] = []
    tls: list[float] = []
    to_log: list[float] = []
    to_file: list[float] = []
    bare_small: list[float] = []
    bare_big: list[float] = []
    bare_cold: list[float] = []
    bare_cpu: dict[str, list[float]] = {
        "small": [],
        "big": [],
        "server": [],
        "client": [],
        "cold": [],
    }
    cipher = ""
    async with daemon.client() as client, bare_server(daemon.pki) as (bare, bare_pid):
        for rep in range(settings.heavy_reps):
            follows.append(await follow_once(client, daemon, total))
            rate, cipher = await asyncio.to_thread(tls_baseline, daemon.pki, total)
            tls.append(rate)
            rate, server, client_cpu = await bare_stream(bare, bare_pid, total, READ_CHUNK)
            bare_small.append(rate)
            bare_cpu["small"].append(server + client_cpu)
            rate, server, client_cpu = await bare_stream(bare, bare_pid, total, BIG_CHUNK)
            bare_big.append(rate)
            bare_cpu["big"].append(server + client_cpu)
            bare_cpu["server"].append(server)
            bare_cpu["client"].append(client_cpu)
            rate, server, client_cpu = await bare_stream(bare, bare_pid, total, BIG_CHUNK, True)
            bare_cold.append(rate)
            bare_cpu["cold"].append(server + client_cpu)
            to_log.append(await write_to_log(client, daemon, total))
            to_file.append(await asyncio.to_thread(write_to_file, daemon, total))
            f = follows[-1]
            log(
                f"throughput rep {rep + 1}: follower {f.mib_s:.0f} MiB/s (CPU s/GiB: daemon "
                f"{f.daemon_cpu:.2f}, client {f.client_cpu:.2f}, job {f.job_cpu:.2f}), "
                f"TLS {tls[-1]:.0f} MiB/s, bare grpc {bare_small[-1]:.0f} MiB/s "
                f"({READ_CHUNK // 1024} KiB messages, {bare_cpu['small'][-1]:.2f} CPU s/GiB) "
                f"{bare_big[-1]:.0f} MiB/s (1 MiB, {bare_cpu['big'][-1]:.2f}), "
                f"{bare_cold[-1]:.0f} MiB/s (1 MiB distinct, {bare_cpu['cold'][-1]:.2f}); "
                f"job writes log {to_log[-1]:.0f} MiB/s, "
                f"file {to_file[-1]:.0f} MiB/s"
            )
    follow = [f.mib_s for f in follows]
    cpus = os.cpu_count() or 1
    # All CPUs busy for the whole follow: the most a follow could do at what it spends.
    bound = [cpus * 1024 / (f.daemon_cpu + f.client_cpu + f.job_cpu) for f in follows]
    out: dict[str, float | str] = {
        "throughput_bytes": float(total),
        "throughput_mib_s": median(follow),
        "tls_baseline_mib_s": median(tls),
        "tls_baseline_cipher": cipher,
        "throughput_ratio_vs_tls": median([f / t for f, t in zip(follow, tls, strict=True)]),
        "grpc_bare_64k_mib_s": median(bare_small),
        "grpc_bare_1m_mib_s": median(bare_big),
        "throughput_ratio_vs_bare_grpc": median(
            [f / b for f, b in zip(follow, bare_small, strict=True)]
        ),
        "job_write_log_mib_s": median(to_log),
        "job_write_file_mib_s": median(to_file),
        "job_write_ratio_vs_file": median([a / b for a, b in zip(to_log, to_file, strict=True)]),
        "throughput_daemon_cpu_s_per_gib": median([f.daemon_cpu for f in follows]),
        "throughput_client_cpu_s_per_gib": median([f.client_cpu for f in follows]),
        "throughput_job_cpu_s_per_gib": median([f.job_cpu for f in follows]),
        "grpc_bare_64k_cpu_s_per_gib": median(bare_cpu["small"]),
        "grpc_bare_1m_cpu_s_per_gib": median(bare_cpu["big"]),
        "grpc_bare_1m_cold_mib_s": median(bare_cold),
        "grpc_bare_1m_cold_cpu_s_per_gib": median(bare_cpu["cold"]),
        "grpc_bare_1m_server_cpu_s_per_gib": median(bare_cpu["server"]),
        "grpc_bare_1m_client_cpu_s_per_gib": median(bare_cpu["client"]),
        "throughput_cpu_bound_mib_s": median(bound),
        "throughput_ratio_cpu_bound_vs_bare_grpc_1m": median(
            [b / g for b, g in zip(bound, bare_big, strict=True)]
        ),
    }
    return out
