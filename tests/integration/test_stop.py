"""A stop, once begun, reaches SIGKILL whatever happens to whoever asked for it; a failed start
leaves nothing behind, even a process already running in its group."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from jobworker import HostError, JobManager, JobSpec, JobState
from jobworker.client import Client
from jobworker.server.daemon import Daemon
from tests.conftest import wait_for
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

# Ignores SIGTERM, and says so each time one arrives (the trap runs between the short sleeps).
STUBBORN = ("sh", "-c", "trap 'echo got-term' TERM; echo ready; while :; do sleep 0.05; done")


async def _until_output(manager: JobManager, job_id: str, marker: bytes) -> None:
    seen = b""
    async with asyncio.timeout(10):
        async for chunk in manager.output(job_id, follow=True):
            seen += chunk
            if marker in seen:
                return
    pytest.fail(f"the job ended without printing {marker!r}: {seen!r}")


async def test_a_cancelled_stop_still_escalates_to_kill(manager: JobManager) -> None:
    st = await manager.start(JobSpec(argv=STUBBORN))
    await _until_output(manager, st.id, b"ready")
    caller = asyncio.create_task(manager.stop(st.id, grace=0.3))
    await _until_output(manager, st.id, b"got-term")  # SIGTERM delivered, grace running
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    async with asyncio.timeout(10):  # before the fix: running for ever
        final = await manager.wait(st.id)
    assert final.state is JobState.STOPPED, final
    assert final.signal == 9, final


async def test_a_second_stop_can_bring_the_kill_forward(manager: JobManager) -> None:
    st = await manager.start(JobSpec(argv=STUBBORN))
    await _until_output(manager, st.id, b"ready")
    first = asyncio.create_task(manager.stop(st.id, grace=3600))
    await _until_output(manager, st.id, b"got-term")
    async with asyncio.timeout(10):
        final = await manager.stop(st.id, grace=0.1)
    assert final.signal == 9 and final.state is JobState.STOPPED, final
    assert (await first) == final
    # One TERM round (the whole output: the shell's "Terminated" for its sleep is on stderr, a
    # chunk of its own).
    assert b"".join([c async for c in manager.output(st.id)]).count(b"got-term") == 1


async def test_a_process_refusing_sigterm_still_gets_killed(manager: JobManager) -> None:
    """A setuid program under a non-root manager answers SIGTERM with EPERM; cgroup.kill works
    on it regardless. The refusal is injected: this test runs as root."""
    st = await manager.start(JobSpec(argv=("sleep", "600")))
    refused: list[int] = []

    def refuse(pid: int, sig: int) -> None:
        refused.append(pid)
        raise PermissionError(1, "Operation not permitted")

    manager._send_signal = refuse
    async with asyncio.timeout(10):
        final = await manager.stop(st.id, grace=0.2)
    assert refused == [st.pid]
    assert final.state is JobState.STOPPED and final.signal == 9, final


async def test_close_waits_for_a_stop_under_way(tmp_path: Path, cgroup_name: str) -> None:
    manager = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=60)
    parent = manager.cgroup_parent
    try:
        st = await manager.start(JobSpec(argv=STUBBORN))
        await _until_output(manager, st.id, b"ready")
        caller = asyncio.create_task(manager.stop(st.id, grace=0.3))
        await _until_output(manager, st.id, b"got-term")
        caller.cancel()
    finally:
        async with asyncio.timeout(10):  # the stop's 0.3 s grace, not close's 60 s
            await manager.close()
    final = manager.status(st.id)
    assert final.state is JobState.STOPPED and final.signal == 9, final
    assert final.reason == "stopped on request"
    assert not parent.exists()


async def test_a_failed_start_kills_a_process_already_in_its_group(
    manager: JobManager, tmp_path: Path
) -> None:
    """The spawner can die after its spawn and before its reply: the process then runs in a
    group no record knows. The start must kill it and remove the group and the log."""
    real_spawn = manager._spawner.current.spawn
    started: list[int] = []

    async def spawn_then_lose_the_reply(*args: object, **kwargs: object) -> object:
        spawned = await real_spawn(*args, **kwargs)  # type: ignore[arg-type]
        started.append(spawned.pid)
        raise HostError("the spawner died before replying")

    manager._spawner.current.spawn = spawn_then_lose_the_reply  # type: ignore[method-assign,assignment]
    with pytest.raises(HostError, match="before replying"):
        await manager.start(JobSpec(argv=("sleep", "600")))
    (pid,) = started

    def gone() -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            return True

    await wait_for(gone, what=f"process {pid} of the failed start to die")
    groups = [p for p in manager.cgroup_parent.iterdir() if p.is_dir()]
    assert groups == [], "the failed start's cgroup is left"
    assert manager.list() == []
    jobs = tmp_path / "state" / "jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == [], list(jobs.iterdir())


async def test_a_cancelled_stop_rpc_still_escalates(daemon: Daemon, connect: Connect) -> None:
    """`timeout -s INT 0.7 worker stop ID`: the client goes away mid-grace; the stop goes on."""
    alice: Client = connect("alice")
    st = await alice.start(list(STUBBORN))
    manager = daemon.manager
    await _until_output(manager, st.id, b"ready")
    call = asyncio.create_task(alice.stop(st.id, grace=0.3))
    await _until_output(manager, st.id, b"got-term")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    async with asyncio.timeout(10):
        final = await alice.wait(st.id)
    assert final.state is JobState.STOPPED and final.signal == 9, final


def test_stubborn_job_really_ignores_sigterm() -> None:
    """The tests above rely on STUBBORN outliving a SIGTERM."""
    import subprocess
    import time

    p = subprocess.Popen(STUBBORN, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        p.terminate()
        assert p.stdout.readline() == b"got-term\n"
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            assert p.poll() is None, "the stubborn job died of SIGTERM"
    finally:
        p.kill()
        p.wait()
    assert sys.platform.startswith("linux") and os.name == "posix"
