"""Shared fixtures. Integration tests run real processes on the host's real cgroup2 tree, each
test under a parent group of its own, and check that nothing leaks."""

from __future__ import annotations

# isort: off
# jobworker.server.tls13 sets GRPC_SSL_CIPHER_SUITES, which grpc reads once, on import: whichever
# test module imports grpc first, the daemon's TLS 1.3-only setting must already be in place.
import jobworker.server.tls13  # noqa: F401

# isort: on
import asyncio
import os
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jobworker import JobManager
from jobworker.cgroup.discovery import own_cgroup_dir


def cgroup2_usable() -> str | None:
    """Why integration tests cannot run here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    try:
        own = own_cgroup_dir()
    except Exception as e:
        return f"no cgroup2 tree: {e}"
    if not os.access(own, os.W_OK):
        return f"cgroup {own} is not writable"
    return None


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``predicate()`` holds, checking every few ms; fail after ``timeout``.

    For conditions the library gives no event for (another process's state); the bound is a
    safety net, not a timing assertion.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before``, except the two that live as long as their owner and
    come and go with garbage collection: grpc's aio poller and the loop's default executor."""
    return [
        t.name
        for t in set(threading.enumerate()) - before
        if "_poll_wrapper" not in t.name and not t.name.startswith("asyncio_")
    ]


@pytest.fixture
def cgroup_name() -> str:
    return f"jobworker-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def manager(tmp_path: Path, cgroup_name: str) -> AsyncIterator[JobManager]:
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=1.0)
    parent = mgr.cgroup_parent
    try:
        yield mgr
    finally:
        await mgr.close()
    assert not parent.exists(), f"cgroup {parent} left behind: {list(parent.iterdir())}"
    assert not new_threads(threads_before)
