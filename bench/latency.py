"""Follow latency: the job writes ``SEQ MONOTONIC_NS`` lines every few ms; the follower takes
CLOCK_MONOTONIC (shared by every process) when each line arrives. Three readers of the same
writer: a :class:`~jobworker.client.Client` follower, ``worker logs -f`` piped to us, and the
baseline, the writer's stdout read straight from a pipe. A second baseline is grpc alone: the
bare grpc.aio server (:mod:`bench._bare_server`, same TLS and options, no jobworker code) yields
the same lines at the same pace, one message each, stamped as it yields them — the floor under
the follower's latency that no change in the daemon can go below."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench._followers import BareChannel
from bench.common import Settings, Workerd, go_file, median, pct
from bench.throughput import bare_server

WARMUP_LINES = 5
TIMEOUT = 120.0


class _Lines:
    """Splits arriving bytes into lines and records each stamped line's latency (ms)."""

    def __init__(self) -> None:
        self.buf = b""
        self.ready = False
        self.latencies: list[float] = []

    def feed(self, data: bytes, now_ns: int) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready = True
                continue
            seq, stamp = line.split()
            if int(seq) >= WARMUP_LINES:
                self.latencies.append((now_ns - int(stamp)) / 1e6)


def _read_pipe(fd: int, go: Path, lines: _Lines) -> None:
    """Blocking reader (in a thread): read to EOF, opening the go file after the ready line."""
    while True:
        data = os.read(fd, 65536)
        now = time.monotonic_ns()
        if not data:
            return
        lines.feed(data, now)
        if lines.ready and not go.exists():
            go.touch()


async def via_pipe(settings: Settings, daemon: Workerd) -> list[float]:
    with go_file(daemon.shared, "pipe") as go:
        argv = daemon.writer("ticks", settings.latency_lines, settings.latency_interval_ms, go)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        lines = _Lines()
        try:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.to_thread(_read_pipe, proc.stdout.fileno(), go, lines)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    return lines.latencies


async def via_client(settings: Settings, daemon: Workerd) -> list[float]:
    lines = _Lines()
    async with daemon.client() as client:
        with go_file(daemon.shared, "client") as go:
            argv = daemon.writer("ticks", settings.latency_lines, settings.latency_interval_ms, go)
            status = await client.start(argv)
            async with asyncio.timeout(TIMEOUT):
                async for _, data in client.logs(status.id, follow=True):
                    lines.feed(data, time.monotonic_ns())
                    if lines.ready and not go.exists():
                        go.touch()
    return lines.latencies


async def via_cli(settings: Settings, daemon: Workerd) -> list[float]:
    lines = _Lines()
    async with daemon.client() as client:
        with go_file(daemon.shared, "cli") as go:
            argv = daemon.writer("ticks", settings.latency_lines, settings.latency_interval_ms, go)
            status = await client.start(argv)
            proc = subprocess.Popen(
                daemon.cli("logs", "-f", status.id),
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(TIMEOUT):
                    await asyncio.to_thread(_read_pipe, proc.stdout.fileno(), go, lines)
                    await asyncio.to_thread(proc.wait)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                proc.stdout.close()
            if proc.returncode != 0:
                raise SystemExit(f"bench: worker logs -f exited {proc.returncode}")
    return lines.latencies


async def via_bare_grpc(settings: Settings, bare: BareChannel) -> list[float]:
    lines = _Lines()
    request = f"{settings.latency_lines}:{settings.latency_interval_ms}"
    async with asyncio.timeout(TIMEOUT):
        async for data in bare.stream(request, "Ticks"):
            lines.feed(data, time.monotonic_ns())
    return lines.latencies


def summary(runs: list[list[float]]) -> dict[str, float]:
    """Median over repetitions of each repetition's p50/p99; the worst max of all."""
    return {
        "p50_ms": median([pct(r, 0.50) for r in runs]),
        "p99_ms": median([pct(r, 0.99) for r in runs]),
        "max_ms": max(max(r) for r in runs),
        "samples": float(sum(len(r) for r in runs)),
    }


async def run(
    settings: Settings, daemon: Workerd, log: Callable[[str], None]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    runs: dict[str, list[list[float]]] = {"client": [], "cli": [], "pipe": [], "bare": []}
    async with bare_server(daemon.pki) as (bare, _):
        for rep in range(settings.reps):
            runs["pipe"].append(await via_pipe(settings, daemon))
            runs["client"].append(await via_client(settings, daemon))
            runs["cli"].append(await via_cli(settings, daemon))
            runs["bare"].append(await via_bare_grpc(settings, bare))
            log(
                f"latency rep {rep + 1}: p50 client {pct(runs['client'][-1], 0.5):.3f} ms, "
                f"cli {pct(runs['cli'][-1], 0.5):.3f} ms, pipe {pct(runs['pipe'][-1], 0.5):.3f} "
                f"ms, bare grpc {pct(runs['bare'][-1], 0.5):.3f} ms"
            )
    out: dict[str, float] = {}
    prefixes = (
        ("client", "follow"),
        ("cli", "follow_cli"),
        ("pipe", "pipe_baseline"),
        ("bare", "grpc_bare_follow"),
    )
    for name, prefix in prefixes:
        s = summary(runs[name])
        out[f"{prefix}_p50_ms"] = s["p50_ms"]
        out[f"{prefix}_p99_ms"] = s["p99_ms"]
        out[f"{prefix}_max_ms"] = s["max_ms"]
    out["follow_samples"] = summary(runs["client"])["samples"]
    out["follow_p50_ratio_vs_pipe"] = out["follow_p50_ms"] / out["pipe_baseline_p50_ms"]
    out["follow_p50_ratio_vs_bare_grpc"] = out["follow_p50_ms"] / out["grpc_bare_follow_p50_ms"]
    all_samples = {name: [x for r in rs for x in r] for name, rs in runs.items()}
    return out, all_samples
