"""Retention: the daemon's RSS stays flat over a long churn. A daemon of its own with
``--retain-jobs RETAIN_JOBS`` (so retention engages early) churns N short jobs (start -> wait;
100 000, or 5 000 with BENCH_QUICK); its RSS is read after a warm-up of WARMUP jobs (past the
retention limit, so the kept set is at its steady size) and at the end. The figure is
``rss_growth_kib_<N/1000>k_churn``; the goal (100 000 jobs) is <= 2048 KiB."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import Settings, Workerd

RETAIN_JOBS = 1000
WARMUP = 3000
FULL_JOBS = 100_000
QUICK_JOBS = 5_000
SETTLE = 1.0


def key(jobs: int) -> str:
    return f"rss_growth_kib_{jobs // 1000}k_churn"


async def _churn(daemon: Workerd, n: int, concurrency: int) -> None:
    todo = iter(range(n))
    async with daemon.client() as client:

        async def worker() -> None:
            for _ in todo:
                status = await client.start(["/bin/true"])
                await client.wait(status.id)

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def run(settings: Settings, workdir: Path, log: Callable[[str], None]) -> dict[str, float]:
    jobs = QUICK_JOBS if settings.quick else FULL_JOBS
    workdir.mkdir()
    daemon = Workerd(workdir, "--retain-jobs", str(RETAIN_JOBS))
    out: dict[str, float] = {}
    try:
        await _churn(daemon, WARMUP, settings.concurrency)
        await asyncio.sleep(SETTLE)
        before = daemon.sample().rss_kib
        t0 = time.monotonic()
        await _churn(daemon, jobs - WARMUP, settings.concurrency)
        elapsed = time.monotonic() - t0
        await asyncio.sleep(SETTLE)
        after = daemon.sample().rss_kib
        kept = len(list((daemon.state / "jobs").glob("*.json")))
    finally:
        daemon.stop()
    out[key(jobs)] = float(after - before)
    out["retention_rss_kib_after_warmup"] = float(before)
    out["retention_rss_kib_end"] = float(after)
    out["retention_jobs_removed"] = float(jobs - kept)
    out["retention_records_kept"] = float(kept)
    out["retention_churn_jobs_per_s"] = (jobs - WARMUP) / elapsed
    if kept != RETAIN_JOBS:
        raise SystemExit(f"bench: {kept} records kept with --retain-jobs {RETAIN_JOBS}")
    log(
        f"retention: {jobs} jobs churned with --retain-jobs {RETAIN_JOBS}: RSS {before} -> "
        f"{after} KiB after the {WARMUP}-job warm-up ({after - before:+d} KiB), "
        f"{out['retention_jobs_removed']:.0f} removed, {kept} records kept"
    )
    return out
