"""Sandboxed jobs (``JobSpec.sandbox``): PID, mount, IPC, UTS and (with ``Network.NONE``)
network namespaces made by the spawner before exec, behind a minimal init; private /tmp and
/dev/shm; masked paths; no_new_privs. Also, for every job: the pre-raise RLIMIT_NOFILE, and a
command lookup done with the job's own credentials."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import jobworker.starting as starting_module
from jobworker import Credentials, JobManager, JobSpec, JobState, SpawnError
from jobworker.spec import JobStatus, Network, Sandbox
from tests.conftest import cgroup2_usable, new_threads, open_fds, wait_for

SANDBOX = Sandbox()
NOBODY = Credentials(uid=65534, gid=65534)


async def output(mgr: JobManager, job_id: str) -> str:
    return b"".join([c async for c in mgr.output(job_id)]).decode()


async def run(
    mgr: JobManager,
    *argv: str,
    sandbox: Sandbox | None = SANDBOX,
    creds: Credentials | None = None,
    **spec: object,
) -> tuple[JobStatus, str]:
    st = await mgr.start(JobSpec(argv=argv, sandbox=sandbox, **spec), credentials=creds)  # type: ignore[arg-type]
    final = await mgr.wait(st.id)
    return final, await output(mgr, st.id)


def spawner_children(mgr: JobManager) -> list[str]:
    pid = mgr.spawner_pid
    return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()


def spawner_fds(mgr: JobManager) -> set[str]:
    return set(os.listdir(f"/proc/{mgr.spawner_pid}/fd"))


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory outside /tmp (a sandbox has its own /tmp) that ``nobody`` can reach."""
    d = Path(tempfile.mkdtemp(prefix="jobworker-sandbox-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.asynccontextmanager
async def opened(state_dir: Path, cgroup_name: str, **kwargs: object) -> AsyncIterator[JobManager]:
    """A manager of the test's own, with the ``manager`` fixture's leak checks."""
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    mgr = await JobManager.open(state_dir, cgroup_name=cgroup_name, stop_grace=1.0, **kwargs)  # type: ignore[arg-type]
    try:
        yield mgr
    finally:
        await mgr.close()
    assert not mgr.cgroup_parent.exists()
    assert not new_threads(threads_before)


# -- PID namespace ---------------------------------------------------------------------------


async def test_a_sandboxed_job_sees_only_its_own_processes(manager: JobManager) -> None:
    probe = "echo $$; ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; ps -e -o pid="
    final, out = await run(manager, "sh", "-c", probe)
    assert final.exit_code == 0, final
    me, proc_pids, *ps_pids = out.split("\n")
    # The init (1), the job's shell (2) and what it ran: nothing of the host.
    assert me == "2"
    # /proc: the init, the shell and the pipeline's four processes, at most.
    listed = [int(p) for p in proc_pids.split()]
    assert listed[:2] == [1, 2] and len(listed) <= 6 and max(listed) < 10, proc_pids
    # ps: the init, the shell and ps itself.
    assert len([p for p in ps_pids if p.strip()]) == 3, ps_pids
    # The control: without the sandbox the same probe sees the host (the daemon, at least).
    final, out = await run(manager, "sh", "-c", probe, sandbox=None)
    assert str(os.getpid()) in out.split("\n")[1].split()


async def test_exit_codes_and_signals_are_exact(manager: JobManager) -> None:
    final, _ = await run(manager, "sh", "-c", "exit 3")
    assert (final.exit_code, final.signal) == (3, None)
    final, _ = await run(manager, "sh", "-c", "kill -9 $$")
    assert (final.exit_code, final.signal) == (None, 9)
    final, _ = await run(manager, "sh", "-c", "kill -TERM $$")
    assert (final.exit_code, final.signal) == (None, 15)
    final, _ = await run(manager, "true")
    assert (final.exit_code, final.signal) == (0, None)
    assert final.state is JobState.EXITED


@pytest.mark.parametrize(
    ("argv", "processes"),
    [(("sleep", "600"), 2), (("sh", "-c", "sleep 600 & sleep 600 & exec sleep 600"), 4)],
    ids=["alone", "with-children"],
)
async def test_stop_reaches_the_job_with_sigterm(
    manager: JobManager, argv: tuple[str, ...], processes: int
) -> None:
    st = await manager.start(JobSpec(argv=argv, sandbox=SANDBOX))
    group = manager.cgroup_parent / st.id
    # The init and the job's processes, all in the job's group.
    await wait_for(lambda: len((group / "cgroup.procs").read_text().split()) == processes)
    # A grace far longer than the test: signal 15, not cgroup.kill's 9, ended it.
    final = await manager.stop(st.id, grace=600)
    assert final.state is JobState.STOPPED
    assert (final.exit_code, final.signal) == (None, 15), final


async def test_a_signal_to_the_init_is_forwarded_to_the_job(manager: JobManager) -> None:
    """The pid the manager reports is the init's: a SIGTERM sent to it reaches the job."""
    st = await manager.start(JobSpec(argv=("sh", "-c", "echo up; exec sleep 600"), sandbox=SANDBOX))
    await wait_for(lambda: manager.status(st.id).output_bytes > 0, what="the job's output")
    os.kill(st.pid, signal.SIGTERM)
    final = await manager.wait(st.id)
    assert (final.exit_code, final.signal) == (None, 15), final


async def test_orphans_are_reaped_inside_the_namespace(manager: JobManager) -> None:
    # The subshell exits at once: its sleep is an orphan, re-parented to the namespace's
    # init. Once it ends it must disappear from /proc (reaped), not stay a zombie.
    script = (
        "p=$(sh -c 'sleep 0.05 >/dev/null & echo $!');"
        "echo ppid=$(awk '/^PPid/ {print $2}' /proc/$p/status);"
        "for i in $(seq 1000); do [ -e /proc/$p ] || break; sleep 0.01; done;"
        "if [ -e /proc/$p ]; then echo left:$(awk '/^State/ {print $2}' /proc/$p/status);"
        "else echo reaped; fi;"
        "grep -l '^State:.*Z' /proc/[0-9]*/status || echo no-zombie"
    )
    final, out = await run(manager, "sh", "-c", script)
    assert final.exit_code == 0, (final, out)
    assert out.split() == ["ppid=1", "reaped", "no-zombie"], out


# -- mounts ----------------------------------------------------------------------------------


async def test_tmp_and_dev_shm_are_private(manager: JobManager) -> None:
    name = f"jobworker-marker-{os.getpid()}-{id(manager)}"
    writer = await manager.start(
        JobSpec(
            argv=(
                "sh",
                "-c",
                f"echo a > /tmp/{name} && echo a > /dev/shm/{name} && "
                f"ls /tmp /dev/shm | grep -c {name}; exec sleep 600",
            ),
            sandbox=SANDBOX,
        )
    )
    await wait_for(lambda: manager.status(writer.id).output_bytes > 0, what="the writer")
    assert (await output(manager, writer.id)).split() == ["2"]  # it sees its own files
    final, out = await run(manager, "sh", "-c", "ls -A /tmp /dev/shm; ls -ld /tmp /dev/shm")
    assert final.exit_code == 0
    assert name not in out
    assert out.count("drwxrwxrwt") == 2, out  # fresh, mode 1777
    assert not Path(f"/tmp/{name}").exists()
    assert not Path(f"/dev/shm/{name}").exists()
    await manager.stop(writer.id)


async def test_the_state_dir_and_hidden_paths_are_masked_even_for_root(
    public_dir: Path, cgroup_name: str
) -> None:
    state = public_dir / "state"
    secret_dir = public_dir / "pki"
    secret_dir.mkdir()
    (secret_dir / "key.pem").write_text("SECRET-KEY\n")
    policy = public_dir / "policy.toml"
    policy.write_text("SECRET-POLICY\n")
    missing = public_dir / "not-there"  # a hidden path that does not exist is no error
    async with opened(state, cgroup_name, hidden_paths=[secret_dir, policy, missing]) as mgr:
        probe = (
            f"ls -A {state} {secret_dir}; cat {policy}; cat {secret_dir}/key.pem;"
            f"echo x > {policy} || echo policy-read-only;"
            f"touch {secret_dir}/new || echo dir-read-only; id -u"
        )
        final, out = await run(mgr, "sh", "-c", probe)
        assert final.exit_code == 0, (final, out)
        assert "SECRET" not in out
        assert "jobs" not in out  # the state dir's own content
        assert "policy-read-only" in out and "dir-read-only" in out
        assert out.split()[-1] == "0"  # root, and still masked
        # The control: outside a sandbox the same probe sees all of it.
        final, out = await run(mgr, "sh", "-c", probe, sandbox=None)
        assert "SECRET-KEY" in out and "SECRET-POLICY" in out and "jobs" in out
    assert policy.read_text() == "x\n"  # the control wrote it: the masks were the sandbox's


async def test_a_root_job_cannot_unmount_the_masks(public_dir: Path, cgroup_name: str) -> None:
    """Masks only hide while they stay mounted: a sandboxed root job has no CAP_SYS_ADMIN to
    unmount them (nor to mount, nor to setns out)."""
    state = public_dir / "state"
    secret = public_dir / "secret"
    secret.mkdir()
    (secret / "key.pem").write_text("SECRET-KEY\n")
    async with opened(state, cgroup_name, hidden_paths=[secret]) as mgr:
        probe = (
            f"umount {secret} || echo umount-refused; umount -l {secret} || echo lazy-refused;"
            f"cat {secret}/key.pem; grep CapBnd /proc/self/status"
        )
        _, out = await run(mgr, "sh", "-c", probe)
        assert "SECRET" not in out, out
        assert "umount-refused" in out and "lazy-refused" in out, out
        bounding = int(out.split("CapBnd:")[1].split()[0], 16)
        assert not bounding & (1 << 21), f"CAP_SYS_ADMIN still in the bounding set: {out}"
        # The control: an unsandboxed root job keeps it.
        _, out = await run(mgr, "sh", "-c", "grep CapBnd /proc/self/status", sandbox=None)
        assert int(out.split("CapBnd:")[1].split()[0], 16) & (1 << 21)


async def test_namespaces_are_new_and_the_hostname_is_the_hosts(manager: JobManager) -> None:
    kinds = ("pid", "mnt", "ipc", "uts", "net")
    probe = "hostname; " + "; ".join(f"readlink /proc/self/ns/{k}" for k in kinds)
    final, out = await run(manager, "sh", "-c", probe)
    assert final.exit_code == 0
    hostname, *links = out.split()
    assert hostname == socket.gethostname()
    ours = {k: os.readlink(f"/proc/self/ns/{k}") for k in kinds}
    theirs = dict(zip(kinds, links, strict=True))
    for k in ("pid", "mnt", "ipc", "uts"):
        assert theirs[k] != ours[k], k
    assert theirs["net"] == ours["net"]  # Network.HOST: the host's network
    final, out = await run(manager, "readlink", "/proc/self/ns/net", sandbox=Sandbox(Network.NONE))
    assert out.strip() != ours["net"]


# -- network ---------------------------------------------------------------------------------

NET_PROBE = """
import socket, sys
print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
srv = socket.socket(); srv.bind(('127.0.0.1', 0)); srv.listen()
c = socket.create_connection(srv.getsockname(), timeout=5); a, _ = srv.accept()
c.sendall(b'ping'); print(a.recv(4).decode())
try:
    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)
    print('host-reached')
except OSError as e:
    print('host-unreachable', type(e).__name__)
"""


async def test_network_none_has_only_loopback_up(manager: JobManager) -> None:
    with socket.socket() as host_listener:
        host_listener.bind(("127.0.0.1", 0))
        host_listener.listen()
        port = str(host_listener.getsockname()[1])
        final, out = await run(
            manager, "python3", "-I", "-c", NET_PROBE, port, sandbox=Sandbox(Network.NONE)
        )
        assert final.exit_code == 0, (final, out)
        lines = out.splitlines()
        assert lines[0] == "['lo']"
        assert lines[1] == "ping"  # lo is up: a connection inside works
        assert lines[2].startswith("host-unreachable"), lines
        # The control: with the host's network the same listener is reached.
        final, out = await run(manager, "python3", "-I", "-c", NET_PROBE, port, sandbox=SANDBOX)
        assert out.splitlines()[2] == "host-reached", out
        assert out.splitlines()[0] != "['lo']"


# -- privileges and limits -------------------------------------------------------------------


async def test_no_new_privs_keeps_a_setuid_binary_from_gaining_root(
    manager: JobManager, public_dir: Path
) -> None:
    setuid_id = public_dir / "id"
    shutil.copy("/usr/bin/id", setuid_id)
    os.chown(setuid_id, 0, 0)
    setuid_id.chmod(0o4755)
    final, out = await run(manager, str(setuid_id), creds=NOBODY)
    assert final.exit_code == 0, (final, out)
    assert "uid=65534" in out and "euid=0" not in out, out
    # The control: outside a sandbox the setuid bit works.
    final, out = await run(manager, str(setuid_id), creds=NOBODY, sandbox=None)
    assert "uid=65534" in out and "euid=0" in out, out


async def test_jobs_get_the_nofile_soft_limit_from_before_the_raise(
    tmp_path: Path, cgroup_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manager raises its own RLIMIT_NOFILE to the hard limit; every job, however it is
    started (posix_spawn, fork, sandbox), gets back the soft limit from before the raise."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1001:
        pytest.skip(f"hard RLIMIT_NOFILE {hard} leaves no room for a raise")
    monkeypatch.setattr(starting_module, "_nofile_before_raise", [])
    resource.setrlimit(resource.RLIMIT_NOFILE, (1000, hard))
    try:
        async with opened(tmp_path / "state", cgroup_name) as mgr:
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)  # raised
            root = Credentials(uid=os.getuid(), gid=os.getgid())
            cases = {
                "posix_spawn": {"sandbox": None},
                "fork": {"sandbox": None, "creds": root},
                "sandbox": {},
            }
            for what, kwargs in cases.items():
                _final, out = await run(mgr, "sh", "-c", "ulimit -n; ulimit -Hn", **kwargs)  # type: ignore[arg-type]
                assert out.split() == ["1000", str(hard)], (what, out)
            # The spawner itself keeps the raised limit (it holds an fd per sandboxed job).
            limits = Path(f"/proc/{mgr.spawner_pid}/limits").read_text()
            line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
            assert line.split()[3] == str(hard), line
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# -- lookup with the job's credentials -------------------------------------------------------


async def test_a_job_learns_nothing_its_user_could_not(
    manager: JobManager, public_dir: Path
) -> None:
    """A file in a 0700 root directory answers a job as nobody exactly like a missing one."""
    secret = public_dir / "secret"
    secret.mkdir()
    prog = secret / "prog"
    prog.write_text("#!/bin/sh\necho ran\n")
    prog.chmod(0o755)
    secret.chmod(0o700)

    async def refusal(argv0: str, sandbox: Sandbox | None, path: str | None = None) -> str:
        env = {"PATH": path} if path else {}
        with pytest.raises(SpawnError) as e:
            await manager.start(
                JobSpec(argv=(argv0,), env=env, sandbox=sandbox), credentials=NOBODY
            )
        return str(e.value)

    absent = secret / "absent"
    elsewhere = str(public_dir / "absent")
    for sandbox in (None, SANDBOX):
        hidden = await refusal(str(prog), sandbox)
        assert hidden == f"command not found: {str(prog)!r} (no such file)"
        assert hidden.replace(str(prog), "X") == (await refusal(str(absent), sandbox)).replace(
            str(absent), "X"
        )
        in_path = await refusal("prog", sandbox, str(secret))
        assert in_path == f"command not found: 'prog' (searched PATH={secret})"
        assert in_path.replace(str(secret), "P") == (
            await refusal("prog", sandbox, elsewhere)
        ).replace(elsewhere, "P")
        # What nobody can see itself is answered as the root-side lookup answers it.
        assert await refusal("/etc/passwd", sandbox) == (
            "cannot execute '/etc/passwd': not an executable file"
        )
        with pytest.raises(SpawnError, match=r"^working directory '/no/such/dir' does not exist"):
            await manager.start(
                JobSpec(argv=("true",), cwd="/no/such/dir", sandbox=sandbox), credentials=NOBODY
            )
    # The control: as root the hidden program exists and runs.
    final, out = await run(manager, str(prog), sandbox=None)
    assert out == "ran\n"
    assert manager.list()[-1].id == final.id and len(manager.list()) == 1
    assert [p for p in manager.cgroup_parent.iterdir() if p.is_dir()] == []


# -- plumbing and leaks ----------------------------------------------------------------------


async def test_sandboxed_jobs_never_take_the_posix_spawn_path(manager: JobManager) -> None:
    assert manager._fast(JobSpec(argv=("true",)), Credentials())
    assert not manager._fast(JobSpec(argv=("true",), sandbox=SANDBOX), Credentials())
    st = await manager.start(JobSpec(argv=("sleep", "600"), sandbox=SANDBOX))
    # The job's pid is the init's: a child of the spawner, in the job's group with the job.
    assert spawner_children(manager) == [str(st.pid)]
    procs = (manager.cgroup_parent / st.id / "cgroup.procs").read_text().split()
    await wait_for(
        lambda: len((manager.cgroup_parent / st.id / "cgroup.procs").read_text().split()) == 2
    )
    assert str(st.pid) in procs
    await manager.stop(st.id)


async def test_sandboxed_jobs_leave_nothing_behind(manager: JobManager, tmp_path: Path) -> None:
    await run(manager, "true")  # the spawner's pid namespace fd is opened once, at the first
    fds, theirs = open_fds(), spawner_fds(manager)
    for _ in range(3):
        final, _out = await run(manager, "sh", "-c", "sleep 600 & sleep 600 & exit 0")
        assert final.exit_code == 0
        st = await manager.start(JobSpec(argv=("sleep", "600"), sandbox=Sandbox(Network.NONE)))
        await manager.stop(st.id)
        with pytest.raises(SpawnError):
            await manager.start(JobSpec(argv=("no-such-command-xyz",), sandbox=SANDBOX))
        with pytest.raises(SpawnError):
            await manager.start(JobSpec(argv=("true",), cwd="/no/such", sandbox=SANDBOX))
    assert open_fds() == fds
    assert spawner_fds(manager) == theirs  # every init's status pipe closed
    assert spawner_children(manager) == []
    assert [p for p in manager.cgroup_parent.iterdir() if p.is_dir()] == []
    # stdout, stderr, index + record
    assert len(os.listdir(tmp_path / "state" / "jobs")) == 4 * (1 + 3 * 2)


async def test_many_sandboxed_jobs_at_once(manager: JobManager) -> None:
    finals = await asyncio.gather(*(run(manager, "sh", "-c", f"exit {i}") for i in range(20)))
    assert [f.exit_code for f, _ in finals] == list(range(20))
