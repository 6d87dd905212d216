"""workerd as a real process: flags, SIGTERM, and recovery after SIGKILL."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from jobworker import JobManager, JobState, Limits, LimitUnavailable
from jobworker.client import Client
from jobworker.errors import JobNotFound
from jobworker.server.daemon import main, serve
from tests.conftest import cgroup2_usable, wait_for

pki_dir = harness.pki_dir
GATED = 'echo first; while [ ! -e "$1" ]; do sleep 0.01; done; echo second'


Workerd = harness.Workerd
start_workerd = harness.start_workerd


@pytest.fixture
async def workerd(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Workerd]:
    async with start_workerd(tmp_path, pki_dir, cgroup_name) as w:
        yield w


async def test_sigterm_shuts_down_gracefully(
    workerd: Workerd, pki_dir: Path, tmp_path: Path, cgroup_name: str
) -> None:
    async with Client.from_pki(workerd.address, pki_dir, "alice") as c:
        st = await c.start(["sh", "-c", GATED, "sh", str(tmp_path / "never")])
        stream = c.logs(st.id, follow=True)
        assert await anext(stream) == (0, b"first\n")
        workerd.proc.send_signal(signal.SIGTERM)
        assert [x async for x in stream] == []  # ended cleanly with the job
    assert await workerd.proc.wait() == 0, workerd.log.read_text()
    assert "stopped" in workerd.log.read_text()
    # Records and logs stay; the cgroups are gone.
    d = await serve(harness.make_config(tmp_path / "state", pki_dir, cgroup_name))
    try:
        final = d.manager.status(st.id)
        assert final.state is JobState.STOPPED
        assert b"".join([x async for x in d.manager.output(st.id)]) == b"first\n"
    finally:
        await d.close()


async def test_recovery_after_sigkill(
    workerd: Workerd, pki_dir: Path, tmp_path: Path, cgroup_name: str
) -> None:
    async with Client.from_pki(workerd.address, pki_dir, "alice") as c:
        done = await c.start(["sh", "-c", "echo done"])
        done_final = await c.wait(done.id)
        running = await c.start(["sh", "-c", GATED, "sh", str(tmp_path / "never")])
        assert await anext(c.logs(running.id, follow=True)) == (0, b"first\n")
    workerd.proc.kill()
    await workerd.proc.wait()
    os.kill(running.pid, 0)  # the orphaned job is still alive before the restart
    d = await serve(harness.make_config(tmp_path / "state", pki_dir, cgroup_name))
    try:
        async with Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice") as c:
            assert await c.status(done.id) == done_final
            lost = await c.status(running.id)
            assert lost.state is JobState.LOST
            assert "daemon stopped while the job was running" in lost.reason
            assert [x async for x in c.logs(running.id, follow=True)] == [(0, b"first\n")]
        await wait_for(lambda: not pid_alive(running.pid), what="the lost job to be killed")
        assert [p.name for p in d.manager.cgroup_parent.iterdir() if p.is_dir()] == []
    finally:
        await d.close()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --pki DIR, or all of --ca, --cert and --key"),
        (["--ca", "x.pem"], "give --pki DIR, or all of --ca, --cert and --key"),
        (["--pki", "/no/such/dir"], "cannot read the CA certificate /no/such/dir/ca.pem"),
        (["--pki", "{pki}", "--max-memory", "lots"], "memory: 'lots' is not understood"),
        (["--pki", "{pki}", "--debug-addr", "0.0.0.0:6060"], "must be on loopback"),
        (["--pki", "{pki}", "--default-pids", "100", "--max-pids", "10"], "pids: 100 is above"),
    ],
)
def test_bad_configuration_is_one_clear_line(
    pki_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    argv = [a.replace("{pki}", str(pki_dir)) for a in args] + ["--state-dir", str(tmp_path / "s")]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code in (1, 2), result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_help_lists_env_and_flags() -> None:
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for flag in (
        "--listen",
        "--pki",
        "--state-dir",
        "--stop-grace",
        "--debug-addr",
        "--max-memory",
        "WORKERD_",
    ):
        assert flag in result.output


async def test_default_limits_the_host_cannot_enforce_stop_the_daemon(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    config = harness.make_config(
        tmp_path / "state", pki_dir, cgroup_name, default_limits=Limits(memory=64 << 20)
    )
    probe = await JobManager.open(tmp_path / "probe", cgroup_name=cgroup_name + "-probe")
    available = probe.available_controllers
    await probe.close()
    if "memory" in available:
        pytest.skip("this host can enforce memory limits")
    with pytest.raises(LimitUnavailable, match=r"default limits cannot be enforced.*memory"):
        await serve(config)
    assert not (probe.cgroup_parent.parent / cgroup_name).exists()


# -- rough edges a new user meets ---------------------------------------------------------------


@pytest.mark.parametrize("extra", [(), ("--debug-addr", "127.0.0.1:0")], ids=["plain", "debug"])
async def test_sigterm_when_idle_exits_promptly(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, extra: tuple[str, ...]
) -> None:
    """An idle daemon has nothing to wait for. A failed call first (what a user's first typo
    makes): its error's reference cycles kept grpc objects alive until interpreter exit, where
    grpc's shutdown then took ~2 s; the debug server's poll loop added 0.5 s more."""
    async with start_workerd(tmp_path, pki_dir, cgroup_name, *extra) as w:
        async with Client.from_pki(w.address, pki_dir, "alice") as c:
            assert await c.list() == []
            with pytest.raises(JobNotFound):
                await c.status("no-such-job")
        started = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        assert await w.proc.wait() == 0, w.log.read_text()
        elapsed = time.monotonic() - started
    print(f"workerd {' '.join(extra)} exited {elapsed:.3f}s after SIGTERM")
    # Under 0.5 s on an idle machine (0.1 s measured); the bound leaves room for a loaded one.
    assert elapsed < 1.0, f"workerd took {elapsed:.2f}s to exit on SIGTERM when idle"


def line_of(lines: list[str], text: str) -> int:
    found = [i for i, line in enumerate(lines) if text in line]
    assert len(found) == 1, (text, lines)
    return found[0]


async def test_the_tls12_self_probe_says_the_handshake_error_is_its_own(workerd: Workerd) -> None:
    """grpc's C core logs the refused TLS 1.2 handshake of the start-up probe as an error line
    of its own; the daemon's lines around it say that it is the probe, refused as it must be."""
    lines = workerd.log.read_text().splitlines()
    announced = line_of(lines, "TLS 1.2 self-probe of 127.0.0.1:")
    assert "NO_SHARED_CIPHER" in lines[announced]  # names the error to expect
    verdict = line_of(lines, "TLS 1.2 self-probe: refused as expected")
    listening = line_of(lines, "listening on")
    assert announced < verdict < listening
    grpc_lines = [
        i for i, line in enumerate(lines) if "NO_SHARED_CIPHER" in line and "self-probe" not in line
    ]
    assert all(i > announced for i in grpc_lines), lines


async def test_the_debug_endpoint_logs_its_address(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    async with start_workerd(tmp_path, pki_dir, cgroup_name, "--debug-addr", "127.0.0.1:0") as w:
        m = re.search(r"debug endpoint on https://127\.0\.0\.1:(\d+)/ ", w.log.read_text())
        assert m, w.log.read_text()
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        ctx.load_cert_chain(pki_dir / "root.pem", pki_dir / "root-key.pem")
        url = f"https://127.0.0.1:{m[1]}/metrics"
        with await asyncio.to_thread(
            urllib.request.urlopen, url, timeout=10, context=ctx
        ) as answer:
            assert b"jobworker_jobs" in answer.read()


async def test_caps_the_host_cannot_enforce_stop_the_daemon(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """A --max-* cap is applied to every job, so a cap on a missing controller would make every
    Start fail: like a default, it must stop the daemon at start-up instead."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    probe = await JobManager.open(tmp_path / "probe", cgroup_name=cgroup_name + "-probe")
    available = probe.available_controllers
    await probe.close()
    if "pids" in available:
        pytest.skip("this host can enforce pids limits")
    config = harness.make_config(
        tmp_path / "state", pki_dir, cgroup_name, max_limits=Limits(pids=64)
    )
    with pytest.raises(LimitUnavailable, match=r"caps \(--max-\*\) cannot be enforced.*'pids'"):
        await serve(config)
    assert not (probe.cgroup_parent.parent / cgroup_name).exists()


async def test_log_readers_leaving_early_leave_no_traceback(
    workerd: Workerd, pki_dir: Path, tmp_path: Path
) -> None:
    """``worker logs ID | head``: the reader goes away while the daemon is writing to its
    stream. That is normal; the daemon must not log it as a failure (grpc logged
    ``ExecuteBatchError`` with a traceback when the write failed before it had noticed the
    cancellation: a race, so it is run many times)."""
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(8 << 20))
    worker = Path(sys.executable).parent / "worker"
    env = {**os.environ, "WORKER_ADDR": workerd.address, "WORKER_PKI": str(pki_dir)}
    env["WORKER_USER"] = "alice"
    async with Client.from_pki(workerd.address, pki_dir, "alice") as c:
        st = await c.start(["cat", str(blob)])
        assert (await c.wait(st.id)).exit_code == 0

        async def head(follow: bool) -> bytes:
            reader = await asyncio.create_subprocess_shell(
                f"{worker} logs {'-f ' if follow else ''}{st.id} | head -c 1000",
                stdout=subprocess.PIPE,
                env=env,
            )
            return (await reader.communicate())[0]

        for _ in range(6):
            outs = await asyncio.gather(*(head(follow) for follow in (False, True) * 2))
            assert outs == [blob.read_bytes()[:1000]] * 4
        # Still serving, and a whole read still gets every byte.
        got = b"".join([data async for _, data in c.logs(st.id)])
        assert got == blob.read_bytes()
    workerd.proc.send_signal(signal.SIGTERM)
    assert await workerd.proc.wait() == 0
    text = workerd.log.read_text()
    assert "Traceback" not in text, text
    assert "ExecuteBatchError" not in text, text
