"""Per-identity quotas through a real daemon: each one refused at N+1 with RESOURCE_EXHAUSTED
naming the quota and the use, per identity, and given back on every way out (a stop, a job's
own end, a failed start, a closed or cancelled stream, a stream whose job ended); starts per
second with an injected clock; the fd reserve, which refuses streams whoever asks; and the
``workerd`` flags."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from jobworker import InvalidArgument, ResourceExhausted
from jobworker.client import Client
from jobworker.server import quotas as quotas_module
from jobworker.server.daemon import Daemon, main, serve
from tests.conftest import cgroup2_usable, wait_for
from tests.integration import daemon_harness as harness

pki_dir = harness.pki_dir
T = TypeVar("T")
Clients = Callable[[Daemon, str], Client]
Serve = Callable[..., contextlib.AbstractAsyncContextManager[Daemon]]


@pytest.fixture
def serving(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> Serve:
    """``async with serving(max_running_per_user=2) as d``: a daemon with those settings, that
    must leave no cgroup, task or thread behind."""

    @contextlib.asynccontextmanager
    async def run(**config: Any) -> AsyncIterator[Daemon]:
        if reason := cgroup2_usable():
            pytest.skip(reason)
        threads_before = set(threading.enumerate())
        tasks_before = harness.other_tasks()
        d = await serve(harness.make_config(tmp_path / "state", pki_dir, cgroup_name, **config))
        parent = d.manager.cgroup_parent
        try:
            yield d
        finally:
            await d.close()
        assert not parent.exists(), f"cgroup {parent} left behind"
        assert harness.other_tasks() <= tasks_before
        assert not harness.new_threads(threads_before)

    return run


@pytest.fixture
async def clients(pki_dir: Path) -> AsyncIterator[Callable[[Daemon, str], Client]]:
    made: list[Client] = []

    def make(d: Daemon, user: str) -> Client:
        made.append(Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, user))
        return made[-1]

    yield make
    for c in made:
        await c.close()


async def eventually(call: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    """``call()`` once a slot given back on another task's way out is free again: the daemon
    frees it when the job's end or the stream's cancellation reaches it, a moment after the
    client saw it. Retries only ResourceExhausted; fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await call()
        except ResourceExhausted:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.005)


async def test_running_jobs_per_identity(serving: Serve, clients: Clients) -> None:
    async with serving(max_running_per_user=2) as d:
        alice, bob = clients(d, "alice"), clients(d, "bob")
        first = await alice.start(["sleep", "600"])
        await alice.start(["sleep", "600"])
        with pytest.raises(ResourceExhausted) as e:
            await alice.start(["sleep", "600"])
        assert str(e.value) == (
            "alice has 2 running jobs, the most --max-running-per-user allows; "
            "stop one or wait for one to end"
        )
        await bob.start(["true"])  # bob's own quota
        await alice.stop(first.id)
        # Not `read x`: its stdin is /dev/null, so it would end at once and free the slot
        # the next Start must find taken (this test failed now and then that way).
        third = await eventually(lambda: alice.start(["sleep", "600"]))
        with pytest.raises(ResourceExhausted):
            await alice.start(["true"])
        # A job that ends by itself gives its slot back too.
        await alice.stop(third.id)
        quick = await eventually(lambda: alice.start(["true"]))
        await alice.wait(quick.id)
        await eventually(lambda: alice.start(["sleep", "600"]))
        with pytest.raises(ResourceExhausted):
            await alice.start(["true"])


async def test_a_failed_start_gives_its_slot_back(serving: Serve, clients: Clients) -> None:
    async with serving(max_running_per_user=1) as d:
        alice = clients(d, "alice")
        for _ in range(3):
            with pytest.raises(InvalidArgument, match="no-such-command"):
                await alice.start(["no-such-command"])
        job = await alice.start(["sleep", "600"])
        with pytest.raises(ResourceExhausted):
            await alice.start(["sleep", "600"])
        await alice.stop(job.id)


async def first_chunk(client: Client, job_id: str) -> AsyncGenerator[tuple[int, bytes]]:
    """A follow stream that the daemon is serving: its first chunk has arrived."""
    stream = client.logs(job_id, follow=True)
    await anext(stream)
    return stream


def rpcs(d: Daemon, method: str, code: str) -> float:
    """Calls of ``method`` that ended with ``code``: a stream's slot is given back before its
    call is counted, so a count that went up means the slot is free."""
    value = d.metrics.registry.get_sample_value(
        "jobworker_rpcs_total", {"method": method, "code": code}
    )
    return value or 0.0


def in_flight(d: Daemon, method: str) -> float:
    value = d.metrics.registry.get_sample_value("jobworker_rpcs_in_flight", {"method": method})
    return value or 0.0


async def test_streams_per_identity(serving: Serve, clients: Clients) -> None:
    async with serving(max_streams_per_user=2) as d:
        alice, root = clients(d, "alice"), clients(d, "root")
        job = await alice.start(["sh", "-c", "echo ready; exec sleep 600"])
        one = await first_chunk(alice, job.id)
        two = await first_chunk(alice, job.id)

        async def refused() -> None:
            for call in (lambda: anext(alice.logs(job.id)), lambda: alice.wait(job.id)):
                with pytest.raises(ResourceExhausted) as e:
                    await call()
                assert str(e.value).startswith(
                    "alice has 2 Logs/Wait streams open, the most --max-streams-per-user allows"
                )

        await refused()
        other = await first_chunk(root, job.id)  # another identity's streams are its own
        # A stream the client closes (the call is cancelled) gives its slot back.
        await one.aclose()
        await wait_for(lambda: rpcs(d, "Logs", "CANCELLED") == 1, what="the cancel")
        three = await first_chunk(alice, job.id)
        await refused()
        # So does a cancelled Wait.
        await three.aclose()
        await wait_for(lambda: rpcs(d, "Logs", "CANCELLED") == 2, what="the cancel")
        waiting = asyncio.create_task(alice.wait(job.id))
        # The daemon runs in this loop: a Wait in flight has taken its slot.
        await wait_for(lambda: in_flight(d, "Wait") == 1, what="the Wait")
        await refused()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await wait_for(lambda: rpcs(d, "Wait", "CANCELLED") == 1, what="the cancel")
        four = await first_chunk(alice, job.id)
        # The job's end ends the streams and gives every slot back.
        await alice.stop(job.id)
        for stream in (two, four, other):
            assert [c async for c in stream] == []
        await wait_for(lambda: rpcs(d, "Logs", "OK") == 3, what="the streams' end")
        assert (await alice.wait(job.id)).id == (await alice.wait(job.id)).id == job.id
        assert [c async for _, c in alice.logs(job.id)] == [b"ready\n"]


async def test_starts_per_second_with_an_injected_clock(serving: Serve, clients: Clients) -> None:
    now = [50.0]
    async with serving(max_starts_per_second_per_user=2, quota_clock=lambda: now[0]) as d:
        alice, bob = clients(d, "alice"), clients(d, "bob")
        await alice.start(["true"])
        await alice.start(["true"])
        with pytest.raises(ResourceExhausted) as e:
            await alice.start(["true"])
        assert str(e.value) == (
            "alice is starting jobs faster than --max-starts-per-second-per-user 2 allows; "
            "retry in 0.5 s"
        )
        await bob.start(["true"])
        now[0] += 0.5
        await alice.start(["true"])
        with pytest.raises(ResourceExhausted):
            await alice.start(["true"])
        now[0] += 60
        await alice.start(["true"])
        await alice.start(["true"])
        with pytest.raises(ResourceExhausted):
            await alice.start(["true"])


async def test_the_fd_reserve_refuses_streams_whoever_asks(
    serving: Serve, clients: Clients
) -> None:
    async with serving() as d:
        root = clients(d, "root")
        job = await root.start(["sh", "-c", "echo ready; exec sleep 600"])
        held = await first_chunk(root, job.id)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = quotas_module.open_fds()
        # The reserve is at least 256: with the soft limit 100 above what is open now, every
        # stream is past it, an admin's too; starts still work.
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 100, hard))
        try:
            for refused in (lambda: anext(root.logs(job.id)), lambda: root.wait(job.id)):
                with pytest.raises(ResourceExhausted, match=r"^the daemon has \d+ of its \d+ file"):
                    await refused()
            await root.start(["true"])
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await root.stop(job.id)
        assert [c async for _, c in held] == []
        assert (await eventually(lambda: root.wait(job.id))).id == job.id


def test_workerd_flags_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    async def fake_run(config: Any) -> None:
        seen.append(config)

    monkeypatch.setattr("jobworker.server.daemon.run", fake_run)
    args = ["--pki", "/nonexistent", "--max-running-per-user", "3"]
    args += ["--max-streams-per-user", "4", "--max-starts-per-second-per-user", "0.5"]
    with pytest.raises(SystemExit) as e:
        main.main(args, standalone_mode=True)
    assert e.value.code == 0
    (config,) = seen
    assert (
        config.max_running_per_user,
        config.max_streams_per_user,
        config.max_starts_per_second_per_user,
    ) == (3, 4, 0.5)
    for bad in (["--max-running-per-user", "0"], ["--max-starts-per-second-per-user", "0"]):
        with pytest.raises(SystemExit) as e:
            main.main(["--pki", "/nonexistent", *bad], standalone_mode=True)
        assert e.value.code == 2
