"""The daemon as a systemd ``Delegate=yes`` service: its own cgroup is a child group, and the
controllers are enabled only down to that group's parent."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from jobworker.cgroup import fs

pytestmark = pytest.mark.kernel

DAEMON = """
import asyncio, json, sys
from pathlib import Path
from jobworker import JobManager, JobSpec, Limits

async def main():
    mgr = await JobManager.open(Path(sys.argv[1]), stop_grace=1.0)  # discovers its own cgroup
    try:
        st = await mgr.start(JobSpec(
            argv=("sh", "-c", "cat /proc/self/cgroup; exec " + sys.executable
                  + " -c 'x = b\\"x\\" * (200 * 2**20)'"),
            limits=Limits(memory=50 * 2**20, pids=8)))
        st = await mgr.wait(st.id)
        out = b"".join([c async for c in mgr.output(st.id)])
        print(json.dumps({
            "daemon": Path("/proc/self/cgroup").read_text().strip(),
            "available": sorted(mgr.available_controllers),
            "parent": str(mgr.cgroup_parent),
            "job_cgroup": out.decode().strip(),
            "job_id": st.id,
            "oom_killed": st.oom_killed,
        }))
    finally:
        await mgr.close()

asyncio.run(main())
"""


async def test_daemon_in_a_delegated_child_group(
    delegated: Path, tmp_path: Path, no_leftovers: None, figure: dict[str, str]
) -> None:
    if (delegated / "cgroup.type").exists():
        pytest.skip("this session already runs in a delegated group (JW_VM_CGROUP): every test is")
    slice_ = delegated / "test.slice"
    service = slice_ / "runner.service"
    want = "+cpu +memory +io +pids"
    fs.write(delegated, "cgroup.subtree_control", want)
    slice_.mkdir()
    try:
        fs.write(slice_, "cgroup.subtree_control", want)
        service.mkdir()
        assert fs.read(service, "cgroup.subtree_control").strip() == ""
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            'echo $$ > "$1/cgroup.procs" && shift && exec "$@"',
            "_",
            str(service),
            sys.executable,
            "-c",
            DAEMON,
            str(tmp_path / "state"),
            stdout=asyncio.subprocess.PIPE,
            env=os.environ.copy(),
        )
        stdout, _ = await proc.communicate()
        assert proc.returncode == 0
        report = json.loads(stdout.decode().strip().splitlines()[-1])
        figure["daemon"] = report["daemon"].removeprefix("0::")
        figure["job"] = report["job_cgroup"].removeprefix("0::")
        figure["controllers"] = ",".join(report["available"])
        figure["oom_killed"] = str(report["oom_killed"])
        assert report["daemon"] == "0::/test.slice/runner.service/daemon"
        assert report["available"] == ["cpu", "io", "memory", "pids"]
        assert report["job_cgroup"] == f"0::/test.slice/runner.service/jobworker/{report['job_id']}"
        assert report["oom_killed"] is True
        assert not Path(report["parent"]).exists()
        assert set(fs.read(service, "cgroup.subtree_control").split()) == {
            "cpu",
            "io",
            "memory",
            "pids",
        }
    finally:
        for d in (service / "daemon", service, slice_):
            if d.exists():
                d.rmdir()
