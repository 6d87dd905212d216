"""Keystroke to echo: one byte typed into a terminal job (``worker run -t``'s path: Attach
in, the pty, the job, the pty's master into the log, Logs out) until the job's echo of it
comes back; beside the same job on a local pty, written and read straight from its master.

The job is ``sh -c 'stty raw -echo; echo ready; exec cat'``: the terminal does not echo, the
job does (cat writes each byte it reads), so both paths include a program's read and write."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable

from bench.common import Settings, Workerd, median, pct
from jobworker.spec import TerminalSize

SCRIPT = "stty raw -echo; echo ready; exec cat"
TIMEOUT = 60.0


def _keys(settings: Settings) -> int:
    return 200 if settings.quick else 1000


async def via_daemon(settings: Settings, daemon: Workerd) -> list[float]:
    latencies: list[float] = []
    async with daemon.client() as client:
        status = await client.start(["sh", "-c", SCRIPT], tty=TerminalSize())
        arrived: asyncio.Queue[bytes] = asyncio.Queue()

        async def follow() -> None:
            async for _, data in client.logs(status.id, follow=True):
                arrived.put_nowait(data)

        reader = asyncio.create_task(follow())
        try:
            async with asyncio.timeout(TIMEOUT), await client.attach(status.id) as typing:
                seen = b""
                while b"ready" not in seen:
                    seen += await arrived.get()
                for i in range(_keys(settings)):
                    key = bytes([ord("a") + i % 26])
                    t0 = time.monotonic_ns()
                    await typing.write(key)
                    got = b""
                    while key not in got:
                        got += await arrived.get()
                    latencies.append((time.monotonic_ns() - t0) / 1e6)
        finally:
            await client.stop(status.id, grace=0)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return latencies


def _local(keys: int) -> list[float]:
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["sh", "-c", SCRIPT], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    latencies: list[float] = []
    try:
        seen = b""
        while b"ready" not in seen:
            seen += os.read(master, 4096)
        for i in range(keys):
            key = bytes([ord("a") + i % 26])
            t0 = time.monotonic_ns()
            os.write(master, key)
            got = b""
            while key not in got:
                got += os.read(master, 4096)
            latencies.append((time.monotonic_ns() - t0) / 1e6)
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
    return latencies


async def via_local_pty(settings: Settings) -> list[float]:
    return await asyncio.to_thread(_local, _keys(settings))


async def run(settings: Settings, daemon: Workerd, log: Callable[[str], None]) -> dict[str, float]:
    runs: dict[str, list[list[float]]] = {"daemon": [], "local": []}
    for rep in range(settings.reps):
        runs["local"].append(await via_local_pty(settings))
        runs["daemon"].append(await via_daemon(settings, daemon))
        log(
            f"keystroke rep {rep + 1}: p50 daemon {pct(runs['daemon'][-1], 0.5):.3f} ms, "
            f"local pty {pct(runs['local'][-1], 0.5):.3f} ms"
        )
    out: dict[str, float] = {}
    for name, prefix in (("daemon", "keystroke"), ("local", "local_pty")):
        out[f"{prefix}_p50_ms"] = median([pct(r, 0.50) for r in runs[name]])
        out[f"{prefix}_p99_ms"] = median([pct(r, 0.99) for r in runs[name]])
        out[f"{prefix}_max_ms"] = max(max(r) for r in runs[name])
    out["keystroke_samples"] = float(sum(len(r) for r in runs["daemon"]))
    return out
