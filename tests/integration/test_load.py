"""Load against a real in-process daemon over mutual TLS: many followers of one job, many jobs
running at once, many jobs one after another. Every follower's bytes are checked by sha256
against what the test computes itself, and afterwards the daemon's fds, threads, asyncio tasks
and job cgroups are back to where they were.

Each test runs at CI size in ``make test`` and at full size (1000 followers, 500 jobs, 10 000
jobs) behind the ``stress`` marker (``make stress``). Loopback only; the time bounds of
:func:`wait_for` are safety nets, not assertions.
"""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import asyncio
import fcntl
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jobworker import JobState
from jobworker.client import Client
from jobworker.server.daemon import Daemon
from tests.conftest import JOB_PYTHON, open_fds, wait_for

pki_dir, daemon = harness.pki_dir, harness.daemon

STREAMS_PER_CHANNEL = 50
"""Followers share a connection this many at a time (a connection may cap its streams)."""


@dataclass(frozen=True)
class Snapshot:
    fds: frozenset[int]
    threads: frozenset[str]
    tasks: int
    groups: tuple[str, ...]


def snapshot(d: Daemon) -> Snapshot:
    return Snapshot(
        frozenset(open_fds()),
        frozenset(harness.new_threads(set())),
        len(harness.other_tasks()),
        tuple(sorted(p.name for p in d.manager.cgroup_parent.iterdir() if p.is_dir())),
    )


@pytest.fixture
async def clients(daemon: Daemon, pki_dir: Path) -> AsyncIterator[list[Client]]:
    """A pool of connections as alice (filled by the test), closed at the end; then fds,
    threads, tasks and job groups must come back to the baseline taken after one warm-up
    connection (grpc starts its poller thread and some fds on first use)."""
    address = f"127.0.0.1:{daemon.port}"
    async with Client.from_pki(address, pki_dir, "alice") as warm:
        st = await warm.start(["true"])
        await warm.wait(st.id)
        assert [x async for x in warm.logs(st.id, follow=True)] == []
    before = snapshot(daemon)
    pool: list[Client] = []
    try:
        yield pool
    finally:
        for c in pool:
            await c.close()
    now = [before]

    def back() -> bool:
        # Fewer fds than the baseline is fine: the warm-up connection may still have been
        # closing when it was taken.
        a = now[0] = snapshot(daemon)
        return (
            a.fds <= before.fds
            and a.threads <= before.threads
            and a.tasks <= before.tasks
            and a.groups == before.groups == ()
        )

    try:
        await wait_for(back, timeout=30, what="the baseline")
    except pytest.fail.Exception:
        after = now[0]
        pytest.fail(
            f"not back to the baseline: new fds {sorted(after.fds - before.fds)}, "
            f"new threads {sorted(after.threads - before.threads)}, "
            f"tasks {before.tasks} -> {after.tasks}, job groups {len(after.groups)}"
        )


def connect_pool(pool: list[Client], daemon: Daemon, pki_dir: Path, n: int) -> None:
    for _ in range(n):
        pool.append(Client.from_pki(f"127.0.0.1:{daemon.port}", pki_dir, "alice"))


WRITER = """
import fcntl, random, sys
rng = random.Random(int(sys.argv[1]))
out = sys.stdout.buffer
out.write(rng.randbytes(4096))
out.flush()
with open(sys.argv[3]) as gate:
    fcntl.flock(gate, fcntl.LOCK_SH)
for _ in range(int(sys.argv[2])):
    out.write(rng.randbytes(65536))
"""
"""4 KiB, then (once the test releases its lock on the gate file) ``blocks`` blocks of 64 KiB."""


def writer_digest(seed: int, blocks: int) -> tuple[int, str]:
    rng = random.Random(seed)
    h = hashlib.sha256(rng.randbytes(4096))
    for _ in range(blocks):
        h.update(rng.randbytes(65536))
    return 4096 + blocks * 65536, h.hexdigest()


class Gate:
    """A file the test holds an exclusive flock on; jobs block in ``flock -s`` until
    :meth:`open` (no polling, no race with jobs that arrive late)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.touch()
        self._f = path.open()
        fcntl.flock(self._f, fcntl.LOCK_EX)

    def open(self) -> None:
        self._f.close()


async def follow(client: Client, job_id: str, first: asyncio.Event | None = None) -> str:
    h, n = hashlib.sha256(), 0
    async for offset, data in client.logs(job_id, follow=True):
        assert offset == n
        h.update(data)
        n += len(data)
        if first is not None:
            first.set()
    return f"{n}:{h.hexdigest()}"


def sizes(ci: int, full: int) -> list[object]:
    return [
        pytest.param(ci, id=f"ci-{ci}"),
        pytest.param(full, id=f"full-{full}", marks=pytest.mark.stress),
    ]


@pytest.mark.parametrize("followers", sizes(200, 1000))
async def test_many_followers_of_one_job(
    daemon: Daemon, pki_dir: Path, clients: list[Client], tmp_path: Path, followers: int
) -> None:
    """``followers`` streams over ⌈followers / 50⌉ connections, all attached before the job
    writes its 1 MiB: each gets every byte, in order."""
    seed, blocks = 17, 16
    connect_pool(clients, daemon, pki_dir, -(-followers // STREAMS_PER_CHANNEL))
    gate = Gate(tmp_path / "gate")
    st = await clients[0].start([JOB_PYTHON, "-c", WRITER, str(seed), str(blocks), str(gate.path)])
    started = [asyncio.Event() for _ in range(followers)]
    tasks = [
        asyncio.create_task(follow(clients[i % len(clients)], st.id, started[i]))
        for i in range(followers)
    ]
    await wait_for(
        lambda: all(e.is_set() for e in started), timeout=120, what="every follower's first bytes"
    )
    assert daemon.metrics.followers._value.get() == followers
    gate.open()
    results = await asyncio.gather(*tasks)
    size, digest = writer_digest(seed, blocks)
    assert set(results) == {f"{size}:{digest}"}
    assert (await clients[0].wait(st.id)).exit_code == 0


JOB = 'echo "job $1 ready"; flock -s "$2" true; seq "$1" "$(($1 + 3000))"'


def job_output(i: int) -> bytes:
    return f"job {i} ready\n".encode() + "".join(f"{k}\n" for k in range(i, i + 3001)).encode()


@pytest.mark.parametrize("jobs", sizes(100, 500))
async def test_many_jobs_running_at_once(
    daemon: Daemon, pki_dir: Path, clients: list[Client], tmp_path: Path, jobs: int
) -> None:
    """``jobs`` jobs all running at the same moment (each blocked on the gate, each in its own
    cgroup), each with a follower; then all released: every follower gets exactly its job's
    ~17 KB and every job exits 0."""
    connect_pool(clients, daemon, pki_dir, max(1, jobs // STREAMS_PER_CHANNEL))
    gate = Gate(tmp_path / "gate")

    async def run(i: int) -> tuple[str, str]:
        c = clients[i % len(clients)]
        st = await c.start(["sh", "-c", JOB, "sh", str(i), str(gate.path)])
        return st.id, await follow(c, st.id)

    tasks = [asyncio.create_task(run(i)) for i in range(jobs)]
    parent = daemon.manager.cgroup_parent
    await wait_for(
        lambda: (
            len(daemon.manager.list()) == jobs + 1
            and all(
                s.output_bytes >= len(f"job {s.argv[4]} ready\n") for s in daemon.manager.list()[1:]
            )
        ),
        timeout=180,
        what="every job to be running and ready",
    )
    running = [s for s in daemon.manager.list() if s.state is JobState.RUNNING]
    assert len(running) == jobs
    assert len([p for p in parent.iterdir() if p.is_dir()]) == jobs
    gate.open()
    results = await asyncio.gather(*tasks)
    for i, (_, got) in enumerate(results):
        expected = job_output(i)
        assert got == f"{len(expected)}:{hashlib.sha256(expected).hexdigest()}", f"job {i}"
    finals = await asyncio.gather(*(clients[0].wait(job_id) for job_id, _ in results))
    assert {(f.state, f.exit_code) for f in finals} == {(JobState.EXITED, 0)}


@pytest.mark.parametrize("jobs", sizes(1000, 10_000))
async def test_jobs_churned(
    daemon: Daemon, pki_dir: Path, clients: list[Client], jobs: int
) -> None:
    """``jobs`` short jobs started, followed and waited for, 16 at a time: each follower gets
    exactly its job's bytes; nothing accumulates (checked by the fixture afterwards)."""
    connect_pool(clients, daemon, pki_dir, 4)
    queue = list(range(jobs))
    failures: list[str] = []

    async def worker(c: Client) -> None:
        while queue:
            i = queue.pop()
            expected = f"churn {i}".encode()
            st = await c.start(["printf", "churn %s", str(i)])
            got = await follow(c, st.id)
            if got != f"{len(expected)}:{hashlib.sha256(expected).hexdigest()}":
                failures.append(f"job {i}: {got}")
            final = await c.wait(st.id)
            if (final.state, final.exit_code) != (JobState.EXITED, 0):
                failures.append(f"job {i}: {final}")

    await asyncio.gather(*(worker(clients[k % len(clients)]) for k in range(16)))
    assert failures == []
    assert len(daemon.manager.list()) == jobs + 1
