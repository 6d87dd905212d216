"""Throughput of one follower beside two baselines — a Python TLS 1.3 socket pair, and a bare
grpc.aio stream with the same TLS (:mod:`bench._bare_server`: grpc's own ceiling, in messages of
the daemon's read size and of 1 MiB) — and how fast a job can write its log (beside the same
writer writing a file directly)."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
from bench.common import ROOT, USER, Settings, Workerd, expected_output, go_file, median
from jobworker.client import Client
from jobworker.outread import READ_CHUNK

MIB = 1 << 20
BIG_CHUNK = MIB
SOCK_BUF = 8 * MIB
TIMEOUT = 600.0


async def follow_once(client: Client, daemon: Workerd, total: int) -> float:
    """MiB/s from the go signal to the last byte of a job writing ``total`` bytes."""
    size, _ = expected_output(total)
    with go_file(daemon.shared, "throughput") as go:
        status = await client.start(daemon.writer("bytes", total, go, "-"))
        received = 0
        t0 = 0.0
        async with asyncio.timeout(TIMEOUT):
            async for _, data in client.logs(status.id, follow=True):
                if not received:
                    t0 = time.monotonic()
                    go.touch()
                received += len(data)
        elapsed = time.monotonic() - t0
    daemon.drop_log(status.id)
    if received != size:
        raise SystemExit(f"bench: follower got {received} bytes, the job wrote {size}")
    return (total / MIB) / elapsed


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
async def bare_server(pki: Path) -> AsyncIterator[BareChannel]:
    """:mod:`bench._bare_server` in a process of its own, and a channel to it."""
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
            yield bare
        finally:
            await bare.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def bare_stream(bare: BareChannel, total: int, chunk: int) -> float:
    """MiB/s of ``total`` bytes in ``chunk``-byte messages from the bare grpc.aio server."""
    received = 0
    t0 = time.monotonic()
    async with asyncio.timeout(TIMEOUT):
        async for data in bare.stream(f"{total}:{chunk}"):
            received += len(data)
    elapsed = time.monotonic() - t0
    if received != total:
        raise SystemExit(f"bench: bare grpc stream got {received} of {total} bytes")
    return (total / MIB) / elapsed


def _report(path: Path) -> float:
    ns = int(path.read_text())
    path.unlink()
    return ns / 1e9


async def write_to_log(client: Client, daemon: Workerd, total: int) -> float:
    """MiB/s the job itself measured writing ``total`` bytes to its stdout (the log pipe)."""
    report = daemon.shared / "report-log"
    status = await client.start(daemon.writer("bytes", total, "-", report))
    async with asyncio.timeout(TIMEOUT):
        await client.wait(status.id)
    daemon.drop_log(status.id)
    return (total / MIB) / _report(report)


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
    return (total / MIB) / _report(report)


async def run(
    settings: Settings, daemon: Workerd, log: Callable[[str], None]
) -> dict[str, float | str]:
    total = settings.throughput_bytes
    follow: list[float] = []
    tls: list[float] = []
    to_log: list[float] = []
    to_file: list[float] = []
    bare_small: list[float] = []
    bare_big: list[float] = []
    cipher = ""
    async with daemon.client() as client, bare_server(daemon.pki) as bare:
        for rep in range(settings.heavy_reps):
            follow.append(await follow_once(client, daemon, total))
            rate, cipher = await asyncio.to_thread(tls_baseline, daemon.pki, total)
            tls.append(rate)
            bare_small.append(await bare_stream(bare, total, READ_CHUNK))
            bare_big.append(await bare_stream(bare, total, BIG_CHUNK))
            to_log.append(await write_to_log(client, daemon, total))
            to_file.append(await asyncio.to_thread(write_to_file, daemon, total))
            log(
                f"throughput rep {rep + 1}: follower {follow[-1]:.0f} MiB/s, TLS {tls[-1]:.0f} "
                f"MiB/s, bare grpc {bare_small[-1]:.0f} MiB/s ({READ_CHUNK // 1024} KiB messages) "
                f"{bare_big[-1]:.0f} MiB/s (1 MiB); job writes log {to_log[-1]:.0f} MiB/s, "
                f"file {to_file[-1]:.0f} MiB/s"
            )
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
    }
    return out
