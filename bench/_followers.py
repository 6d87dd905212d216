"""Followers of one job in a process of their own (so the daemon, the job and the followers
each get a CPU), over the real :class:`jobworker.client.Client`.

    python -m bench._followers '{"addr": ..., "pki": ..., "user": ..., "job": ID,
                                 "followers": K, "channels": C, "mode": "stream"|"idle",
                                 "bare": false}'

Prints ``ready`` once every follower has received its first bytes (the job's ready line), then:

``stream``
    follows to the end, hashing every byte; prints one JSON line: per follower the byte count,
    sha256 and the CLOCK_MONOTONIC time its last byte arrived.
``idle``
    holds the streams open until a line arrives on stdin, then closes them and prints ``done``.

With ``bare`` the streams go to :mod:`bench._bare_server` instead (raw grpc, no jobworker code
on either side; ``job`` is then the request: ``idle`` or a byte count).
"""

from __future__ import annotations

# isort: off
from jobworker import tls
import grpc
from grpc import aio

# isort: on
import asyncio
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jobworker.client import CHANNEL_OPTIONS, Client

READY_TIMEOUT = 120.0
STREAM_TIMEOUT = 900.0


class BareChannel:
    """A raw channel to the bare server."""

    def __init__(self, addr: str, pki: Path, user: str) -> None:
        m = tls.load_client(tls.Paths.from_pki(pki, user))
        creds = grpc.ssl_channel_credentials(m.ca, m.key, m.cert)
        self.channel = aio.secure_channel(addr, creds, options=CHANNEL_OPTIONS)

    async def stream(self, request: str, method: str = "") -> AsyncIterator[bytes]:
        """``method``: the bare server's method (default: ``Idle`` for ``idle``, else
        ``Stream``)."""
        method = method or ("Idle" if request == "idle" else "Stream")
        call = self.channel.unary_stream(f"/bench.Bare/{method}", None, None)(request.encode())
        try:
            async for data in call:
                yield data
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close(None)


async def _client_stream(client: Client, job: str) -> AsyncIterator[bytes]:
    async for _, data in client.logs(job, follow=True):
        yield data


async def follow(
    source: AsyncIterator[bytes],
    attached: asyncio.Event,
    counter: list[int],
    k: int,
    hold: asyncio.Event | None,
) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    first = True
    async for data in source:
        h.update(data)
        size += len(data)
        if first:
            first = False
            counter[0] += 1
            if counter[0] == k:
                attached.set()
            if hold is not None:
                await hold.wait()
                break
    return {"bytes": size, "sha256": h.hexdigest(), "end_ns": time.monotonic_ns()}


async def main(args: dict[str, Any]) -> None:
    k, c = int(args["followers"]), max(1, int(args["channels"]))
    addr, pki, user, job = args["addr"], Path(args["pki"]), args["user"], args["job"]
    bare = bool(args.get("bare"))
    clients: list[Any] = [
        BareChannel(addr, pki, user) if bare else Client.from_pki(addr, pki, user) for _ in range(c)
    ]
    attached = asyncio.Event()
    counter = [0]
    hold = asyncio.Event() if args["mode"] == "idle" else None
    sources = [
        clients[i % c].stream(job) if bare else _client_stream(clients[i % c], job)
        for i in range(k)
    ]
    tasks = [asyncio.create_task(follow(s, attached, counter, k, hold)) for s in sources]
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await attached.wait()
        print("ready", flush=True)
        if hold is not None:
            await asyncio.to_thread(sys.stdin.readline)
            hold.set()
        async with asyncio.timeout(STREAM_TIMEOUT):
            results = await asyncio.gather(*tasks)
        if hold is None:
            print(json.dumps(results), flush=True)
        else:
            print("done", flush=True)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.close()
    # After hundreds of aio channels, asyncio.run's executor shutdown can hang joining its
    # worker thread (grpc 1.76, Python 3.11); the results are out, so leave without it.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
