"""A library-level churn probe for the retention section's RSS figure: a real
:class:`~jobworker.JobManager` with the daemon's default retention (10 000 jobs, 7 days), no
grpc, ``/bin/true`` jobs started and waited for 16 at a time. Every ``--every`` jobs it prints one
line: jobs done, RSS (KiB), ``sys.getallocatedblocks()``, and glibc's ``mallinfo2`` (heap in
use, free in the heap, mmapped). Minutes instead of the full section's 25.

    .venv/bin/python -m bench.churn_probe [--jobs 32000] [--retain 10000] [--every 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from jobworker import JobManager, JobSpec
from jobworker.retention import Retention


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def sample(done: int, t0: float) -> str:
    m = _libc.mallinfo2()
    return (
        f"{done:7d} jobs {time.monotonic() - t0:6.1f}s rss {rss_kib():7d} KiB "
        f"blocks {sys.getallocatedblocks():7d} heap_used {m.uordblks / 1e6:6.2f} MB "
        f"heap_free {m.fordblks / 1e6:6.2f} MB mmapped {m.hblkhd / 1e6:6.2f} MB"
    )


async def churn(jobs: int, retain: int, every: int, concurrency: int, name: str) -> None:
    with tempfile.TemporaryDirectory(prefix="jobworker-probe-", dir="/var/tmp") as tmp:
        retention = Retention(max_jobs=retain, max_age=timedelta(days=7))
        async with await JobManager.open(
            Path(tmp) / "state", cgroup_name=name, retention=retention
        ) as m:
            todo = iter(range(jobs))
            done = 0
            t0 = time.monotonic()
            spec = ["/bin/true"]

            async def worker() -> None:
                nonlocal done
                for _ in todo:
                    status = await m.start(JobSpec(argv=tuple(spec)))
                    await m.wait(status.id)
                    done += 1
                    if done % every == 0:
                        gc.collect()
                        print(sample(done, t0), flush=True)

            await asyncio.gather(*(worker() for _ in range(concurrency)))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=32_000)
    p.add_argument("--retain", type=int, default=10_000)
    p.add_argument("--every", type=int, default=2_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--cgroup-name", default="jobworker-probe")
    p.add_argument("--mmap", action="store_true", help="fix the mmap threshold as workerd does")
    p.add_argument("--mmap-threshold", type=int, help="... at this many bytes (with --mmap)")
    a = p.parse_args()
    if a.mmap:
        from jobworker.server.heap import MMAP_THRESHOLD, map_large_blocks

        map_large_blocks(a.mmap_threshold or MMAP_THRESHOLD)
    import jobworker

    print(f"# {jobworker.__file__} mmap={a.mmap} threshold={a.mmap_threshold}", flush=True)
    asyncio.run(churn(a.jobs, a.retain, a.every, a.concurrency, a.cgroup_name))


if __name__ == "__main__":
    main()
