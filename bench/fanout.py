"""Fan-out: K followers (one connection each, in follower processes of their own) of one job
that writes as fast as it can once they are all attached; aggregate and per-follower MiB/s, the
daemon's CPU seconds per GiB delivered, and every follower's sha256 against the log on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from bench.common import (
    USER,
    Settings,
    Workerd,
    expected_output,
    go_file,
    median,
    start_followers,
)
from jobworker.client import Client

MIB = 1 << 20
TIMEOUT = 900.0


def spawn_followers(daemon: Workerd, job: str, k: int, mode: str) -> list[subprocess.Popen[str]]:
    """``k`` followers, one connection each, split over up to two processes."""
    procs = []
    split = [k] if k < 10 else [k - k // 2, k // 2]
    for n in split:
        args = {
            "addr": daemon.addr,
            "pki": str(daemon.pki),
            "user": USER,
            "job": job,
            "followers": n,
            "channels": n,
            "mode": mode,
        }
        procs.append(start_followers(args))
    return procs


def expect_line(proc: subprocess.Popen[str], want: str | None = None) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line or (want is not None and line.strip() != want):
        proc.kill()
        raise SystemExit(f"bench: follower process said {line!r}, expected {want!r}")
    return line


def file_sha256(path: Any) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


async def once(client: Client, daemon: Workerd, k: int, total: int) -> dict[str, float]:
    size, sha = expected_output(total)
    with go_file(daemon.shared, "fanout") as go:
        status = await client.start(daemon.writer("bytes", total, go, "-"))
        procs = spawn_followers(daemon, status.id, k, "stream")
        try:
            for p in procs:
                await asyncio.to_thread(expect_line, p, "ready")
            cpu0 = daemon.sample().cpu_s
            t_go = time.monotonic_ns()
            go.touch()
            results: list[dict[str, Any]] = []
            for p in procs:
                results += json.loads(await asyncio.to_thread(expect_line, p))
                await asyncio.to_thread(p.wait, TIMEOUT)
            cpu1 = daemon.sample().cpu_s
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    await client.wait(status.id)
    on_disk = await asyncio.to_thread(file_sha256, daemon.log_file(status.id))
    daemon.drop_log(status.id)
    bad = [r for r in results if r["bytes"] != size or r["sha256"] != sha]
    if len(results) != k or bad or on_disk != sha:
        raise SystemExit(
            f"bench: fan-out {k}: {len(bad)} of {len(results)} followers differ from the "
            f"{size} bytes written (log on disk {'ok' if on_disk == sha else 'differs'})"
        )
    ends = [(r["end_ns"] - t_go) / 1e9 for r in results]
    delivered = k * total
    return {
        "aggregate_mib_s": delivered / MIB / max(ends),
        "per_follower_mib_s": median([total / MIB / e for e in ends]),
        "cpu_s_per_gib": (cpu1 - cpu0) / (delivered / (1 << 30)),
    }


async def run(
    settings: Settings, daemon: Workerd, log: Callable[[str], None]
) -> tuple[dict[str, float], list[dict[str, float]]]:
    out: dict[str, float] = {}
    rows: list[dict[str, float]] = []
    async with daemon.client() as client:
        for k, total in settings.fanout:
            reps = [await once(client, daemon, k, total) for _ in range(settings.heavy_reps)]
            row = {key: median([r[key] for r in reps]) for key in reps[0]}
            row["followers"] = float(k)
            row["job_bytes"] = float(total)
            rows.append(row)
            for key in ("aggregate_mib_s", "per_follower_mib_s", "cpu_s_per_gib"):
                out[f"fanout_{k}_{key}"] = row[key]
            out[f"fanout_{k}_sha256_ok"] = 1.0
            log(
                f"fan-out {k:4d}: aggregate {row['aggregate_mib_s']:.0f} MiB/s, per follower "
                f"{row['per_follower_mib_s']:.1f} MiB/s, daemon {row['cpu_s_per_gib']:.2f} "
                f"CPU s/GiB, {k * settings.heavy_reps} followers byte-exact"
            )
    return out, rows
