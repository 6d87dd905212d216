"""Faults the library itself must survive: log size cap, full log filesystem, least privilege."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobworker import Credentials, JobManager, JobSpec, JobState, SpawnError
from tests.conftest import cgroup2_usable


async def collect(mgr: JobManager, job_id: str) -> bytes:
    return b"".join([c async for c in mgr.output(job_id, follow=True)])


@pytest.fixture
async def capped(tmp_path: Path, cgroup_name: str) -> JobManager:
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    return await JobManager.open(
        tmp_path / "state", cgroup_name=cgroup_name, stop_grace=1.0, max_log_bytes=100_000
    )


async def test_log_size_cap_stops_the_job_with_a_reason(capped: JobManager) -> None:
    try:
        st = await capped.start(JobSpec(argv=("yes",)))
        final = await capped.wait(st.id)
        assert final.state is JobState.STOPPED
        assert "exceeded the log size limit of 100000 bytes" in final.reason
        assert "further bytes of output were discarded" in final.reason
        assert final.output_bytes == 100_000
        data = await collect(capped, st.id)
        assert data == b"y\n" * 50_000
        # A job under the cap is untouched.
        ok = await capped.start(JobSpec(argv=("head", "-c", "100000", "/dev/zero")))
        done = await capped.wait(ok.id)
        assert (done.state, done.exit_code, done.reason) == (JobState.EXITED, 0, "")
        assert done.output_bytes == 100_000
    finally:
        await capped.close()
    assert not capped.cgroup_parent.exists()


FULL_DISK = """
import asyncio, json, sys
from pathlib import Path
from jobworker import JobManager, JobSpec

async def main():
    async with await JobManager.open(Path(sys.argv[1]), cgroup_name=sys.argv[2]) as mgr:
        async def run(*argv):
            st = await mgr.start(JobSpec(argv=argv))
            final = await mgr.wait(st.id)
            return st.id, final
        first, _ = await run("echo", "written before")
        _, big = await run("head", "-c", "4000000", "/dev/zero")
        _, after = await run("echo", "after")
        kept = b"".join([c async for c in mgr.output(first)]).decode()
        print(json.dumps({
            "big": [big.state.value, big.output_bytes, big.reason],
            "after": [after.state.value, after.reason],
            "first": [mgr.status(first).state.value, kept],
        }))

asyncio.run(main())
"""


async def test_full_log_filesystem(tmp_path: Path, cgroup_name: str) -> None:
    """The state dir is a 1 MiB tmpfs mounted in a mount namespace of the test's own: a job
    that fills it is stopped with the reason, later jobs say why they could not log, and what
    was written before is still served."""
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    if shutil.which("unshare") is None:
        pytest.skip("util-linux unshare is needed")
    state = tmp_path / "state"
    state.mkdir()
    script = (
        f"mount -t tmpfs -o size=1m tmpfs {state} && "
        f"exec {sys.executable} -c '{FULL_DISK}' {state} {cgroup_name}"
    )
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    big_state, big_size, big_reason = result["big"]
    assert big_state == "stopped"
    assert 0 < big_size <= 1 << 20
    assert big_reason.startswith("output log write failed: No space left on device")
    assert result["after"][0] == "stopped"
    assert result["after"][1].startswith("output log write failed: No space left on device")
    assert result["first"] == ["exited", "written before\n"]


async def test_jobs_run_unprivileged_and_cannot_touch_the_state_dir(
    tmp_path: Path, cgroup_name: str
) -> None:
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    nobody = pwd.getpwnam("nobody")
    tmp_path.chmod(0o755)  # pytest makes it 0700; the job must at least reach the state dir
    secret_key = tmp_path / "server-key.pem"
    secret_key.write_text("PRIVATE")
    secret_key.chmod(0o600)
    mgr = await JobManager.open(
        tmp_path / "state",
        cgroup_name=cgroup_name,
        credentials=Credentials(uid=nobody.pw_uid, gid=nobody.pw_gid),
    )
    try:
        first = await mgr.start(JobSpec(argv=("echo", "secret output")))
        await mgr.wait(first.id)
        jobs = tmp_path / "state" / "jobs"
        probe = (
            "id -u; "
            f"cat {secret_key} 2>&1; "
            f"cat {jobs}/{first.id}.log 2>&1; "
            f"ls {jobs} 2>&1; "
            f"touch {jobs}/planted 2>&1; "
            "echo done"
        )
        st = await mgr.start(JobSpec(argv=("sh", "-c", probe)))
        await mgr.wait(st.id)
        lines = (await collect(mgr, st.id)).decode().splitlines()
        assert lines[0] == str(nobody.pw_uid)
        assert lines[-1] == "done"
        denied = [line for line in lines[1:-1] if "Permission denied" in line]
        assert len(denied) == 4, lines
        assert not (jobs / "planted").exists()
        assert "secret output" not in "\n".join(lines)
        # Root only when granted explicitly: here per job.
        root = await mgr.start(JobSpec(argv=("id", "-u")), credentials=Credentials())
        await mgr.wait(root.id)
        assert (await collect(mgr, root.id)).strip() == str(os.getuid()).encode()
    finally:
        await mgr.close()


async def test_a_job_cannot_start_in_a_directory_its_user_cannot_reach(
    tmp_path: Path, cgroup_name: str
) -> None:
    """The working directory is entered after the switch to the job's user, not as root."""
    if cgroup2_usable():
        pytest.skip(str(cgroup2_usable()))
    nobody = pwd.getpwnam("nobody")
    secret = tmp_path / "secret"
    (secret / "pub").mkdir(parents=True)
    (secret / "pub").chmod(0o755)
    secret.chmod(0o700)
    mgr = await JobManager.open(
        tmp_path / "state",
        cgroup_name=cgroup_name,
        credentials=Credentials(uid=nobody.pw_uid, gid=nobody.pw_gid),
    )
    try:
        with pytest.raises(SpawnError, match="working directory: Permission denied"):
            await mgr.start(JobSpec(argv=("ls",), cwd=str(secret / "pub")))
        assert mgr.list() == []
    finally:
        await mgr.close()
    assert not mgr.cgroup_parent.exists()
