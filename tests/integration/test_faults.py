"""Faults the daemon must survive without losing a byte or leaking a resource: SIGTERM and
SIGKILL with live jobs and followers, a follower that stops reading, and jobs that behave
oddly (close stdout early, no newlines, binary, exit at once, never exit).

What test_service_daemon.py already proves (one follower of a 6-byte job on SIGTERM, one
lost job after SIGKILL) is not repeated; these add volume, many followers, stubborn and
forking jobs, resumed followers, and the process, cgroup and temp-file accounting.
"""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness
from tests.integration import test_service_daemon as workerd_process

# isort: on
import asyncio
import contextlib
import hashlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from jobworker import JobManager, JobSpec, JobState, JobStatus
from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.client import Client
from jobworker.errors import ShuttingDown
from jobworker.server.daemon import Daemon, serve
from tests.conftest import JOB_PYTHON, wait_for

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
workerd = workerd_process.workerd
Workerd = workerd_process.Workerd
Connect = harness.Connect
pid_alive = workerd_process.pid_alive

BLOCK = 1 << 16

WRITER = """
import os, random, sys, time
rng = random.Random(int(sys.argv[1]))
fast, gate = int(sys.argv[2]), sys.argv[3]
out = sys.stdout.buffer
for i in range(fast):
    out.write(rng.randbytes(65536))
    if i == 0:
        out.flush()
        while gate and not os.path.exists(gate):
            time.sleep(0.005)
out.flush()
while True:  # then slowly, until stopped
    out.write(rng.randbytes(65536)[:4096])
    out.flush()
    time.sleep(0.01)
"""
"""Seeded random blocks (every byte value, no line structure): ``fast`` blocks at full speed
(after the first, once ``gate`` exists), then 4 KiB every 10 ms forever. The stream is
reproduced in the test with :func:`expected_stream`."""

FINITE_WRITER = """
import os, random, sys, time
rng = random.Random(int(sys.argv[1]))
blocks, gate = int(sys.argv[2]), sys.argv[3]
out = sys.stdout.buffer
out.write(rng.randbytes(65536))
out.flush()
while not os.path.exists(gate):
    time.sleep(0.005)
for _ in range(blocks - 1):
    out.write(rng.randbytes(65536))
"""


def expected_stream(seed: int, size: int, fast: int) -> bytes:
    rng = random.Random(seed)
    parts = [rng.randbytes(BLOCK) for _ in range(fast)]
    while sum(map(len, parts)) < size:
        parts.append(rng.randbytes(BLOCK)[:4096])
    return b"".join(parts)[:size]


def finite_digest(seed: int, blocks: int) -> str:
    rng = random.Random(seed)
    h = hashlib.sha256()
    for _ in range(blocks):
        h.update(rng.randbytes(BLOCK))
    return h.hexdigest()


COUNTER = 'trap "" TERM; i=0; while :; do i=$((i+1)); echo $i; sleep 0.01; done'
"""Ignores SIGTERM (its sleeps do not): only the kill after the grace period ends it."""
FORKER = (
    "(while :; do echo child; sleep 0.01; done) & setsid sh -c 'sleep 1000' & echo parent; wait"
)


@dataclass
class Follower:
    """A follow stream read in a task: every chunk's offset checked, bytes kept."""

    client: Client
    job_id: str
    offset: int = 0
    data: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None

    def start(self) -> Follower:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for offset, chunk in self.client.logs(self.job_id, follow=True, offset=self.offset):
            assert offset == self.offset + len(self.data), "a gap or a repeat"
            self.data += chunk

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


def job_pids(cgroup: Path, job_id: str) -> set[int]:
    try:
        return {int(p) for p in (cgroup / job_id / "cgroup.procs").read_text().split()}
    except FileNotFoundError:
        return set()


def tmp_files(state: Path) -> list[Path]:
    return sorted(state.rglob("*.tmp"))


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


# -- SIGTERM ---------------------------------------------------------------------------------


async def test_sigterm_with_live_jobs_and_followers(
    workerd: Workerd, pki_dir: Path, tmp_path: Path, cgroup_name: str
) -> None:
    """Three jobs — a fast-then-slow binary writer, one that ignores SIGTERM, one whose
    children fork and setsid — each with four followers (one resuming mid-stream) and a
    Wait. SIGTERM arrives while the followers are in the middle of 16 MiB. Every follower
    ends without error with exactly the bytes of the job's log, which is a prefix of what the
    job writes; every Wait says stopped; no process, cgroup or temp file is left."""
    cgroup = own_cgroup_dir() / cgroup_name
    state = tmp_path / "state"
    seed, fast = 7, 256
    clients = [Client.from_pki(workerd.address, pki_dir, u) for u in ("alice", "root", "vera")]
    alice = clients[0]
    try:
        gate = tmp_path / "gate"
        writer = await alice.start([JOB_PYTHON, "-c", WRITER, str(seed), str(fast), str(gate)])
        counter = await alice.start(["sh", "-c", COUNTER])
        forker = await alice.start(["sh", "-c", FORKER])
        jobs = [writer.id, counter.id, forker.id]
        followers = {j: [Follower(c, j).start() for c in clients] for j in jobs}
        waits = [asyncio.create_task(alice.wait(j)) for j in jobs]
        await wait_for(
            lambda: all(f.data for fs in followers.values() for f in fs),
            what="every follower's first bytes",
        )
        for j in jobs:  # a follower that resumes where another one is
            followers[j].append(Follower(alice, j, offset=len(followers[j][0].data)).start())
        gate.touch()
        await wait_for(
            lambda: all(len(f.data) > 4 * BLOCK for f in followers[writer.id]),
            what="the writer's followers to be mid-stream",
        )
        pids = {p for j in jobs for p in job_pids(cgroup, j)}
        assert len(pids) >= 5  # python, sh + sleep, sh + child sh + setsid sh + sleeps
        seen = {f.end for f in followers[writer.id]}
        workerd.proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(f.task for fs in followers.values() for f in fs if f.task))
        finals = await asyncio.gather(*waits)
    finally:
        for c in clients:
            await c.close()
    assert await workerd.proc.wait() == 0, workerd.log.read_text()
    assert "Traceback" not in workerd.log.read_text()
    assert [(s.id, s.state, s.reason) for s in finals] == [
        (j, JobState.STOPPED, "stopped: the job manager shut down") for j in jobs
    ]
    assert not cgroup.exists(), "the daemon left cgroups behind"
    assert [p for p in pids if pid_alive(p)] == []
    assert tmp_files(state) == []
    for j in jobs:
        log = (state / "jobs" / f"{j}.log").read_bytes()
        for f in followers[j]:
            assert sha(log[f.offset :]) == sha(f.data), f"a follower of {j} lost bytes"
    log = (state / "jobs" / f"{writer.id}.log").read_bytes()
    assert len(log) >= max(seen)
    assert log == expected_stream(seed, len(log), fast)
    counted = (state / "jobs" / f"{counter.id}.log").read_bytes()
    n = counted.count(b"\n")
    assert n > 0 and counted == "".join(f"{i}\n" for i in range(1, n + 1)).encode()


# -- SIGKILL ---------------------------------------------------------------------------------


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


async def test_sigkill_while_followers_stream_then_restart(
    workerd: Workerd, pki_dir: Path, tmp_path: Path, cgroup_name: str
) -> None:
    """SIGKILL while a binary writer and a forking job are followed and short jobs are being
    started and finished. Followers get an error (not a hang); after a restart on the same
    state they resume from their last offset and get exactly the rest. Finished jobs keep
    status and logs; running ones are lost, every process of theirs (and the old spawner)
    killed; no cgroup or temp file is left."""
    cgroup = own_cgroup_dir() / cgroup_name
    state = tmp_path / "state"
    seed, fast = 11, 64
    alice = Client.from_pki(workerd.address, pki_dir, "alice")
    try:
        done = await alice.start(["sh", "-c", "printf 'finished\\n'; exit 5"])
        done_final = await alice.wait(done.id)
        writer = await alice.start([JOB_PYTHON, "-c", WRITER, str(seed), str(fast), ""])
        forker = await alice.start(["sh", "-c", FORKER])
        followers = [Follower(alice, j).start() for j in (writer.id, writer.id, forker.id)]

        async def churn() -> None:
            while True:
                st = await alice.start(["sh", "-c", "echo churn"])
                await alice.wait(st.id)

        churner = asyncio.create_task(churn())
        await wait_for(
            lambda: len(followers[0].data) > fast * BLOCK and followers[2].data.count(b"child") > 2,
            what="followers mid-stream",
        )
        pids = job_pids(cgroup, writer.id) | job_pids(cgroup, forker.id)
        spawners = children_of(workerd.proc.pid)
        workerd.proc.kill()
        await workerd.proc.wait()
        for f in followers:
            assert f.task is not None
            with pytest.raises(ShuttingDown):
                await f.task
        with pytest.raises(ShuttingDown):
            await churner
    finally:
        await alice.close()
    assert any(pid_alive(p) for p in pids), "the jobs outlive the killed daemon until restart"
    d = await serve(harness.make_config(state, pki_dir, cgroup_name))
    try:
        async with Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice") as c:
            assert await c.status(done.id) == done_final
            assert b"".join([x async for _, x in c.logs(done.id)]) == b"finished\n"
            for j in (writer.id, forker.id):
                lost = await c.status(j)
                assert lost.state is JobState.LOST
                assert (
                    lost.reason == "the daemon stopped while the job was running; killed at restart"
                )
            for f in followers:
                resumed = Follower(c, f.job_id, offset=f.end).start()
                assert resumed.task is not None
                await resumed.task
                f.data += resumed.data
            for s in await c.list():
                assert s.state is not JobState.RUNNING
        await wait_for(
            lambda: not any(pid_alive(p) for p in pids | spawners),
            what="every process of the lost jobs and the old spawner to be gone",
        )
        assert [p.name for p in d.manager.cgroup_parent.iterdir() if p.is_dir()] == []
        assert tmp_files(state) == []
        log = (state / "jobs" / f"{writer.id}.log").read_bytes()
        assert log == expected_stream(seed, len(log), fast)
        for f in followers:
            assert sha(f.data) == sha((state / "jobs" / f"{f.job_id}.log").read_bytes())
    finally:
        await d.close()


# -- a follower that stops reading -----------------------------------------------------------

STALLED_FOLLOWER = """
import asyncio, hashlib, os, signal, sys
from pathlib import Path
from jobworker.client import Client

async def main():
    h, n = hashlib.sha256(), 0
    async with Client.from_pki(sys.argv[1], Path(sys.argv[2]), "alice") as c:
        async for offset, data in c.logs(sys.argv[3], follow=True):
            assert offset == n
            h.update(data)
            n += len(data)
            if n == len(data):
                print("reading", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)  # stops reading: its TCP window fills
    print(n, h.hexdigest(), flush=True)

asyncio.run(main())
"""


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def kib(value: str) -> int:
    number, unit = value.split()
    assert unit == "kB"
    return int(number)


async def test_stalled_follower_costs_bounded_memory_and_slows_no_one(
    workerd: Workerd, pki_dir: Path, tmp_path: Path
) -> None:
    """A job writes 256 MiB while one follower, a separate process, is stopped (SIGSTOP: it
    reads nothing, its TCP window and socket buffers fill) and another reads normally. The
    normal follower gets every byte while the stalled one is still stopped; the daemon's peak
    RSS (VmHWM, reset before the bulk) grows by far less than what was written; resumed, the
    stalled follower gets every byte too."""
    seed, blocks = 3, 256
    gate = tmp_path / "gate"
    expected = finite_digest(seed, blocks)
    async with Client.from_pki(workerd.address, pki_dir, "alice") as alice:
        st = await alice.start([JOB_PYTHON, "-c", FINITE_WRITER, str(seed), str(blocks), str(gate)])
        stalled = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            STALLED_FOLLOWER,
            workerd.address,
            str(pki_dir),
            st.id,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert stalled.stdout is not None
            assert await stalled.stdout.readline() == b"reading\n"
            await wait_for(
                lambda: proc_status(stalled.pid)["State"].startswith("T"),
                what="the stalled follower to stop",
            )
            daemon_pid = workerd.proc.pid
            Path(f"/proc/{daemon_pid}/clear_refs").write_text("5")  # reset VmHWM
            before = kib(proc_status(daemon_pid)["VmRSS"])
            h, n = hashlib.sha256(), 0
            gate.touch()
            async for offset, data in alice.logs(st.id, follow=True):
                assert offset == n
                h.update(data)
                n += len(data)
            final = await alice.wait(st.id)
            peak = kib(proc_status(daemon_pid)["VmHWM"])
            assert (n, h.hexdigest()) == (blocks * BLOCK, expected)
            assert (final.exit_code, final.output_bytes) == (0, blocks * BLOCK)
            assert proc_status(stalled.pid)["State"].startswith("T"), "still stalled"
            growth = peak - before
            print(f"daemon RSS {before} KiB, peak {peak} KiB: +{growth} KiB for 256 MiB")
            assert growth < 64 * 1024, f"the daemon grew by {growth} KiB"
            stalled.send_signal(signal.SIGCONT)
            out, _ = await stalled.communicate()
            assert out.split() == [str(blocks * BLOCK).encode(), expected.encode()]
            assert stalled.returncode == 0
        finally:
            if stalled.returncode is None:
                stalled.kill()
                stalled.send_signal(signal.SIGCONT)
                await stalled.wait()


# -- jobs that behave oddly ------------------------------------------------------------------


async def collect(client: Client, job_id: str) -> bytes:
    return b"".join([data async for _, data in client.logs(job_id, follow=True)])


def holds(target: str) -> bool:
    """Whether this process (the in-process daemon) has an fd open on ``target``."""
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                return True
    return False


async def test_job_that_closes_stdout_early(connect: Connect, tmp_path: Path) -> None:
    """The pipe's EOF is not the end of the job: once the daemon has let go of the job's
    output pipe (it read the EOF), the follower still waits until the job has ended, then
    ends with every byte, and the status it then reads says ended."""
    alice = connect("alice")
    closing, ending = tmp_path / "closing", tmp_path / "ending"
    script = (
        f'printf before; while [ ! -e "{closing}" ]; do sleep 0.01; done; exec >&- 2>&-; '
        f'while [ ! -e "{ending}" ]; do sleep 0.01; done'
    )
    st = await alice.start(["sh", "-c", script])
    stream = alice.logs(st.id, follow=True)
    assert await anext(stream) == (0, b"before")
    # A sandboxed job's pid is its namespace's init; the shell is the init's one child.
    (main,) = Path(f"/proc/{st.pid}/task/{st.pid}/children").read_text().split()
    pipe = os.readlink(f"/proc/{main}/fd/1")
    assert pipe.startswith("pipe:") and holds(pipe)
    follower = asyncio.create_task(collect_rest(stream))
    closing.touch()
    await wait_for(lambda: not holds(pipe), what="the daemon to read the pipe's EOF")
    assert (await alice.status(st.id)).state is JobState.RUNNING
    assert not follower.done(), "the follower ended while the job still runs"
    ending.touch()
    assert await follower == b""
    final = await alice.status(st.id)
    assert (final.state, final.exit_code, final.output_bytes) == (JobState.EXITED, 0, 6)


async def collect_rest(stream: AsyncIterator[tuple[int, bytes]]) -> bytes:
    return b"".join([data async for _, data in stream])


async def test_output_without_newlines_is_delivered_live(connect: Connect, tmp_path: Path) -> None:
    """Bytes without a newline reach a follower while the job runs (nothing waits for a line),
    and 3 MB of one endless line arrives whole."""
    alice = connect("alice")
    gate = tmp_path / "gate"
    script = (
        f'printf abc; while [ ! -e "{gate}" ]; do sleep 0.01; done; '
        "head -c 3000000 /dev/zero | tr '\\0' x"
    )
    st = await alice.start(["sh", "-c", script])
    stream = alice.logs(st.id, follow=True)
    assert await anext(stream) == (0, b"abc")
    gate.touch()
    rest = b"".join([data async for _, data in stream])
    assert sha(rest) == sha(b"x" * 3_000_000)


async def test_binary_output_through_the_service(connect: Connect, tmp_path: Path) -> None:
    """8 MiB of random bytes (NULs, invalid UTF-8, no lines) to four followers of three roles:
    each gets the same sha256 as the bytes computed here."""
    seed, blocks = 5, 128
    gate = tmp_path / "gate"
    alice = connect("alice")
    st = await alice.start([JOB_PYTHON, "-c", FINITE_WRITER, str(seed), str(blocks), str(gate)])
    readers = [connect(u) for u in ("alice", "root", "vera", "vera")]
    tasks = [asyncio.create_task(collect(c, st.id)) for c in readers]
    gate.touch()
    digests = {sha(data) for data in await asyncio.gather(*tasks)}
    assert digests == {finite_digest(seed, blocks)}


async def test_jobs_that_exit_at_once(daemon: Daemon, connect: Connect) -> None:
    """A job that is gone before anyone looks: followers, waits and stops sent right after the
    start all get its end (a stop of an exiting job is not an error), 100 times over."""
    alice = connect("alice")
    for i in range(100):
        argv = ["true"] if i % 2 else ["printf", str(i)]
        st = await alice.start(argv)
        followed, waited, stopped = await asyncio.gather(
            collect(alice, st.id), alice.wait(st.id), alice.stop(st.id, grace=0)
        )
        assert waited == stopped == await alice.status(st.id)
        assert len(followed) == stopped.output_bytes
        if stopped.state is JobState.EXITED:
            assert (stopped.exit_code, followed) == (0, b"" if i % 2 else str(i).encode())
        else:  # the stop came before the daemon saw the end: SIGTERM then, with no grace,
            # SIGKILL at once; either may be what ended it, maybe before it wrote
            assert (stopped.state, stopped.reason) == (JobState.STOPPED, "stopped by alice")
            assert stopped.signal in (signal.SIGTERM, signal.SIGKILL) or stopped.exit_code == 0
    assert [p for p in daemon.manager.cgroup_parent.iterdir() if p.is_dir()] == []


async def test_stop_racing_the_jobs_own_end(manager: JobManager) -> None:
    """A stop that lands while the job's group empties and is removed under it (the freeze
    waits on a group that vanishes) returns the final status; it used to raise
    LimitUnavailable ("no cgroup.freeze") about 1 time in 70. Each round sends eight stops,
    0 to 7 loop turns after the start, to move them across that window."""

    async def stop_after(job_id: str, turns: int) -> JobStatus:
        for _ in range(turns):
            await asyncio.sleep(0)
        return await manager.stop(job_id, grace=0)

    for _ in range(150):
        st = await manager.start(JobSpec(argv=("true",)))
        finals = await asyncio.gather(*(stop_after(st.id, k) for k in range(8)))
        assert {f.state for f in finals} <= {JobState.EXITED, JobState.STOPPED}
        assert set(finals) == {manager.status(st.id)}


@pytest.mark.parametrize(
    "script",
    ["exec sleep infinity", 'trap "" TERM; while :; do :; done', COUNTER],
    ids=["sleeps", "spins-ignoring-term", "ignores-term"],
)
async def test_jobs_that_never_exit_are_stopped(connect: Connect, script: str) -> None:
    """Stop ends a job that would run forever, also one that ignores SIGTERM (killed after the
    grace period); its followers end with what it wrote."""
    alice = connect("alice")
    st = await alice.start(["sh", "-c", script])
    follower = asyncio.create_task(collect(alice, st.id))
    final = await alice.stop(st.id, grace=0.2)
    assert final.state is JobState.STOPPED and final.signal in (signal.SIGTERM, signal.SIGKILL)
    assert final.reason == "stopped by alice"
    assert len(await follower) == final.output_bytes
