"""Limits that really bite, through the library's real JobManager on a pure cgroup v2 kernel."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobworker import IOLimit, JobManager, JobSpec, JobState, JobStatus, Limits, Sandbox
from jobworker.cgroup import fs
from jobworker.cgroup import io as cgio

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


def scratch_disk() -> str:
    """``MAJ:MIN`` of the VM's scratch disk /dev/vda (mounted at /scratch); skip without one."""
    vda = Path("/dev/vda")
    if not vda.is_block_device() or not Path("/scratch").is_mount():
        pytest.skip("no scratch disk (/dev/vda at /scratch): JW_VM_DISK_MB=0?")
    rdev = vda.stat().st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


GATE = 'read -r _ < "$1" || :'
"""Shell for a job to wait at a gate (a FIFO, ``$1``) until the test lets it go on."""


@contextlib.asynccontextmanager
async def job_at_gate(manager: JobManager, job_id: str, gate: Path) -> AsyncIterator[None]:
    """Wait until the job is blocked reading the FIFO ``gate`` (see :data:`GATE`), keep it
    there while the body runs (its cgroup can be read), then let it go on (EOF on the FIFO).

    A writer's non-blocking open succeeds only once a reader has the FIFO open, so the open
    itself tells us the job has arrived.
    """
    fd = -1

    def arrived() -> bool:
        nonlocal fd
        st = manager.status(job_id)
        if st.state is not JobState.RUNNING:
            pytest.fail(f"the job ended before reaching its gate: {st}")
        try:
            fd = os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:
                raise
            return False
        return True

    await wait_until(arrived, 60, "the job to reach its gate")
    try:
        yield
    finally:
        os.close(fd)


def elapsed_s(out: bytes) -> float:
    """The nanoseconds a job printed last (it times its own dd), in seconds."""
    return int(out.decode().split()[-1]) / 1e9


TIMED = "t0=$(date +%s%N); {} status=none || exit 1; echo $(( $(date +%s%N) - t0 ))"
"""A job that times its own dd, so process start-up under emulation does not count."""


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


ALLOC_40M = "x = b'x' * (40 * 2**20)"
"""40 MiB the interpreter really touches (bytes are filled; a bytearray would be lazy zeros)."""


@contextlib.contextmanager
def swap_file(path: Path, size: int) -> Iterator[None]:
    """A swap file, on for the body: the VM has no swap of its own, so without one the swap
    test could not tell "swap is off for the job" from "there is nothing to swap to"."""
    try:
        with path.open("wb") as f:
            for _ in range(size // MiB):
                f.write(bytes(MiB))
            os.fsync(f.fileno())
        path.chmod(0o600)
        subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
        subprocess.run(["swapon", str(path)], check=True, capture_output=True)
        try:
            yield
        finally:
            subprocess.run(["swapoff", str(path)], check=True, capture_output=True)
    finally:
        path.unlink(missing_ok=True)


async def swap_used_without_the_library(parent: Path, memory_max: int) -> tuple[int, int]:
    """Control: the same 40 MiB under the same memory.max in a group the test makes itself,
    whose memory.swap.max is the kernel's default ("max"). Returns (exit status, swap bytes the
    process saw in its group while holding its 40 MiB)."""
    ctl = parent / "swap-control"
    ctl.mkdir()
    try:
        fs.write(ctl, "memory.max", str(memory_max))
        assert fs.read(ctl, "memory.swap.max").strip() == "max"
        report = ALLOC_40M + "; import sys; print(open(sys.argv[1]).read().strip())"
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            'echo $$ > "$1/cgroup.procs" && exec "$2" -c "$3" "$1/memory.swap.current"',
            "_",
            str(ctl),
            sys.executable,
            report,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode is not None
        await wait_until(
            lambda: fs.parse_flat_keyed(fs.read(ctl, "cgroup.events")).get("populated") == 0,
            10,
            "the control group to empty",
        )
        return proc.returncode, int(out.decode().split()[-1]) if proc.returncode == 0 else 0
    finally:
        ctl.rmdir()


async def test_memory_limit_turns_swap_off(
    manager: JobManager, tmp_path: Path, figure: dict[str, str]
) -> None:
    scratch_disk()
    limit = 32 * MiB
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    # 48 MiB holds all of the control's anonymous memory (40 MiB and the interpreter's own), so
    # the control cannot run out of swap however eagerly the kernel swaps.
    with swap_file(Path("/scratch") / f"swap-{time.monotonic_ns()}", 48 * MiB):
        ctl_rc, ctl_swap = await swap_used_without_the_library(manager.cgroup_parent, limit)
        st = await manager.start(
            JobSpec(
                argv=(
                    "sh",
                    "-c",
                    GATE + '; exec "$2" -c "$3"',
                    "_",
                    str(gate),
                    sys.executable,
                    ALLOC_40M,
                ),
                limits=Limits(memory=limit),
            )
        )
        group = manager.cgroup_parent / st.id
        async with job_at_gate(manager, st.id, gate):
            swap_max = fs.read(group, "memory.swap.max").strip()
            memory_max = fs.read(group, "memory.max").strip()
        st = await manager.wait(st.id)
    figure["memory.max 32M, 40M allocation, 48M swap file on"] = (
        f"control group (swap.max=max): rc={ctl_rc} swap.current={ctl_swap / MiB:.1f}M; "
        f"job: memory.swap.max={swap_max} oom_killed={st.oom_killed} signal={st.signal}"
    )
    # The control proves swap was there to use: 40 MiB in 32 MiB lives only by swapping.
    assert ctl_rc == 0, "the control was killed: the swap file did not take the overflow"
    assert ctl_swap >= 8 * MiB, f"the control swapped only {ctl_swap} bytes"
    assert memory_max == str(limit)
    assert swap_max == "0"
    assert st.oom_killed, st
    assert st.signal == 9 and st.exit_code is None, st


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


async def test_cpu_weight_shares_one_cpu_one_to_four(
    manager: JobManager, figure: dict[str, str]
) -> None:
    busy = ("taskset", "-c", "0", "sh", "-c", "while :; do :; done")  # both on CPU 0
    light = await manager.start(JobSpec(argv=busy, limits=Limits(cpu_weight=100)))
    heavy = await manager.start(JobSpec(argv=busy, limits=Limits(cpu_weight=400)))
    ids = (light.id, heavy.id)

    def cpu_usec(job_id: str) -> int:
        usage = manager.status(job_id).usage
        assert usage is not None
        return usage.cpu_user_usec + usage.cpu_system_usec

    procs = [Path(f"/proc/{manager.status(i).pid}") for i in ids]
    # taskset sets the affinity, then execs the loop: once both are "sh", both are pinned.
    await wait_until(
        lambda: all((p / "comm").read_text().strip() == "sh" for p in procs),
        30,
        "taskset to exec both busy loops",
    )
    pinned = [
        next(
            line.split()[1]
            for line in (p / "status").read_text().splitlines()
            if line.startswith("Cpus_allowed_list:")
        )
        for p in procs
    ]
    weights = [fs.read(manager.cgroup_parent / i, "cpu.weight").strip() for i in ids]
    a0, b0, t0 = cpu_usec(light.id), cpu_usec(heavy.id), time.monotonic()
    await asyncio.sleep(3.0)  # the measuring window itself, not a wait for a condition
    a1, b1, t1 = cpu_usec(light.id), cpu_usec(heavy.id), time.monotonic()
    finals = [await manager.stop(i) for i in ids]
    window_usec = (t1 - t0) * 1e6
    light_share, heavy_share = (a1 - a0) / window_usec, (b1 - b0) / window_usec
    ratio = heavy_share / max(light_share, 1e-9)
    figure["cpu.weight 100 vs 400, two busy loops on CPU 0 over 3 s"] = (
        f"{light_share * 100:.1f} % vs {heavy_share * 100:.1f} % of a CPU, ratio {ratio:.2f}"
    )
    assert pinned == ["0", "0"], f"the jobs were not pinned to CPU 0: {pinned}"
    assert weights == ["100", "400"]
    # Both compete for one CPU: together they get about all of it, never more.
    assert 0.5 <= light_share + heavy_share <= 1.1, "the two jobs did not share one CPU"
    assert 2.5 <= ratio <= 6.0, f"weights 100:400 gave a usage ratio of {ratio:.2f}, not ~4"
    assert all(f.state is JobState.STOPPED for f in finals)


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
    # A lower bound only: the cap makes it at least this slow; how much slower a loaded
    # TCG guest is says nothing about the cap.
    assert took >= 3.0, f"8 MiB at 2 MiB/s took {took:.2f}s: not throttled"


async def test_io_read_limit_throttles_direct_reads(
    manager: JobManager, figure: dict[str, str]
) -> None:
    scratch_disk()
    dd = "dd if=/dev/vda of=/dev/null bs=1M count=8 iflag=direct"
    spec = JobSpec(
        argv=("sh", "-c", TIMED.format(dd)),
        limits=Limits(io=(IOLimit("/dev/vda", read_bps=2 * MiB),)),
    )
    st = await manager.start(spec)
    st = await manager.wait(st.id)
    assert st.exit_code == 0, st
    assert st.usage is not None
    took = elapsed_s(b"".join([chunk async for chunk in manager.output(st.id)]))
    figure["io rbps=2M on /dev/vda, 8 MiB O_DIRECT"] = (
        f"dd took {took:.2f} s, io.stat rbytes={st.usage.io_read_bytes / MiB:.1f}M"
    )
    assert st.usage.io_read_bytes >= 8 * MiB
    # 8 MiB at 2 MiB/s is 4 s; the kernel lets a short burst through before throttling.
    # A lower bound only: the cap makes it at least this slow; how much slower a loaded
    # TCG guest is says nothing about the cap.
    assert took >= 3.0, f"8 MiB at 2 MiB/s took {took:.2f}s: not throttled"


IOPS_OPS = 200
"""4 KiB O_DIRECT operations per IOPS test: 4 s at 50 IOPS."""


async def run_iops_job(
    manager: JobManager, gate: Path, dd: str, limit: IOLimit, device: str
) -> tuple[JobStatus, float, dict[str, int]]:
    """Run a timed dd under ``limit``; read the job's io.stat for ``device`` after the dd, while
    the job waits at its gate (the group is gone once the job ends)."""
    os.mkfifo(gate)
    st = await manager.start(
        JobSpec(
            argv=("sh", "-c", TIMED.format(dd) + "; " + GATE, "_", str(gate)),
            limits=Limits(io=(limit,)),
        )
    )
    async with job_at_gate(manager, st.id, gate):
        counters = cgio.parse_stat(fs.read(manager.cgroup_parent / st.id, "io.stat"))
    st = await manager.wait(st.id)
    assert st.exit_code == 0, st
    took = elapsed_s(b"".join([chunk async for chunk in manager.output(st.id)]))
    return st, took, counters.get(device, {})


async def test_io_read_iops_limit_throttles_small_direct_reads(
    manager: JobManager, tmp_path: Path, figure: dict[str, str]
) -> None:
    device = scratch_disk()
    dd = f"dd if=/dev/vda of=/dev/null bs=4k count={IOPS_OPS} iflag=direct"
    _, took, stat = await run_iops_job(
        manager, tmp_path / "gate", dd, IOLimit("/dev/vda", read_iops=50), device
    )
    rios = stat.get("rios", 0)
    figure[f"io riops=50 on /dev/vda, {IOPS_OPS} x 4 KiB O_DIRECT reads"] = (
        f"dd took {took:.2f} s, io.stat rios={rios} rbytes={stat.get('rbytes', 0)}"
    )
    # Each 4 KiB O_DIRECT read is one request (a few more would be the kernel's own).
    assert IOPS_OPS <= rios <= IOPS_OPS + 10, stat
    # 200 operations at 50/s is 4 s.
    assert took >= 3.0, f"{IOPS_OPS} reads at 50 IOPS took {took:.2f}s: not throttled"


async def test_io_write_iops_limit_throttles_small_direct_writes(
    manager: JobManager, tmp_path: Path, figure: dict[str, str]
) -> None:
    device = scratch_disk()
    target = Path("/scratch") / f"iops-{time.monotonic_ns()}"
    # Written and synced by the test (not the job), so the job's writes overwrite allocated
    # blocks: one request each, no block allocation on the way.
    with target.open("wb") as f:
        f.write(bytes(IOPS_OPS * 4096))
        os.fsync(f.fileno())
    dd = f"dd if=/dev/zero of={target} bs=4k count={IOPS_OPS} oflag=direct conv=notrunc"
    try:
        _, took, stat = await run_iops_job(
            manager, tmp_path / "gate", dd, IOLimit("/dev/vda", write_iops=50), device
        )
    finally:
        target.unlink(missing_ok=True)
    wios = stat.get("wios", 0)
    figure[f"io wiops=50 on /dev/vda, {IOPS_OPS} x 4 KiB O_DIRECT writes"] = (
        f"dd took {took:.2f} s, io.stat wios={wios} wbytes={stat.get('wbytes', 0)}"
    )
    assert IOPS_OPS <= wios <= IOPS_OPS + 10, stat
    assert took >= 3.0, f"{IOPS_OPS} writes at 50 IOPS took {took:.2f}s: not throttled"


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


async def test_pids_one_and_two(manager: JobManager, figure: dict[str, str]) -> None:
    """The smallest task limits that work: pids=1 for a plain job (it is forked: the spawner
    cannot step into a group with no room for itself), pids=2 for a sandboxed one (its init
    counts)."""
    plain = await manager.start(JobSpec(argv=("true",), limits=Limits(pids=1)))
    plain = await manager.wait(plain.id)
    assert plain.exit_code == 0, plain
    boxed = await manager.start(JobSpec(argv=("true",), limits=Limits(pids=2), sandbox=Sandbox()))
    boxed = await manager.wait(boxed.id)
    assert boxed.exit_code == 0, boxed
    figure["pids 1 (plain) / 2 (sandboxed)"] = f"exit {plain.exit_code} / {boxed.exit_code}"
