"""Library start latency: ``JobManager.start`` until the process has exec'd inside its cgroup,
beside a bare ``subprocess.Popen`` fork/exec of the same binary in the same run.

    sudo .venv/bin/python -m bench.start_latency [N]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import pct
from jobworker import JobManager, JobSpec


async def measure(n: int, cgroup_name: str = "jobworker-bench-lib") -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="jobworker-bench-") as state:
        async with await JobManager.open(Path(state), cgroup_name=cgroup_name) as mgr:
            starts: list[float] = []
            forks: list[float] = []
            for i in range(n + 10):
                t0 = time.perf_counter()
                st = await mgr.start(JobSpec(argv=("/bin/true",)))
                t1 = time.perf_counter()
                await mgr.wait(st.id)
                t2 = time.perf_counter()
                proc = subprocess.Popen(["/bin/true"])
                t3 = time.perf_counter()
                proc.wait()
                if i >= 10:  # warm-up
                    starts.append((t1 - t0) * 1e3)
                    forks.append((t3 - t2) * 1e3)
    return {
        "start_p50_ms": statistics.median(starts),
        "start_p99_ms": pct(starts, 0.99),
        "fork_exec_p50_ms": statistics.median(forks),
        "fork_exec_p99_ms": pct(forks, 0.99),
        "start_ratio_vs_fork_exec": statistics.median(starts) / statistics.median(forks),
    }


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    result = asyncio.run(measure(n))
    for key, value in result.items():
        print(f"{key:28s} {value:8.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
