"""Start latency: the Start RPC round trip (the job has exec'd in its cgroup when it returns)
beside a bare ``subprocess.Popen`` of the same binary in the same loop; the library-level
``JobManager.start`` (:mod:`bench.start_latency`, the server-side figure); the daemon's own
Start handling time from its /metrics; ``worker start -- true`` as a user sees it beside
``python -c pass``; and ``worker status ID`` beside ``python -c 'import grpc'`` (the floor of
any Python gRPC client).

The CLI is timed as installed: jobworker's modules are compiled to bytecode first, as pip
compiles an installed package's (grpc's are). An editable checkout run with
``PYTHONDONTWRITEBYTECODE=1`` (as on the development machines) never writes them, and would
compile every module it imports on every run (about 25 ms of ``worker status``)."""

from __future__ import annotations

import asyncio
import compileall
import subprocess
import sys
import time
from collections.abc import Callable

from bench import start_latency
from bench.common import ROOT, Settings, Workerd, median, pct

WARMUP = 10
TRUE = "/bin/true"


def _start_metric(daemon: Workerd) -> tuple[float, float]:
    m = daemon.metric("jobworker_rpc_duration_seconds")
    return m.get('_sum{method="Start"}', 0.0), m.get('_count{method="Start"}', 0.0)


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, check=True, timeout=60)
    elapsed = time.perf_counter() - t0
    if argv[0].endswith("worker") and not out.stdout.strip():
        raise SystemExit("bench: worker start printed no job id")
    return elapsed * 1e3


async def run(settings: Settings, daemon: Workerd, log: Callable[[str], None]) -> dict[str, float]:
    n = settings.start_n
    rpc: list[float] = []
    bare: list[float] = []
    fork: list[float] = []
    async with daemon.client() as client:
        sum0 = count0 = 0.0
        for i in range(n + WARMUP):
            if i == WARMUP:
                sum0, count0 = _start_metric(daemon)
            t0 = time.perf_counter()
            status = await client.start([TRUE])
            t1 = time.perf_counter()
            await client.wait(status.id)
            t2 = time.perf_counter()
            proc = subprocess.Popen([TRUE])
            t3 = time.perf_counter()
            proc.wait()
            # The same start without the sandbox (an admin may ask), interleaved so both see
            # the same machine.
            t4 = time.perf_counter()
            unsandboxed = await client.start([TRUE], sandbox=False)
            t5 = time.perf_counter()
            await client.wait(unsandboxed.id)
            if i >= WARMUP:
                rpc.append((t1 - t0) * 1e3)
                fork.append((t3 - t2) * 1e3)
                bare.append((t5 - t4) * 1e3)
        sum1, count1 = _start_metric(daemon)
    library = await start_latency.measure(n)
    compiled = compileall.compile_dir(ROOT / "src" / "jobworker", quiet=1)
    if not compiled:
        raise SystemExit("bench: jobworker's modules did not compile")
    cli: list[float] = []
    python: list[float] = []
    cli_status: list[float] = []
    import_grpc: list[float] = []
    for _ in range(settings.cli_reps):
        cli.append(await asyncio.to_thread(_wall, daemon.cli("start", "--", "true")))
        python.append(await asyncio.to_thread(_wall, [sys.executable, "-c", "pass"]))
        cli_status.append(await asyncio.to_thread(_wall, daemon.cli("status", status.id)))
        import_grpc.append(await asyncio.to_thread(_wall, [sys.executable, "-c", "import grpc"]))
    out = {
        "start_p50_ms": median(rpc),
        "start_p99_ms": pct(rpc, 0.99),
        "fork_exec_p50_ms": median(fork),
        "fork_exec_p99_ms": pct(fork, 0.99),
        "start_ratio_vs_fork_exec": median(rpc) / median(fork),
        "start_unsandboxed_p50_ms": median(bare),
        "sandbox_start_added_p50_ms": median(rpc) - median(bare),
        "start_server_mean_ms": (sum1 - sum0) / (count1 - count0) * 1e3,
        "start_library_p50_ms": library["start_p50_ms"],
        "start_library_p99_ms": library["start_p99_ms"],
        "start_library_fork_exec_p50_ms": library["fork_exec_p50_ms"],
        "cli_start_wall_p50_ms": median(cli),
        "python_pass_wall_p50_ms": median(python),
        "cli_start_ratio_vs_python": median(cli) / median(python),
        "cli_status_p50_ms": median(cli_status),
        "python_import_grpc_p50_ms": median(import_grpc),
        "cli_status_ratio_vs_import_grpc": median(cli_status) / median(import_grpc),
    }
    log(
        f"start: RPC p50 {out['start_p50_ms']:.2f} ms sandboxed, "
        f"{out['start_unsandboxed_p50_ms']:.2f} ms without (daemon-side mean "
        f"{out['start_server_mean_ms']:.2f}, library p50 {out['start_library_p50_ms']:.2f}), "
        f"fork/exec p50 {out['fork_exec_p50_ms']:.2f} ms; `worker start -- true` "
        f"{out['cli_start_wall_p50_ms']:.0f} ms vs `python -c pass` "
        f"{out['python_pass_wall_p50_ms']:.0f} ms; `worker status ID` "
        f"{out['cli_status_p50_ms']:.0f} ms vs `python -c 'import grpc'` "
        f"{out['python_import_grpc_p50_ms']:.0f} ms"
    )
    return out
