"""Limits that really bite, through the library's real JobManager on a pure cgroup v2 kernel."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from jobworker import IOLimit, JobManager, JobSpec, JobState, Limits
from jobworker.cgroup import fs

pytestmark = pytest.mark.kernel

MiB = 1 << 20


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    """Poll a condition the kernel gives us no event for; the bound is a safety net."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_memory_limit_oom_kills_the_job(manager: JobManager, figure: dict[str, str]) -> None:
    spec = JobSpec(
        argv=(sys.executable, "-c", "x = b'x' * (200 * 2**20)"), limits=Limits(memory=50 * MiB)
    )
    st = await manager.start(spec)
    st = await manager.wait(st.id)
    assert st.state is JobState.EXITED
    assert st.oom_killed, st
    assert st.signal == 9 and st.exit_code is None, st
    assert st.usage is not None
    peak = st.usage.memory_peak
    figure["memory.max 50M, 200M allocation"] = (
        f"oom_killed={st.oom_killed} signal={st.signal} "
        f"peak={'n/a' if peak is None else f'{peak / MiB:.1f}M'}"
    )
    # The VM's kernel (Debian 12, 6.1) has memory.peak (5.19+): a missing peak is a bug here.
    assert peak is not None, "status has no memory peak on a kernel with memory.peak"
    # The job is killed when a charge would take it over the limit: its peak is the limit, or a
    # few pages under it. A peak far under it would mean the job died of something else.
    assert 40 * MiB <= peak <= 50 * MiB, f"memory peak {peak / MiB:.1f}M"


async def test_cpu_limit_gives_a_fifth_of_a_cpu(
    manager: JobManager, figure: dict[str, str]
) -> None:
    st = await manager.start(
        JobSpec(argv=("sh", "-c", "while :; do :; done"), limits=Limits(cpu=0.2))
    )

    def cpu_usec() -> int:
        usage = manager.status(st.id).usage
        assert usage is not None
        return usage.cpu_user_usec + usage.cpu_system_usec

    await wait_until(lambda: cpu_usec() > 0, 10, "the busy loop to run")
    u0, t0 = cpu_usec(), time.monotonic()
    await asyncio.sleep(3.0)  # the measuring window itself, not a wait for a condition
    u1, t1 = cpu_usec(), time.monotonic()
    usage = manager.status(st.id).usage
    assert usage is not None
    final = await manager.stop(st.id)
    share = (u1 - u0) / ((t1 - t0) * 1e6)
    figure["cpu 0.2 cores, busy loop over 3 s"] = (
        f"{share * 100:.1f} % of a CPU, nr_throttled={usage.nr_throttled}"
    )
    assert 0.15 <= share <= 0.25, f"busy job got {share:.1%} of a CPU"
    assert usage.nr_throttled > 0
    assert final.state is JobState.STOPPED


async def test_io_write_limit_throttles_direct_writes(
    manager: JobManager, figure: dict[str, str]
) -> None:
    if not Path("/dev/vda").is_block_device() or not Path("/scratch").is_mount():
        pytest.skip("no scratch disk (/dev/vda at /scratch): JW_VM_DISK_MB=0?")
    target = Path("/scratch") / f"io-{time.monotonic_ns()}"
    # The job times its own dd, so process start-up under emulation does not count.
    script = (
        't0=$(date +%s%N); dd if=/dev/zero of="$1" bs=1M count=8 oflag=direct status=none'
        " || exit 1; echo $(( $(date +%s%N) - t0 ))"
    )
    spec = JobSpec(
        argv=("sh", "-c", script, "_", str(target)),
        limits=Limits(io=(IOLimit("/dev/vda", write_bps=2 * MiB),)),
    )
    try:
        t0 = time.monotonic()
        st = await manager.start(spec)
        st = await manager.wait(st.id)
        whole = time.monotonic() - t0
    finally:
        target.unlink(missing_ok=True)
    assert st.exit_code == 0, st
    assert st.usage is not None
    out = b"".join([chunk async for chunk in manager.output(st.id)])
    took = int(out.decode().split()[-1]) / 1e9
    figure["io wbps=2M on /dev/vda, 8 MiB O_DIRECT"] = (
        f"dd took {took:.2f} s (job start to end {whole:.2f} s), "
        f"io.stat wbytes={st.usage.io_write_bytes / MiB:.1f}M"
    )
    assert st.usage.io_write_bytes >= 8 * MiB
    # 8 MiB at 2 MiB/s is 4 s; the kernel lets a short burst through before throttling.
    assert 3.0 <= took <= 7.0, f"8 MiB at 2 MiB/s took {took:.2f}s"


FORK_BOMB = """
import os, time
while True:
    try:
        os.fork()  # parent and child both go on forking
    except OSError:
        time.sleep(0.01)
"""


async def test_pids_limit_holds_a_fork_bomb(manager: JobManager, figure: dict[str, str]) -> None:
    st = await manager.start(
        JobSpec(argv=(sys.executable, "-c", FORK_BOMB), limits=Limits(pids=16))
    )
    group = manager.cgroup_parent / st.id

    def refused() -> int:
        return fs.parse_flat_keyed(fs.read(group, "pids.events")).get("max", 0)

    await wait_until(lambda: refused() > 0, 30, "a fork to be refused by pids.max")
    usage = manager.status(st.id).usage
    assert usage is not None
    assert usage.pids_current <= 16
    n_refused = refused()
    t0 = time.monotonic()
    final = await manager.stop(st.id)
    took = time.monotonic() - t0
    figure["pids 16, fork bomb"] = (
        f"pids.current={usage.pids_current}, forks refused={n_refused}, stopped in {took:.2f} s"
    )
    assert final.state is JobState.STOPPED
    assert not group.exists()
