"""Deadlines: a job that runs past its timeout is stopped (SIGTERM, grace, SIGKILL) with
"deadline exceeded" in its reason; in the library, through the daemon (the request's field,
--max-runtime, the policy's [runtime] table), through a real workerd and through the CLI."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker import JobManager, JobSpec, JobState
from jobworker.client import Client
from jobworker.errors import InvalidArgument
from jobworker.server.daemon import Daemon, serve
from jobworker.store import Store, spec_from_dict
from tests.conftest import cgroup2_usable, new_threads
from tests.integration import daemon_harness as harness
from tests.integration.test_cli import (
    WORKER,
    Env,
    invoke,
    one_error_line,
    subprocess_env,
    worker_env,
)

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

DEAF = ("sh", "-c", 'trap "" TERM; sleep 600')
"""Ignores SIGTERM (so does its sleep, which inherits the ignored disposition): only the SIGKILL
after the grace ends it."""


@pytest.fixture
async def quick(tmp_path: Path, cgroup_name: str) -> AsyncIterator[JobManager]:
    """A manager whose stop grace is 0.2 s; leaves no cgroup or thread."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=0.2)
    parent = mgr.cgroup_parent
    try:
        yield mgr
    finally:
        await mgr.close()
    assert not parent.exists()
    assert not new_threads(threads_before)
    assert not mgr._deadlines, "a deadline timer outlived its job"


# -- the library ------------------------------------------------------------------------------


async def test_a_job_past_its_deadline_is_killed_after_the_grace(
    quick: JobManager, tmp_path: Path
) -> None:
    started = await quick.start(JobSpec(argv=DEAF, timeout=0.5))
    final = await asyncio.wait_for(quick.wait(started.id), 10)
    assert final.state is JobState.STOPPED
    assert final.signal == signal.SIGKILL  # SIGTERM was ignored: the grace ran out
    assert final.exit_code is None
    assert final.reason == "stopped: deadline exceeded (timeout 0.5s)"
    assert final.ended_at is not None
    ran = (final.ended_at - final.started_at).total_seconds()
    assert ran >= 0.5 + 0.2, f"ended after {ran:.3f}s, before the deadline and the grace"
    assert not quick._deadlines
    # The final record keeps the timeout and the reason.
    record = json.loads(Store(tmp_path / "state").record_path(started.id).read_text())
    assert spec_from_dict(record["spec"]).timeout == 0.5
    assert record["reason"] == final.reason


async def test_a_job_that_ends_in_time_is_untouched_and_its_timer_cancelled(
    quick: JobManager,
) -> None:
    st = await quick.start(JobSpec(argv=("sh", "-c", "exit 3"), timeout=600))
    assert st.id in quick._deadlines
    final = await asyncio.wait_for(quick.wait(st.id), 10)
    assert (final.state, final.exit_code, final.reason) == (JobState.EXITED, 3, "")
    assert st.id not in quick._deadlines
    untimed = await quick.start(JobSpec(argv=("true",)))
    assert untimed.id not in quick._deadlines
    await quick.wait(untimed.id)


async def test_a_stop_before_the_deadline_keeps_its_own_reason(quick: JobManager) -> None:
    st = await quick.start(JobSpec(argv=DEAF, timeout=600))
    final = await asyncio.wait_for(quick.stop(st.id, reason="stopped by alice"), 10)
    assert (final.state, final.reason) == (JobState.STOPPED, "stopped by alice")
    assert st.id not in quick._deadlines


async def test_a_job_that_honours_sigterm_ends_at_its_deadline(quick: JobManager) -> None:
    st = await quick.start(JobSpec(argv=("sleep", "600"), timeout=0.3))
    final = await asyncio.wait_for(quick.wait(st.id), 10)
    assert (final.state, final.signal) == (JobState.STOPPED, signal.SIGTERM)
    assert final.reason == "stopped: deadline exceeded (timeout 0.3s)"


# -- through the daemon -----------------------------------------------------------------------


async def test_the_start_requests_timeout_field(daemon: Daemon, connect: Connect) -> None:
    alice = connect("alice")
    job = await alice.start(list(DEAF), timeout=0.5)
    assert daemon.manager.spec(job.id).timeout == 0.5
    final = await asyncio.wait_for(alice.wait(job.id), 10)
    assert final.state is JobState.STOPPED
    assert final.signal == signal.SIGKILL
    assert final.reason == "stopped: deadline exceeded (timeout 0.5s)"
    untimed = await alice.start(["true"])
    assert daemon.manager.spec(untimed.id).timeout is None  # no --max-runtime: no deadline
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(InvalidArgument, match="timeout_seconds must be a positive number"):
            await alice.start(["true"], timeout=bad)


async def _daemon(
    tmp_path: Path, pki: Path, cgroup_name: str, **config: object
) -> AsyncIterator[Daemon]:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    d = await serve(harness.make_config(tmp_path / "state", pki, cgroup_name, **config))
    try:
        yield d
    finally:
        await d.close()
    assert not d.manager.cgroup_parent.exists()


async def test_max_runtime_refuses_longer_jobs_and_caps_those_asking_for_none(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    async for d in _daemon(tmp_path, pki_dir, cgroup_name, max_runtime=0.5):
        async with Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice") as alice:
            with pytest.raises(InvalidArgument) as e:
                await alice.start(["true"], timeout=60)
            assert str(e.value) == (
                "timeout: 1m is above the maximum runtime of 0.5s (workerd --max-runtime); "
                "ask for at most that"
            )
            assert d.manager.list() == []
            shorter = await alice.start(["true"], timeout=0.25)
            assert d.manager.spec(shorter.id).timeout == 0.25
            capped = await alice.start(list(DEAF))
            assert d.manager.spec(capped.id).timeout == 0.5
            final = await asyncio.wait_for(alice.wait(capped.id), 10)
            assert final.state is JobState.STOPPED
            assert final.reason == "stopped: deadline exceeded (timeout 0.5s)"


async def test_the_policys_runtime_replaces_the_daemons_for_its_role(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[runtime]\nuser = "500ms"\nadmin = "2h"\n')
    async for d in _daemon(tmp_path, pki_dir, cgroup_name, max_runtime=600.0, policy_file=policy):
        address = f"127.0.0.1:{d.port}"
        async with (
            Client.from_pki(address, pki_dir, "alice") as alice,
            Client.from_pki(address, pki_dir, "root") as root,
        ):
            with pytest.raises(InvalidArgument, match=r"^timeout: 1m is above the maximum runtime "
                               r"of 0\.5s \(the policy's \[runtime\] user\)"):  # fmt: skip
                await alice.start(["true"], timeout=60)
            job = await alice.start(list(DEAF))
            final = await asyncio.wait_for(alice.wait(job.id), 10)
            assert final.reason == "stopped: deadline exceeded (timeout 0.5s)"
            # admin's entry is above the daemon's 10m: the role's value wins, both ways.
            long = await root.start(["sleep", "600"], timeout=3600)
            assert d.manager.spec(long.id).timeout == 3600
            dflt = await root.start(["sleep", "600"])
            assert d.manager.spec(dflt.id).timeout == 7200
            for j in (long, dflt):
                await root.stop(j.id, grace=0)


async def test_a_real_workerd_takes_max_runtime(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    async with (
        harness.start_workerd(tmp_path, pki_dir, cgroup_name, "--max-runtime", "10m") as workerd,
        Client.from_pki(workerd.address, pki_dir, "alice") as alice,
    ):
        with pytest.raises(InvalidArgument, match=r"1h is above .* of 10m \(workerd --max"):
            await alice.start(["true"], timeout=3600)
        job = await alice.start(["true"], timeout=1)
        assert (await alice.wait(job.id)).exit_code == 0


@pytest.mark.parametrize("value", ["forever", "0", "-1s"])
async def test_workerd_refuses_a_bad_max_runtime(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, value: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobworker.server.daemon",
        "--pki", str(pki_dir), "--listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "s"),
        "--cgroup-name", cgroup_name, "--max-runtime", value,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    lines = err.decode().splitlines()
    assert proc.returncode == 1, err
    assert len(lines) == 1 and lines[0].startswith("workerd: --max-runtime"), err
    assert "30s, 10m, 1.5h" in lines[0]


# -- the CLI ----------------------------------------------------------------------------------


@pytest.fixture
def env(daemon: Daemon, pki_dir: Path, tmp_path: Path) -> Env:
    e = worker_env(daemon.port, pki_dir)
    e["XDG_CONFIG_HOME"] = str(tmp_path / "xdg")
    return e


async def test_worker_run_timeout_exits_124_with_one_line(env: Env) -> None:
    ran = await invoke(["run", "--timeout", "1s", "--", *DEAF], env)
    assert ran.exit_code == 124, ran.stderr
    line = one_error_line(ran)
    assert "stopped: deadline exceeded (timeout 1s)" in line, line
    assert "SIGKILL" in line


async def test_worker_run_of_a_job_that_ends_in_time_exits_with_its_code(env: Env) -> None:
    ran = await invoke(["run", "--timeout", "1h", "--", "sh", "-c", "exit 7"], env)
    assert (ran.exit_code, ran.stderr) == (7, "")


async def test_worker_start_timeout(env: Env, daemon: Daemon) -> None:
    started = await invoke(["start", "--timeout", "1.5h", "--", "true"], env)
    assert started.exit_code == 0, started.stderr
    assert daemon.manager.spec(started.stdout.strip()).timeout == 5400
    bad = await invoke(["start", "--timeout", "soon", "--", "true"], env)
    assert bad.exit_code == 64
    line = one_error_line(bad)
    assert "--timeout" in line and "'soon' is not understood" in line and "1.5h" in line, line


async def test_the_worker_script_exits_124(env: Env) -> None:
    """The installed console script, as a user runs it: the exit status the shell sees."""
    proc = await asyncio.create_subprocess_exec(
        WORKER, "run", "--timeout", "1s", "--", *DEAF,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 124, err
    assert out == b""
    assert len(err.splitlines()) == 1 and b"deadline exceeded" in err, err
