"""Memory per follower: N idle followers of one running job (100 streams per connection), the
daemon's RSS growth per follower; baseline: the same N idle streams on a bare grpc.aio server
with the same TLS and options (:mod:`bench._bare_server`), which is grpc's own cost."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from bench.common import ROOT, USER, Settings, Workerd, proc_sample, start_followers

STREAMS_PER_CHANNEL = 100
SETTLE = 1.0
PROCS = 2
TIMEOUT = 120.0


def _hold(addr: str, pki: str, job: str, n: int, bare: bool) -> list[subprocess.Popen[str]]:
    procs = []
    for share in (n - n // PROCS * (PROCS - 1), *([n // PROCS] * (PROCS - 1))):
        args = {
            "addr": addr,
            "pki": pki,
            "user": USER,
            "job": job,
            "followers": share,
            "channels": max(1, share // STREAMS_PER_CHANNEL),
            "mode": "idle",
            "bare": bare,
        }
        procs.append(start_followers(args))
    return procs


def _line(p: subprocess.Popen[str], want: str) -> None:
    assert p.stdout is not None
    line = p.stdout.readline().strip()
    if line != want:
        p.kill()
        raise SystemExit(f"bench: idle followers said {line!r}, expected {want!r}")


def growth_kib(server_pid: int, addr: str, pki: str, job: str, n: int, bare: bool) -> float:
    """RSS growth of ``server_pid`` per stream while ``n`` idle streams are open (KiB),
    after a warm-up round of the same streams (first-use allocations are not per follower)."""
    per: list[float] = []
    for _ in range(2):  # the first round warms up; the second is measured
        time.sleep(SETTLE)
        before = proc_sample(server_pid).rss_kib
        procs = _hold(addr, pki, job, n, bare)
        try:
            for p in procs:
                _line(p, "ready")
            time.sleep(SETTLE)
            during = proc_sample(server_pid).rss_kib
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("\n")
                p.stdin.flush()
            for p in procs:
                _line(p, "done")
                p.wait(TIMEOUT)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        per.append((during - before) / n)
    return per[-1]


async def run(settings: Settings, daemon: Workerd, log: Callable[[str], None]) -> dict[str, float]:
    n = settings.idle_followers
    async with daemon.client() as client:
        status = await client.start(daemon.writer("idle", 600))
        try:
            ours = await asyncio.to_thread(
                growth_kib, daemon.pid, daemon.addr, str(daemon.pki), status.id, n, False
            )
        finally:
            await client.stop(status.id)
    bare = subprocess.Popen(
        [sys.executable, "-m", "bench._bare_server", str(daemon.pki)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert bare.stdout is not None
        port = int(bare.stdout.readline())
        theirs = await asyncio.to_thread(
            growth_kib, bare.pid, f"127.0.0.1:{port}", str(daemon.pki), "idle", n, True
        )
    finally:
        bare.send_signal(signal.SIGTERM)
        try:
            bare.wait(30)
        except subprocess.TimeoutExpired:
            bare.kill()
            bare.wait()
    log(
        f"memory: {n} idle followers cost {ours:.1f} KiB each in workerd; the same streams on "
        f"a bare grpc.aio server {theirs:.1f} KiB each"
    )
    return {
        "idle_followers": float(n),
        "follower_rss_kib": ours,
        "bare_grpc_stream_rss_kib": theirs,
        "follower_rss_ratio_vs_bare": ours / theirs if theirs > 0 else float("nan"),
    }
