"""Retention through the real daemon: ended jobs past --retain-jobs, --retain-for (an injected
clock, no sleeps) or one identity's --max-log-bytes-per-user are removed, record and log,
oldest first, and counted in /metrics; the log cap (--max-log-bytes) is on by default and
stops a job that writes past it, with the reason."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jobworker import JobState
from jobworker.client import Client
from jobworker.server.daemon import Config, Daemon, serve
from tests.conftest import JOB_PYTHON, cgroup2_usable, wait_for
from tests.integration import daemon_harness as harness
from tests.integration.test_service_debug import UnixHTTPConnection, request

pki_dir = harness.pki_dir


class Clock:
    """The wall clock plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, pki: Path, cgroup_name: str, **kwargs: object
) -> AsyncIterator[Daemon]:
    """A daemon with the debug socket on; closed at the end, leaving no cgroup, task or thread."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    tasks_before = harness.other_tasks()
    d = await serve(
        harness.make_config(
            tmp_path / "state", pki, cgroup_name, debug_socket=tmp_path / "d.sock", **kwargs
        )
    )
    parent = d.manager.cgroup_parent
    try:
        yield d
    finally:
        await d.close()
    assert not parent.exists()
    assert harness.other_tasks() <= tasks_before
    assert not harness.new_threads(threads_before)


async def removed_metric(d: Daemon) -> dict[str, float]:
    assert d.debug_socket is not None
    status, text, _ = await asyncio.to_thread(
        request, UnixHTTPConnection(d.debug_socket), "/metrics"
    )
    assert status == 200
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^jobworker_jobs_removed_total\{reason="(\w+)"\} (\S+)$', text, re.M)
    }


async def run(client: Client, *argv: str) -> str:
    job = await client.start(list(argv))
    await client.wait(job.id)
    return job.id


def files(tmp_path: Path) -> set[str]:
    return {p.name for p in (tmp_path / "state" / "jobs").iterdir()}


def kept(tmp_path: Path, ids: list[str]) -> set[str]:
    return {i for i in ids if f"{i}.json" in files(tmp_path) or f"{i}.log" in files(tmp_path)}


async def test_retention_by_count_oldest_first(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    async with running(tmp_path, pki_dir, cgroup_name, retain_jobs=3) as d:
        alice = Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice")
        async with alice:
            assert await removed_metric(d) == {"age": 0, "count": 0, "log_bytes": 0}
            ids = [await run(alice, "echo", str(i)) for i in range(5)]
            assert [s.id for s in await alice.list()] == ids[2:]
            await wait_for(lambda: kept(tmp_path, ids) == set(ids[2:]), what="logs removed")
            assert await removed_metric(d) == {"age": 0, "count": 2, "log_bytes": 0}
            # A running job is not counted: three ended jobs stay beside it.
            sleeper = await alice.start(["sleep", "600"])
            ids.append(await run(alice, "true"))
            assert {s.id for s in await alice.list()} == {sleeper.id, *ids[3:]}
            await alice.stop(sleeper.id)
            assert {s.id for s in await alice.list()} == {sleeper.id, *ids[4:]}


async def test_retention_by_age_with_an_injected_clock(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    clock = Clock()
    async with running(
        tmp_path, pki_dir, cgroup_name, retain_for=timedelta(hours=1), clock=clock
    ) as d:
        alice = Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice")
        async with alice:
            old = await run(alice, "true")
            clock.offset = timedelta(minutes=59)
            young = await run(alice, "true")  # its end applies the limits: old is not past it
            assert {s.id for s in await alice.list()} == {old, young}
            clock.offset = timedelta(minutes=61)
            newest = await run(alice, "true")
            assert {s.id for s in await alice.list()} == {young, newest}
            await wait_for(lambda: not kept(tmp_path, [old]), what="the old job's files removed")
            assert (await removed_metric(d))["age"] == 1


async def test_the_sweep_removes_jobs_that_age_while_none_ends(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    clock = Clock()
    async with running(
        tmp_path,
        pki_dir,
        cgroup_name,
        retain_for=timedelta(hours=1),
        clock=clock,
        retention_sweep=0.01,
    ) as d:
        alice = Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice")
        async with alice:
            job = await run(alice, "true")
            clock.offset = timedelta(hours=2)
            await wait_for(lambda: not d.manager.list(), what="the sweep to remove the job")
            assert await alice.list() == []
            await wait_for(lambda: not kept(tmp_path, [job]), what="its files removed")
            assert (await removed_metric(d))["age"] == 1


async def test_jobs_past_their_age_at_restart_are_removed(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    async with running(tmp_path, pki_dir, cgroup_name) as d:
        alice = Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice")
        async with alice:
            job = await run(alice, "true")
    clock = Clock()
    clock.offset = timedelta(days=8)  # past the default --retain-for of 7d
    async with running(tmp_path, pki_dir, cgroup_name, clock=clock) as d:
        await wait_for(lambda: not d.manager.list(), what="the first sweep")
        # The record and log go on the store's writer thread, just after the job is forgotten.
        await wait_for(lambda: not kept(tmp_path, [job]), what="the files to be removed")
        assert (await removed_metric(d))["age"] == 1


async def test_per_identity_log_bytes(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> None:
    write = [JOB_PYTHON, "-c", "import sys; sys.stdout.write('x' * 1000)"]
    async with running(tmp_path, pki_dir, cgroup_name, max_log_bytes_per_user=2500) as d:
        alice = Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice")
        bob = Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "bob")
        async with alice, bob:
            bobs = await run(bob, *write)  # older than all of alice's, and kept: not hers
            alices = [await run(alice, *write) for _ in range(2)]
            assert {s.id for s in await alice.list()} == set(alices)
            alices.append(await run(alice, *write))  # 3000 bytes > 2500: her oldest goes
            assert [s.id for s in await alice.list()] == alices[1:]
            assert [s.id for s in await bob.list()] == [bobs]
            assert (await alice.status(alices[2])).output_bytes == 1000
            await wait_for(lambda: kept(tmp_path, alices) == set(alices[1:]), what="removal")
            assert await removed_metric(d) == {"age": 0, "count": 0, "log_bytes": 1}


async def test_the_log_cap_is_on_by_default() -> None:
    config = Config(tls=None)  # type: ignore[arg-type]
    assert config.max_log_bytes == 1 << 30
    assert config.max_log_bytes_per_user == 10 << 30
    assert config.retain_jobs == 10_000
    assert config.retain_for == timedelta(days=7)


async def test_a_job_past_max_log_bytes_is_stopped_with_the_reason(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """The flag through a real workerd process."""
    async with (
        harness.start_workerd(tmp_path, pki_dir, cgroup_name, "--max-log-bytes", "64K") as w,
        Client.from_pki(w.address, pki_dir, "alice") as alice,
    ):
        job = await alice.start(["yes"])
        status = await alice.wait(job.id)
    assert status.state is JobState.STOPPED
    assert "output exceeded the log size limit of 65536 bytes" in status.reason, status.reason
    assert status.output_bytes == 64 << 10


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--retain-for", "7x", "--retain-for: '7x' is not understood"),
        ("--retain-for", "0s", "--retain-for must be positive"),
        ("--retain-jobs", "0", "--retain-jobs: '0' is not a whole number of jobs from 1 up"),
        ("--max-log-bytes", "lots", "--max-log-bytes: 'lots' is not understood"),
        ("--max-log-bytes-per-user", "-1", "--max-log-bytes-per-user"),
    ],
)
async def test_bad_flags_are_refused_in_one_line(
    tmp_path: Path, pki_dir: Path, flag: str, value: str, message: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobworker.server.daemon",
        "--pki", str(pki_dir), "--state-dir", str(tmp_path / "state"), flag, value,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"workerd: {message}"), lines
