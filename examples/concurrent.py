"""N readers tail one job; shows what each reader costs in tasks and threads.

    sudo .venv/bin/python examples/concurrent.py N CMD [ARGS...]

The Go original runs one goroutine per reader plus one per job. Here a reader is one asyncio
task (an async generator over the log, woken in-process) and a job is one supervising task;
no thread is started for either.
"""

from __future__ import annotations

import sys

# This folder holds a file named concurrent.py, which would shadow the standard library's
# `concurrent` package (asyncio imports it) when a script here is run by path.
if sys.path and sys.path[0] == __file__.rpartition("/")[0]:
    del sys.path[0]

import asyncio
import hashlib
import tempfile
import threading
from pathlib import Path

from jobworker import JobManager, JobSpec


async def run(n: int, argv: list[str], state_dir: Path) -> None:
    async with await JobManager.open(state_dir, cgroup_name="jobworker-concurrent") as mgr:
        tasks_before = len(asyncio.all_tasks())
        threads_before = threading.active_count()
        job = await mgr.start(JobSpec(argv=tuple(argv), cwd=str(Path.cwd())))
        tasks_with_job = len(asyncio.all_tasks())

        async def reader() -> tuple[str, int]:
            h = hashlib.sha256()
            size = 0
            async for chunk in mgr.output(job.id, follow=True):
                h.update(chunk)
                size += len(chunk)
            return h.hexdigest(), size

        readers = [asyncio.create_task(reader()) for _ in range(n)]
        await asyncio.sleep(0)
        tasks_with_readers = len(asyncio.all_tasks())
        threads_with_readers = threading.active_count()
        results = await asyncio.gather(*readers)
        final = await mgr.wait(job.id)
        digests = {r for r in results}
        print(
            f"job {final.id}: {final.state}, exit {final.exit_code}, "
            f"{final.output_bytes} bytes of output"
        )
        print(
            f"{n} readers: {len(digests)} distinct sha256 "
            f"({'all identical' if len(digests) == 1 else 'MISMATCH'}): "
            f"{next(iter(digests))[0][:16]}..."
        )
        print(
            f"asyncio tasks: {tasks_with_job - tasks_before} for the job, "
            f"{(tasks_with_readers - tasks_with_job) / n:.2f} per reader"
        )
        print(
            f"threads: {threads_with_readers - threads_before} started for job + readers "
            f"({threads_with_readers} in the process, the loop's own included)"
        )


def main() -> int:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jobworker-concurrent-") as state:
        asyncio.run(run(int(sys.argv[1]), sys.argv[2:], Path(state)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
