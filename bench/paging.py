"""Paging: one List page of 500 jobs from a daemon that retains 100 000 ended jobs (5 000 in
the quick run). A page must cost O(page), not O(jobs retained).

The jobs are real records: starting 100 000 jobs one by one takes this daemon over 5 minutes
(churn is a few hundred a second), so the section writes their records (an ended
``/bin/true`` each, with an empty log) in a state directory of its own (on /dev/shm if there
is one) and starts a second ``workerd`` on it, which recovers them as it would after a
restart: ended jobs the manager holds in memory, as many as a daemon that had run them. Then
pages are fetched at random places of the listing: ``list_page_p99_ms`` is what a
:class:`~jobworker.client.Client` caller waits (the RPC and the conversion of 500 messages),
``list_page_rpc_p99_ms`` the raw RPC alone."""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench import common
from bench.common import Settings, Workerd, median, pct
from bench.scale import _timed
from jobworker.api.proto import pb
from jobworker.spec import JobSpec, JobState, JobStatus
from jobworker.store import _VERSION, LOG, RECORD, spec_to_dict, status_to_dict

PAGE = 500
PAGE_CALLS = 200
RECOVERY_TIMEOUT = 600.0


def seed(state: Path, n: int, owner: str) -> None:
    """``n`` records of ended jobs, a millisecond apart, as the store writes them."""
    jobs = state / "jobs"
    jobs.mkdir(parents=True, mode=0o700)
    t0 = datetime.now(UTC) - timedelta(days=30)
    spec = JobSpec(argv=("/bin/true",), owner=owner)
    spec_dict = spec_to_dict(spec)
    for i in range(n):
        started = t0 + timedelta(milliseconds=i)
        status = JobStatus(
            id=str(uuid.uuid4()),
            state=JobState.EXITED,
            argv=spec.argv,
            owner=owner,
            pid=1000 + i % 30000,
            started_at=started,
            ended_at=started + timedelta(microseconds=500),
            exit_code=0,
        )
        record = {"version": _VERSION, "spec": spec_dict, **status_to_dict(status)}
        (jobs / (status.id + RECORD)).write_text(json.dumps(record))
        os.close(os.open(jobs / (status.id + LOG), os.O_WRONLY | os.O_CREAT, 0o600))


async def run(settings: Settings, log: Callable[[str], None]) -> dict[str, float]:
    # On tmpfs when there is one: writing and reading 200 000 files is not what is measured.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-paging-", dir=shm) as tmp:
        return await _run(settings, Path(tmp), log)


async def _run(settings: Settings, workdir: Path, log: Callable[[str], None]) -> dict[str, float]:
    n = settings.paging_jobs
    out: dict[str, float] = {"list_page_retained_jobs": float(n)}
    t0 = time.monotonic()
    seed(workdir / "state", n, common.USER)
    out["paging_seed_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    # Retention must keep every seeded record (a month old) while the pages are timed.
    daemon = Workerd(
        workdir,
        *("--retain-jobs", str(n), "--retain-for", "365d"),
        cgroup_name=f"{common.CGROUP_NAME}-paging",
        ready_timeout=RECOVERY_TIMEOUT,
    )
    try:
        out["paging_recovery_s"] = time.monotonic() - t0
        out["retained_job_rss_bytes"] = daemon.sample().rss_kib * 1024 / n
        log(
            f"paging: {n} ended job records written in {out['paging_seed_s']:.0f} s; a workerd "
            f"recovered them in {out['paging_recovery_s']:.0f} s "
            f"({out['retained_job_rss_bytes']:.0f} bytes of its RSS per job)"
        )
        async with daemon.client() as client:
            tokens = [""]  # every page's token, by walking the whole listing once
            listed = 0
            t0 = time.monotonic()
            while True:
                page, token = await client.list_page(
                    all=True, page_size=PAGE, page_token=tokens[-1]
                )
                listed += len(page)
                if not token:
                    break
                tokens.append(token)
            out["list_all_pages_s"] = time.monotonic() - t0
            if listed != n or len(tokens) != -(-n // PAGE):
                raise SystemExit(f"bench: {listed} jobs in {len(tokens)} pages; {n} retained")
            rng = random.Random(1)
            stub = client._stub

            def request() -> pb.ListRequest:
                return pb.ListRequest(all=True, page_size=PAGE, page_token=rng.choice(tokens))

            for _ in range(20):  # warm up: each job's message is built at its first listing
                await stub.List(request())
            rpc_ms = [await _timed(stub.List(request())) for _ in range(PAGE_CALLS)]
            page_ms = [
                await _timed(
                    client.list_page(all=True, page_size=PAGE, page_token=rng.choice(tokens))
                )
                for _ in range(PAGE_CALLS)
            ]
        out["list_page_p50_ms"] = median(page_ms)
        out["list_page_p99_ms"] = pct(page_ms, 0.99)
        out["list_page_rpc_p50_ms"] = median(rpc_ms)
        out["list_page_rpc_p99_ms"] = pct(rpc_ms, 0.99)
        log(
            f"paging: one page of {PAGE} of {n} jobs: p50 {out['list_page_p50_ms']:.2f} ms, "
            f"p99 {out['list_page_p99_ms']:.2f} ms (raw RPC p50 "
            f"{out['list_page_rpc_p50_ms']:.2f}, p99 {out['list_page_rpc_p99_ms']:.2f}); all "
            f"{len(tokens)} pages in {out['list_all_pages_s']:.1f} s"
        )
    finally:
        daemon.stop()
    return out
