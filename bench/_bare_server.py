"""The baseline server: grpc.aio with the daemon's mutual TLS 1.3 and server options, and no
jobworker code — what a bare stream costs in grpc itself.

    python -m bench._bare_server PKI_DIR

Prints its port. Methods (raw bytes, no protobuf):

``/bench.Bare/Idle``
    sends ``ready`` then waits until the client cancels (an idle follower).
``/bench.Bare/Stream``
    request: ``N`` or ``N:CHUNK`` (decimal); sends N bytes of zeros in messages of CHUNK bytes
    (default: the daemon's read size, :data:`jobworker.outread.READ_CHUNK`): the same message
    every time, so its bytes stay in the CPU's caches. ``N:CHUNK:cold`` sends distinct
    messages instead, cycling through :data:`COLD_BYTES` of them, made at start-up (past the
    caches, as every byte a daemon sends is new to them; CHUNK must be one of
    :data:`COLD_SIZES`).
``/bench.Bare/Ticks``
    request: ``N:INTERVAL_MS``; sends ``ready`` then N lines ``SEQ MONOTONIC_NS``, one message
    per line, INTERVAL_MS apart (the latency benchmark's writer, stamped as it is yielded): the
    follow latency of grpc alone, the floor under the daemon's.
"""

from __future__ import annotations

# isort: off
from jobworker.server import tls13  # noqa: F401 - the daemon's TLS 1.3-only rule, before grpc
import grpc
from grpc import aio

# isort: on
import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

from jobworker import tls
from jobworker.outread import READ_CHUNK
from jobworker.server.service import SERVER_OPTIONS


async def idle(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    yield b"ready\n"
    await asyncio.Event().wait()


COLD_BYTES = 64 << 20
"""Distinct bytes a ``cold`` stream cycles through (past this machine's CPU caches)."""
COLD_SIZES = (READ_CHUNK, 1 << 20)
_cold: dict[int, list[bytes]] = {}


def _make_cold() -> None:
    for size in COLD_SIZES:
        _cold[size] = [os.urandom(size) for _ in range(COLD_BYTES // size)]


async def stream(
    request: bytes, context: aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    total, _, rest = request.decode().partition(":")
    size, _, mode = rest.partition(":")
    left, step = int(total), int(size or READ_CHUNK)
    chunks = _cold[step] if mode == "cold" else [bytes(step)]
    i = 0
    while left > 0:
        n = min(left, step)
        yield chunks[i][:n]
        i = (i + 1) % len(chunks)
        left -= n


async def ticks(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    count, _, interval = request.decode().partition(":")
    yield b"ready\n"
    for seq in range(int(count)):
        yield b"%d %d\n" % (seq, time.monotonic_ns())
        await asyncio.sleep(float(interval) / 1e3)


async def main(pki: Path) -> None:
    material = tls.load_server(tls.Paths.from_pki(pki, "server"))
    server = aio.server(options=SERVER_OPTIONS)
    handler = grpc.method_handlers_generic_handler(
        "bench.Bare",
        {
            "Idle": grpc.unary_stream_rpc_method_handler(idle),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Ticks": grpc.unary_stream_rpc_method_handler(ticks),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(material.key, material.cert)], root_certificates=material.ca, require_client_auth=True
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    _make_cold()
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
