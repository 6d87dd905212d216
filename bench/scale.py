"""Scale: N jobs running at once — Status and List latency while they run — then a churn of
M short jobs (start -> exit) and the daemon's fds, threads, asyncio tasks, cgroup directories
and RSS before and after."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from bench.common import Settings, Workerd, median, pct

T = TypeVar("T")
SETTLE_TIMEOUT = 60.0
STATUS_CALLS = 1000
LIST_CALLS = 50
SANDBOX_PSS_SAMPLE = 100


def _pss_kib(pid: int) -> float:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return float(line.split()[1])
    raise SystemExit(f"bench: no Pss in /proc/{pid}/smaps_rollup")


async def _bounded(n: int, concurrency: int, work: Callable[[int], Awaitable[T]]) -> list[T]:
    """``work(0..n-1)`` with at most ``concurrency`` in flight."""
    results: list[T | None] = [None] * n
    todo = iter(range(n))

    async def worker() -> None:
        for i in todo:
            results[i] = await work(i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return [r for r in results if r is not None]


def _snapshot(daemon: Workerd) -> dict[str, float]:
    s = daemon.sample()
    return {
        "fds": float(s.fds),
        "threads": float(s.threads),
        "asyncio_tasks": float(daemon.asyncio_tasks()),
        "cgroup_dirs": float(daemon.cgroup_dirs()),
        "rss_kib": float(s.rss_kib),
        "spawner_fds": float(daemon.spawner_fds()),
    }


async def _timed(call: Awaitable[T]) -> float:
    t0 = time.perf_counter()
    await call
    return (time.perf_counter() - t0) * 1e3


async def _settle(daemon: Workerd) -> None:
    """Wait (bounded) until every job group is gone."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    # The cgroup tree is outside the daemon: nothing to await but a bounded poll.
    while daemon.cgroup_dirs() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)


async def run(settings: Settings, daemon: Workerd, log: Callable[[str], None]) -> dict[str, float]:
    n, m, c = settings.scale_jobs, settings.churn_jobs, settings.concurrency
    out: dict[str, float] = {}
    await _settle(daemon)
    before = _snapshot(daemon)
    async with daemon.client() as client:
        t0 = time.monotonic()
        started = await _bounded(
            n,
            c,
            lambda i: client.start(["/bin/sleep", "600"]),
        )
        out[f"start_{n}_jobs_per_s"] = n / (time.monotonic() - t0)
        running = daemon.cgroup_dirs()
        if running != n:
            raise SystemExit(f"bench: {running} job groups while {n} jobs should run")
        ids = [s.id for s in started]
        # Each sandboxed job keeps one helper, its PID namespace's init (the job's reported
        # pid): its proportional share of memory is the sandbox's cost per running job.
        pss = [_pss_kib(s.pid) for s in started[:SANDBOX_PSS_SAMPLE]]
        out["sandbox_init_pss_kib"] = sum(pss) / len(pss)
        rng = random.Random(1)
        status_ms = [await _timed(client.status(rng.choice(ids))) for _ in range(STATUS_CALLS)]
        list_ms = [await _timed(client.list(all=True)) for _ in range(LIST_CALLS)]
        jobs = await client.list(all=True)
        out["list_jobs_returned"] = float(len(jobs))
        out["status_p50_ms_1000_jobs"] = median(status_ms)
        out["status_p99_ms_1000_jobs"] = pct(status_ms, 0.99)
        out["list_p50_ms_1000_jobs"] = median(list_ms)
        out["list_p99_ms_1000_jobs"] = pct(list_ms, 0.99)
        out["running_jobs"] = float(n)
        during = _snapshot(daemon)
        t0 = time.monotonic()
        await _bounded(n, c, lambda i: client.stop(ids[i], grace=1.0))
        out[f"stop_{n}_jobs_s"] = time.monotonic() - t0
        log(
            f"scale: {n} running jobs: Status p99 {out['status_p99_ms_1000_jobs']:.2f} ms, "
            f"List ({len(jobs)} jobs) p99 {out['list_p99_ms_1000_jobs']:.1f} ms; stopped all "
            f"in {out[f'stop_{n}_jobs_s']:.1f} s"
        )
        await _settle(daemon)

        async def churn(i: int) -> None:
            status = await client.start(["/bin/true"])
            await client.wait(status.id)

        cpu0 = daemon.sample().cpu_s
        t0 = time.monotonic()
        await _bounded(m, c, churn)
        out["churn_jobs"] = float(m)
        out["churn_jobs_per_s"] = m / (time.monotonic() - t0)
        out["churn_daemon_cpu_ms_per_job"] = (daemon.sample().cpu_s - cpu0) / m * 1e3
    await _settle(daemon)
    after = _snapshot(daemon)
    for key in before:
        out[f"scale_before_{key}"] = before[key]
        out[f"scale_during_{key}"] = during[key]
        out[f"scale_after_{key}"] = after[key]
    log(
        f"churn: {m} jobs at {out['churn_jobs_per_s']:.0f} jobs/s; before -> after: "
        + ", ".join(f"{k} {before[k]:.0f} -> {after[k]:.0f}" for k in before)
    )
    return out
