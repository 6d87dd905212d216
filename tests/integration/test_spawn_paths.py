"""Both ways the spawner starts a job — posix_spawn from inside the job's group (the job keeps
our credentials) and fork+exec (it runs as someone else) — give the job the same world."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobworker import Credentials, JobManager, JobSpec, Limits, LimitUnavailable, SpawnError
from jobworker.spawn.parent import Spawner

PATHS = {
    "posix_spawn": None,
    "fork": Credentials(uid=os.getuid(), gid=os.getgid(), groups=tuple(os.getgroups())),
}


@pytest.fixture(params=sorted(PATHS))
def creds(request: pytest.FixtureRequest) -> Credentials | None:
    return PATHS[request.param]


@pytest.fixture
def fast_flags(manager: JobManager, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The path each spawn of ``manager`` asked its spawner for (True: posix_spawn), recorded
    from outside: a wrapper around ``Spawner.spawn``, the one call that carries the choice."""
    flags: list[bool] = []
    real = Spawner.spawn

    async def spawn(self: Spawner, *args: Any, **kwargs: Any) -> Any:
        if self.pid == manager.spawner_pid:
            flags.append(kwargs["fast"] if "fast" in kwargs else args[-1])
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(Spawner, "spawn", spawn)
    return flags


@pytest.fixture
def path_checked(creds: Credentials | None, fast_flags: list[bool]) -> Iterator[None]:
    """After the test: every job it started took the path its parameter names."""
    yield
    assert fast_flags, "the test started no job"
    assert fast_flags == [creds is None] * len(fast_flags), fast_flags


async def run(mgr: JobManager, creds: Credentials | None, *argv: str, cwd: str = "/") -> str:
    st = await mgr.start(JobSpec(argv=argv, cwd=cwd), credentials=creds)
    final = await mgr.wait(st.id)
    assert final.exit_code == 0, final
    return b"".join([c async for c in mgr.output(st.id)]).decode()


@pytest.mark.usefixtures("path_checked")
async def test_job_world(manager: JobManager, creds: Credentials | None, tmp_path: Path) -> None:
    probe = (
        "import os, sys;"
        "print(sorted(os.listdir('/proc/self/fd')));"
        "print(os.getsid(0) == os.getpid());"
        "print(os.getcwd());"
        "print(os.readlink('/proc/self/fd/0'));"
        "print(os.stat('/proc/self/fd/1').st_mode >> 12 == 1);"  # a FIFO: the output pipe
        "print(open('/proc/self/cgroup').read().strip().rsplit('/', 2)[-2])"
    )
    out = await run(manager, creds, "python3", "-I", "-c", probe, cwd=str(tmp_path))
    fds, leader, cwd, stdin, fifo, parent = out.splitlines()
    # Only stdio (and the fd listdir itself opens): no socket of the spawner, no log fd.
    assert fds == "['0', '1', '2', '3']"
    # Python itself ignores SIGPIPE at start-up: look at a process that does not.
    status = await run(manager, creds, "cat", "/proc/self/status")
    masks = {
        k: int(v, 16)
        for k, v in (line.split(":\t") for line in status.splitlines())
        if k in ("SigIgn", "SigBlk")
    }
    # glibc's posix_spawn leaves its two internal signals (32, 33) ignored in the child; the
    # new program's libc installs its own handlers for them at start-up.
    glibc_internal = (1 << 31) | (1 << 32)
    assert masks["SigIgn"] & ~glibc_internal == 0, masks
    assert masks["SigBlk"] == 0, masks
    assert leader == "True"
    assert cwd == str(tmp_path)
    assert stdin == "/dev/null"
    assert fifo == "True"
    assert parent == manager.cgroup_parent.name


@pytest.mark.usefixtures("path_checked")
async def test_exec_errors_are_reported(
    manager: JobManager, creds: Credentials | None, tmp_path: Path
) -> None:
    script = tmp_path / "bad.sh"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    with pytest.raises(SpawnError, match="No such file"):
        await manager.start(JobSpec(argv=(str(script),)), credentials=creds)
    assert manager.list() == []
    assert [p for p in manager.cgroup_parent.iterdir() if p.is_dir()] == []


@pytest.mark.usefixtures("path_checked")
async def test_spawner_stays_out_of_job_groups(
    manager: JobManager, creds: Credentials | None
) -> None:
    st = await manager.start(JobSpec(argv=("sleep", "1000")), credentials=creds)
    group = manager.cgroup_parent / st.id
    assert (group / "cgroup.procs").read_text().split() == [str(st.pid)]
    with open(f"/proc/{manager.spawner_pid}/cgroup") as f:
        assert st.id not in f.read()
    await manager.stop(st.id)


async def test_a_pids_limit_of_one_still_starts_the_job(
    manager: JobManager, fast_flags: list[bool]
) -> None:
    """With pids.max=1 there is no room for the spawner beside the child: such a job must be
    forked. Where the host has no pids controller (a hybrid host) the limit is refused
    instead, before anything is created: no spawn, no record, no group."""
    spec = JobSpec(argv=("true",), limits=Limits(pids=1))
    if "pids" in manager.available_controllers:
        st = await manager.start(spec)
        assert (await manager.wait(st.id)).exit_code == 0
        assert fast_flags == [False]
    else:
        with pytest.raises(LimitUnavailable, match="'pids' controller"):
            await manager.start(spec)
        assert fast_flags == []
        assert manager.list() == []
        assert [p for p in manager.cgroup_parent.iterdir() if p.is_dir()] == []


async def test_the_fast_path_is_kept_away_from_limits_that_could_catch_the_spawner(
    manager: JobManager,
) -> None:
    """While it posix_spawns, the spawner sits in the job's group: a pids.max of 1, a tight
    cpu.max or memory.max with memory.oom.group would catch it, so those jobs are forked."""
    me = Credentials()
    assert manager._fast(JobSpec(argv=("true",)), me)
    assert manager._fast(JobSpec(argv=("true",), limits=Limits(pids=2, cpu_weight=50)), me)
    for limits in (Limits(pids=1), Limits(memory=64 << 20), Limits(cpu=0.5)):
        assert not manager._fast(JobSpec(argv=("true",), limits=limits), me)
    assert not manager._fast(JobSpec(argv=("true",)), PATHS["fork"] or me)
