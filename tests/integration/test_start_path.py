"""What a start waits for, and what it leaves on disk, once it has returned."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

from jobworker import JobManager, JobSpec, JobState
from jobworker.spawn import sandbox_child


async def test_start_record_is_written_before_the_start_returns_without_the_writer(
    manager: JobManager, tmp_path: Path
) -> None:
    """The start record is written with the start's other files, before the spawn: a start
    waits neither for the store's writer thread (here held busy, as by a batch of synced end
    records) nor for a second write after the spawn."""
    release = threading.Event()
    busy = manager._store._writer.submit(release.wait, 30)
    try:
        st = await asyncio.wait_for(manager.start(JobSpec(argv=("/bin/true",))), 10)
        record = json.loads((tmp_path / "state" / "jobs" / f"{st.id}.json").read_text())
        assert record["state"] == JobState.RUNNING.value
        assert record["argv"] == ["/bin/true"]
        assert record["pid"] == 0, "the pid is not known before the spawn"
        assert st.pid > 0
    finally:
        release.set()
        await asyncio.wrap_future(busy)
    final = await manager.wait(st.id)
    record = json.loads((tmp_path / "state" / "jobs" / f"{st.id}.json").read_text())
    assert record["state"] == final.state.value == JobState.EXITED.value
    assert record["pid"] == st.pid, "the final record has the real pid"


_EXEC_JOB = """
import ctypes, json, os, signal, sys
from jobworker.spawn import sandbox_child as sc

class Init(sc.Sandboxing):
    pass

init = Init()
init.libc = ctypes.CDLL(None, use_errno=True)
init.devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in the spawner
init.reset_signals = (signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ)
search = b"/nonexistent:/usr/bin:/bin"
results = []
probes = [b"sh", b"-c", b"id -u; id -g; id -G; pwd; ulimit -n"], [b"cat", b"/proc/self/status"]
for argv in probes:
    r, w = os.pipe2(os.O_CLOEXEC)
    msg = ("spawn", 1, argv[0], argv, [b"PATH=" + search], sys.argv[1].encode(),
           65534, 65534, [65534], False, {"lookup": search, "nofile": 512})
    pid = init._exec_job(w, w, msg, sc._Forwarder())
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    status = os.waitpid(pid, 0)[1] if pid > 0 else -1
    results.append({"pid": pid, "status": status, "out": out.decode()})
print(json.dumps({"runs": results, "ids": [os.geteuid(), os.getegid(), os.getgroups()]}))
"""


def _exec_job(cwd: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _EXEC_JOB, cwd], capture_output=True, check=True, timeout=60
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to nobody: needs root")
def test_a_sandbox_init_starts_the_job_from_c_with_the_forked_childs_world(
    tmp_path: Path,
) -> None:
    """The init's C path (``_posixsubprocess``, no Python in the job's process before its
    exec) gives the job what the Python child gives it: the user's ids, its cwd (reached as
    that user), the found command, RLIMIT_NOFILE, no_new_privs, no CAP_SYS_ADMIN in its
    bounding set, no blocked or ignored signal; and the init gets root's ids back."""
    cwd = tempfile.mkdtemp(prefix="jobworker-cwd-", dir="/tmp")
    try:
        os.chmod(cwd, 0o755)
        result = _exec_job(cwd)
    finally:
        os.rmdir(cwd)
    ids, status = result["runs"]
    assert ids["pid"] > 0 and status["pid"] > 0, "the C path was not taken"
    assert ids["status"] == status["status"] == 0
    assert ids["out"].split("\n")[:5] == ["65534", "65534", "65534", cwd, "512"]
    fields = dict(line.split(":\t", 1) for line in status["out"].splitlines())
    assert int(fields["SigBlk"], 16) == 0
    assert int(fields["SigIgn"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert not int(fields["CapBnd"], 16) & (1 << 21)
    assert result["ids"] == [0, 0, os.getgroups()]


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to nobody: needs root")
def test_a_cwd_the_user_cannot_reach_leaves_the_start_to_the_python_child(
    tmp_path: Path,
) -> None:
    """A cwd only root can reach is not entered from C (the job's ``cwd`` error comes from the
    Python child, word for word as before); the init's ids are root's again."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "inner").mkdir(mode=0o755)
    result = _exec_job(str(private / "inner"))
    assert [run["pid"] for run in result["runs"]] == [-1, -1]
    assert result["ids"] == [0, 0, os.getgroups()]


async def test_a_signal_to_the_init_before_the_jobs_pid_is_known_is_passed_on() -> None:
    """The init's handlers are in place before the job's process exists; what they catch
    meanwhile goes to the job once its pid is known."""
    proc = await asyncio.create_subprocess_exec("sleep", "60")
    forwarder = sandbox_child._Forwarder()
    forwarder(signal.SIGTERM, None)
    assert forwarder.pending == [signal.SIGTERM]
    forwarder.start(proc.pid)
    assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGTERM
    assert forwarder.pending == []
