"""Run one job through the library and stream its output to stdout.

    sudo .venv/bin/python examples/tail.py CMD [ARGS...]

Ctrl+C or SIGTERM stops the job (its cgroup is removed) and exits; otherwise exits with the
job's exit code (128 + signal when a signal ended it).
"""

from __future__ import annotations

import sys

# This folder holds a file named concurrent.py, which would shadow the standard library's
# `concurrent` package (asyncio imports it) when a script here is run by path.
if sys.path and sys.path[0] == __file__.rpartition("/")[0]:
    del sys.path[0]

import asyncio
import signal
import tempfile
from pathlib import Path

from jobworker import JobManager, JobSpec, JobworkerError


async def tail(argv: list[str], state_dir: Path) -> int:
    async with await JobManager.open(state_dir, cgroup_name="jobworker-example") as mgr:
        job = await mgr.start(JobSpec(argv=tuple(argv), cwd=str(Path.cwd())))
        print(f"job {job.id} pid {job.pid} in {mgr.cgroup_parent / job.id}", file=sys.stderr)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(
                sig, lambda: asyncio.ensure_future(mgr.stop(job.id, reason="interrupted"))
            )
        out = sys.stdout.buffer
        async for chunk in mgr.output(job.id, follow=True):
            out.write(chunk)
            out.flush()
        final = await mgr.wait(job.id)
        gone = not (mgr.cgroup_parent / job.id).exists()
        print(
            f"job {final.state}: exit={final.exit_code} signal={final.signal} "
            f"{final.reason} (cgroup removed: {gone})",
            file=sys.stderr,
        )
        if final.signal is not None:
            return 128 + final.signal
        return int(final.exit_code or 0)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="jobworker-example-") as state:
        try:
            return asyncio.run(tail(sys.argv[1:], Path(state)))
        except JobworkerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
