"""Retention: the daemon's RSS stays flat over a long churn. A daemon of its own, with the
default retention (``--retain-jobs 10000``, ``--retain-for 7d``), churns short jobs (start ->
wait): a warm-up past the retention limit, so the kept set is at its steady size, then N more
(100 000). Its RSS is read once the warm-up's removals are done and again at the end. The
figure is ``rss_growth_kib_<N/1000>k_churn``; the goal (100 000 jobs, the defaults) is <= 2048
KiB. The quick run (BENCH_QUICK) churns 5 000 jobs with ``--retain-jobs 1000`` instead, so that
retention engages early and the run stays short."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from bench import common
from bench.common import Settings, Workerd
from jobworker.server.daemon_config import DEFAULT_RETAIN_JOBS

QUICK_RETAIN_JOBS = 1000
FULL_JOBS = 100_000
QUICK_JOBS = 5_000
SETTLE_TIMEOUT = 60.0


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
    retain = QUICK_RETAIN_JOBS if settings.quick else DEFAULT_RETAIN_JOBS
    warmup = retain + retain // 5
    workdir.mkdir()
    flags = ("--retain-jobs", str(retain)) if settings.quick else ()
    daemon = Workerd(workdir, *flags, cgroup_name=f"{common.CGROUP_NAME}-retention")
    out: dict[str, float] = {}
    try:
        await _churn(daemon, warmup, settings.concurrency)
        await _settled(daemon, retain)
        before = daemon.sample().rss_kib
        t0 = time.monotonic()
        await _churn(daemon, jobs, settings.concurrency)
        elapsed = time.monotonic() - t0
        kept = await _settled(daemon, retain)
        after = daemon.sample().rss_kib
    finally:
        daemon.stop()
    total = warmup + jobs
    out[key(jobs)] = float(after - before)
    out["retention_rss_kib_after_warmup"] = float(before)
    out["retention_rss_kib_end"] = float(after)
    out["retention_jobs_removed"] = float(total - kept)
    out["retention_records_kept"] = float(kept)
    out["retention_retain_jobs"] = float(retain)
    out["retention_churn_jobs_per_s"] = jobs / elapsed
    log(
        f"retention: {jobs} jobs churned with --retain-jobs {retain}"
        f"{'' if settings.quick else ' (the default)'}: RSS {before} -> {after} KiB after the "
        f"{warmup}-job warm-up ({after - before:+d} KiB), "
        f"{out['retention_jobs_removed']:.0f} removed, {kept} records kept"
    )
    return out


async def _settled(daemon: Workerd, retain: int) -> int:
    """Wait until retention has removed every record past ``retain`` (the removals run on the
    store's writer thread, a little after the job that triggers them ends); the count kept."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        kept = len(list((daemon.state / "jobs").glob("*.json")))
        if kept == retain:
            return kept
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {kept} records kept with --retain-jobs {retain}")
        await asyncio.sleep(0.05)
