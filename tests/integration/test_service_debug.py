"""The debug endpoint of a real daemon: metrics, stacks, profile, heap; loopback only."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import asyncio
import threading
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.errors import InvalidArgument, JobNotFound
from jobworker.server.daemon import Daemon, serve
from jobworker.server.debug import parse_address
from tests.conftest import cgroup2_usable

pki_dir = harness.pki_dir


@pytest.fixture
async def debug_daemon(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Daemon]:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    d = await serve(
        harness.make_config(tmp_path / "state", pki_dir, cgroup_name, debug_address="127.0.0.1:0")
    )
    try:
        yield d
    finally:
        await d.close()
    assert not harness.new_threads(threads_before)


async def get(d: Daemon, path: str) -> tuple[int, str]:
    def fetch() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{d.debug_port}{path}", timeout=30) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.to_thread(fetch)


async def test_metrics(debug_daemon: Daemon, pki_dir: Path) -> None:
    async with Client.from_pki(f"127.0.0.1:{debug_daemon.port}", pki_dir, "alice") as c:
        st = await c.start(["sh", "-c", "echo twelve bytes"])
        await c.wait(st.id)
        assert [x async for x in c.logs(st.id)] == [(0, b"twelve bytes\n")]
        with pytest.raises(JobNotFound):
            await c.status("nope")
    status, text = await get(debug_daemon, "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert 'jobworker_jobs{state="exited"} 1.0' in lines
    assert 'jobworker_jobs{state="running"} 0.0' in lines
    assert 'jobworker_rpcs_total{code="OK",method="Start"} 1.0' in lines
    assert 'jobworker_rpcs_total{code="NOT_FOUND",method="Status"} 1.0' in lines
    assert 'jobworker_rpc_duration_seconds_count{method="Wait"} 1.0' in lines
    assert "jobworker_log_streamed_bytes_total 13.0" in lines
    assert "jobworker_log_streams_active 0.0" in lines


async def test_stacks_show_threads_and_tasks(debug_daemon: Daemon) -> None:
    status, text = await get(debug_daemon, "/debug/stacks")
    assert status == 200
    assert "=== threads" in text and "--- thread MainThread" in text
    assert "=== asyncio tasks" in text and "--- task " in text
    assert "test_stacks_show_threads_and_tasks" in text  # this very test's task


async def test_profile_samples_the_event_loop(debug_daemon: Daemon) -> None:
    status, text = await get(debug_daemon, "/debug/profile?seconds=0.3")
    assert status == 200
    assert "thread samples over 0.3s" in text
    assert "# folded stacks" in text
    assert "MainThread" not in text  # functions, not thread names
    assert "select" in text or "run_forever" in text  # the loop, seen from outside
    for bad in ("0", "-1", "x", "1000"):
        assert (await get(debug_daemon, f"/debug/profile?seconds={bad}"))[0] == 400


async def test_heap(debug_daemon: Daemon) -> None:
    was_tracing = tracemalloc.is_tracing()
    try:
        status, text = await get(debug_daemon, "/debug/heap")
        assert status == 200
        if not was_tracing:
            assert "now tracing" in text
            status, text = await get(debug_daemon, "/debug/heap?limit=5")
        assert "top 5 sites by size" in text
        assert len([line for line in text.splitlines() if " blocks " in line]) <= 5
        assert (await get(debug_daemon, "/debug/heap?stop=1"))[1] == "tracemalloc stopped\n"
        assert not tracemalloc.is_tracing()
    finally:
        if was_tracing and not tracemalloc.is_tracing():
            tracemalloc.start()


async def test_unknown_path(debug_daemon: Daemon) -> None:
    assert (await get(debug_daemon, "/nope"))[0] == 404


@pytest.mark.parametrize("address", ["0.0.0.0:6060", "192.0.2.1:6060", "example.com:6060", "::"])
def test_debug_address_must_be_loopback(address: str) -> None:
    with pytest.raises(InvalidArgument, match="debug address"):
        parse_address(address)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:6060", ("127.0.0.1", 6060)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_debug_address_loopback(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed
