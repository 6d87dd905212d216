"""Every RPC against a real in-process daemon over mutual TLS: happy paths, streaming, resume,
followers, disconnects, bad input, shutdown and restart."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness
import grpc

# isort: on
import asyncio
import contextlib
import hashlib
import math
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from jobworker import IOLimit, JobManager, JobSpec, JobState, Limits, Network, Sandbox
from jobworker.api.proto import pb, pb_grpc
from jobworker.cgroup import controllers
from jobworker.cgroup.devices import resolve_limits
from jobworker.client import Client
from jobworker.errors import (
    InvalidArgument,
    JobNotFound,
    JobworkerError,
    LimitUnavailable,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    SpawnError,
)
from jobworker.server import service
from jobworker.server.daemon import Daemon, serve
from jobworker.tls import load_server
from tests.conftest import cgroup2_usable, open_fds, wait_for

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

GATED = 'echo first; while [ ! -e "$1" ]; do sleep 0.01; done; echo second'
"""A job that prints, then waits (polling, inside the job) until the test creates a file."""


async def collect(client: Client, job_id: str, **kwargs: object) -> list[tuple[int, bytes]]:
    return [c async for c in client.logs(job_id, **kwargs)]  # type: ignore[arg-type]


def joined(chunks: list[tuple[int, bytes]]) -> bytes:
    return b"".join(data for _, data in chunks)


def assert_contiguous(chunks: list[tuple[int, bytes]], start: int = 0) -> None:
    expected = start
    for offset, data in chunks:
        assert offset == expected
        expected += len(data)


# -- happy paths ------------------------------------------------------------------------------


async def test_start_status_wait_logs(connect: Connect) -> None:
    alice = connect("alice")
    st = await alice.start(
        ["sh", "-c", 'echo "$GREETING from $(pwd)"; sleep 0.01; echo err >&2; exit 3'],
        env={"GREETING": "hello"},
        cwd="/tmp",
    )
    assert st.state is JobState.RUNNING
    assert st.owner == "alice"
    assert st.argv == ("sh", "-c", 'echo "$GREETING from $(pwd)"; sleep 0.01; echo err >&2; exit 3')
    assert st.pid > 0
    final = await alice.wait(st.id)
    assert (final.state, final.exit_code, final.signal) == (JobState.EXITED, 3, None)
    assert final.ended_at is not None and final.ended_at >= final.started_at
    assert final.output_bytes == len(b"hello from /tmp\nerr\n")
    assert await alice.status(st.id) == final
    assert await collect(alice, st.id) == [(0, b"hello from /tmp\n"), (16, b"err\n")]


async def test_stop_reports_who_stopped(connect: Connect, tmp_path: Path) -> None:
    alice = connect("alice")
    st = await alice.start(["sh", "-c", GATED, "sh", str(tmp_path / "never")])
    final = await alice.stop(st.id, grace=0.5)
    assert final.state is JobState.STOPPED
    assert final.signal is not None
    assert final.reason == "stopped by alice"
    assert await alice.stop(st.id) == final  # stopping an ended job returns its final status


async def test_list_own_and_all(connect: Connect) -> None:
    alice, bob, root = connect("alice"), connect("bob"), connect("root")
    a = await alice.start(["true"])
    b = await bob.start(["true"])
    r = await root.start(["true"])
    for c, job in ((alice, a), (bob, b), (root, r)):
        await c.wait(job.id)
    assert [j.id for j in await alice.list()] == [a.id]
    assert [j.id for j in await alice.list(all=True)] == [a.id]
    assert [j.id for j in await root.list()] == [r.id]
    assert [j.id for j in await root.list(all=True)] == [a.id, b.id, r.id]
    assert [j.id for j in await connect("vera").list(all=True)] == [a.id, b.id, r.id]
    assert await connect("vera").list() == []


async def test_large_output_is_batched_and_exact(connect: Connect) -> None:
    alice = connect("alice")
    st = await alice.start(["sh", "-c", "seq 1 200000"])
    await alice.wait(st.id)
    chunks = await collect(alice, st.id)
    expected = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    assert joined(chunks) == expected
    assert_contiguous(chunks)
    # Batched: one message per tens of KiB, not per line.
    assert all(len(data) >= 16 * 1024 for _, data in chunks[:-1])
    assert len(chunks) <= math.ceil(len(expected) / (16 * 1024))


async def test_follow_streams_live_output_and_ends_with_the_job(
    connect: Connect, tmp_path: Path
) -> None:
    alice = connect("alice")
    gate = tmp_path / "gate"
    st = await alice.start(["sh", "-c", GATED, "sh", str(gate)])
    stream = alice.logs(st.id, follow=True)
    assert await anext(stream) == (0, b"first\n")
    gate.touch()
    rest = [c async for c in stream]
    assert joined(rest) == b"second\n"
    assert_contiguous(rest, len(b"first\n"))
    assert (await alice.status(st.id)).state is JobState.EXITED


async def test_resume_from_offset_loses_and_repeats_nothing(
    connect: Connect, tmp_path: Path
) -> None:
    alice = connect("alice")
    gate = tmp_path / "gate"
    script = 'seq 1 50000; while [ ! -e "$1" ]; do sleep 0.01; done; seq 50001 100000'
    st = await alice.start(["sh", "-c", script, "sh", str(gate)])
    received = b""
    async for offset, data in alice.logs(st.id, follow=True):
        assert offset == len(received)
        received += data
        break  # the connection "drops" after the first chunk
    gate.touch()
    async for offset, data in alice.logs(st.id, follow=True, offset=len(received)):
        assert offset == len(received)
        received += data
    assert received == "".join(f"{i}\n" for i in range(1, 100001)).encode()
    # From any offset of an ended job, too.
    tail = await collect(alice, st.id, offset=len(received) - 7)
    assert tail == [(len(received) - 7, b"100000\n")]
    assert await collect(alice, st.id, offset=len(received)) == []


async def test_many_followers_get_identical_bytes(connect: Connect, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    script = 'while [ ! -e "$1" ]; do sleep 0.01; done; head -c 3000000 /dev/urandom | base64'
    alice = connect("alice")
    st = await alice.start(["sh", "-c", script, "sh", str(gate)])
    followers = [connect(user) for user in ("alice", "root", "vera") for _ in range(8)]

    async def follow(c: Client) -> bytes:
        chunks = await collect(c, st.id, follow=True)
        assert_contiguous(chunks)
        return joined(chunks)

    tasks = [asyncio.create_task(follow(c)) for c in followers]
    gate.touch()
    outputs = await asyncio.gather(*tasks)
    final = await alice.wait(st.id)
    full = joined(await collect(alice, st.id))
    assert len(full) == final.output_bytes > 4_000_000
    digest = hashlib.sha256(full).hexdigest()
    assert {hashlib.sha256(o).hexdigest() for o in outputs} == {digest}


# -- clients that go away ---------------------------------------------------------------------


def log_fds(job_id: str) -> list[int]:
    """This process's fds open on the job's files (the server's log readers)."""
    found = []
    for fd in open_fds():
        with contextlib.suppress(OSError):
            if job_id in os.readlink(f"/proc/self/fd/{fd}"):
                found.append(fd)
    return found


def in_flight(d: Daemon, method: str) -> float:
    value = d.metrics.in_flight.labels(method)._value.get()
    assert isinstance(value, float)
    return value


def follower_gauge(d: Daemon) -> float:
    value = d.metrics.followers._value.get()  # prometheus_client keeps no public getter
    assert isinstance(value, float)
    return value


FOLLOWER_PROCESS = """
import asyncio, sys
from pathlib import Path
from jobworker.client import Client

async def main():
    async with Client.from_pki(sys.argv[1], Path(sys.argv[2]), "alice") as c:
        async for offset, data in c.logs(sys.argv[3], follow=True):
            print(offset, data, flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["cancel", "close-client", "kill-client-process"])
async def test_client_disconnecting_mid_stream_leaves_nothing(
    daemon: Daemon, pki_dir: Path, tmp_path: Path, how: str
) -> None:
    address = f"127.0.0.1:{daemon.port}"
    owner = Client.from_pki(address, pki_dir, "alice")
    st = await owner.start(["sh", "-c", GATED, "sh", str(tmp_path / "gate")])
    tasks_before = harness.other_tasks()
    readers_before = log_fds(st.id)
    if how == "kill-client-process":
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            FOLLOWER_PROCESS,
            address,
            str(pki_dir),
            st.id,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert await proc.stdout.readline() == b"0 b'first\\n'\n"
        assert follower_gauge(daemon) == 1
        proc.kill()
        await proc.wait()
    else:
        client = Client.from_pki(address, pki_dir, "alice")
        stream = client.logs(st.id, follow=True)
        assert await anext(stream) == (0, b"first\n")
        assert follower_gauge(daemon) == 1
        # One fd on each of the job's files: its stdout, its stderr, its index.
        assert len(log_fds(st.id)) == len(readers_before) + 3
        if how == "cancel":
            await stream.aclose()
            await client.close()
        else:
            await client.close()
            with pytest.raises(RemoteError, match="the client was closed"):
                await anext(stream)
    await wait_for(
        lambda: (
            follower_gauge(daemon) == 0
            and harness.other_tasks() <= tasks_before
            and log_fds(st.id) == readers_before
        ),
        what="the server to end the stream, its task and its reader",
    )
    # The job is unaffected.
    (tmp_path / "gate").touch()
    assert (await owner.wait(st.id)).exit_code == 0
    await owner.close()


# -- bad input --------------------------------------------------------------------------------


def raw_stub(
    daemon: Daemon, pki_dir: Path, user: str = "alice"
) -> tuple[grpc.aio.Channel, pb_grpc.JobWorkerAsyncStub]:
    ca, key, cert = (
        (pki_dir / n).read_bytes() for n in ("ca.pem", f"{user}-key.pem", f"{user}.pem")
    )
    ch = harness.channel(daemon.port, ca, key, cert)
    return ch, pb_grpc.JobWorkerStub(ch)


START_CASES: list[tuple[str, pb.StartRequest, grpc.StatusCode, str]] = [
    ("no argv", pb.StartRequest(), grpc.StatusCode.INVALID_ARGUMENT, "argv must be a non-empty"),
    ("empty command", pb.StartRequest(argv=[""]), grpc.StatusCode.INVALID_ARGUMENT, "argv[0]"),
    ("NUL in arg", pb.StartRequest(argv=["echo", "a\0b"]), grpc.StatusCode.INVALID_ARGUMENT, "NUL"),
    (
        "no such command",
        pb.StartRequest(argv=["no-such-cmd-x"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "command not found",
    ),
    (
        "relative cwd",
        pb.StartRequest(argv=["true"], cwd="tmp"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "absolute",
    ),
    (
        "missing cwd",
        pb.StartRequest(argv=["true"], cwd="/no/such/dir"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "working directory",
    ),
    (
        "bad env name",
        pb.StartRequest(argv=["true"], env={"A=B": "1"}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "environment variable name",
    ),
    (
        "argv too big",
        pb.StartRequest(argv=["true"] + ["x" * 100_000] * 12),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at most 1048576",
    ),
    (
        "request too big",
        pb.StartRequest(argv=["true"] + ["x" * 100_000] * 50),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    (
        "cpu zero",
        pb.StartRequest(argv=["true"], limits=pb.Limits(cpu=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cpu",
    ),
    (
        "cpu NaN",
        pb.StartRequest(argv=["true"], limits=pb.Limits(cpu=math.nan)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cpu",
    ),
    (
        "weight zero",
        pb.StartRequest(argv=["true"], limits=pb.Limits(cpu_weight=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "cpu_weight",
    ),
    (
        "memory tiny",
        pb.StartRequest(argv=["true"], limits=pb.Limits(memory=1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "memory",
    ),
    (
        "pids zero",
        pb.StartRequest(argv=["true"], limits=pb.Limits(pids=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pids",
    ),
    (
        "io no device",
        pb.StartRequest(argv=["true"], limits=pb.Limits(io=[pb.IOLimit(read_bps=1)])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "io device",
    ),
    (
        "io nothing set",
        pb.StartRequest(argv=["true"], limits=pb.Limits(io=[pb.IOLimit(device="8:0")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "sets nothing",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_", "code", "message"), START_CASES, ids=[c[0] for c in START_CASES]
)
async def test_bad_start_requests(
    daemon: Daemon,
    pki_dir: Path,
    case: str,
    request_: pb.StartRequest,
    code: grpc.StatusCode,
    message: str,
) -> None:
    ch, stub = raw_stub(daemon, pki_dir)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Start(request_)
    finally:
        await ch.close(None)
    assert e.value.code() == code
    assert message in (e.value.details() or "")
    assert daemon.manager.list() == []


async def test_limit_the_host_cannot_enforce_is_failed_precondition(
    daemon: Daemon, connect: Connect
) -> None:
    missing = {"pids", "memory", "cpu"} - daemon.manager.available_controllers
    if not missing:
        pytest.skip("this host enforces pids, memory and cpu")
    limits = {"pids": Limits(pids=10), "memory": Limits(memory=64 << 20), "cpu": Limits(cpu=1)}
    with pytest.raises(LimitUnavailable, match="controller"):
        await connect("alice").start(["true"], limits=limits[sorted(missing)[0]])
    assert daemon.manager.list() == []


ID_CASES: list[tuple[str, str, type[JobworkerError], str]] = [
    ("empty id", "", InvalidArgument, "a job id is required"),
    ("long id", "x" * 200, InvalidArgument, "at most 128 bytes"),
    ("unknown id", "0f1e2d3c-no-such-job", JobNotFound, "no job with id '0f1e2d3c-no-such-job'"),
]


@pytest.mark.parametrize(
    ("case", "job_id", "error", "message"), ID_CASES, ids=[c[0] for c in ID_CASES]
)
@pytest.mark.parametrize("call", ["stop", "status", "wait", "logs"])
async def test_bad_job_ids(
    connect: Connect, case: str, job_id: str, error: type[JobworkerError], message: str, call: str
) -> None:
    c = connect("root")
    calls: dict[str, Callable[[], object]] = {
        "stop": lambda: c.stop(job_id),
        "status": lambda: c.status(job_id),
        "wait": lambda: c.wait(job_id),
        "logs": lambda: collect(c, job_id),
    }
    with pytest.raises(error) as e:
        await calls[call]()  # type: ignore[misc]
    assert type(e.value) is error
    assert message in str(e.value)


@pytest.mark.parametrize("grace", [-1.0, math.inf, math.nan, 7200.0])
async def test_bad_stop_grace(connect: Connect, tmp_path: Path, grace: float) -> None:
    alice = connect("alice")
    st = await alice.start(["sh", "-c", GATED, "sh", str(tmp_path / "gate")])
    with pytest.raises(InvalidArgument, match="grace_seconds"):
        await alice.stop(st.id, grace=grace)
    assert (await alice.status(st.id)).state is JobState.RUNNING
    (tmp_path / "gate").touch()
    await alice.wait(st.id)


async def test_offset_past_the_end_of_an_ended_job(connect: Connect) -> None:
    alice = connect("alice")
    st = await alice.start(["echo", "hi"])
    await alice.wait(st.id)
    with pytest.raises(
        InvalidArgument, match=r"offset 4 is past the end of the output \(3 bytes\)"
    ):
        await collect(alice, st.id, offset=4)


async def test_spawn_error_is_invalid_argument(connect: Connect) -> None:
    """INVALID_ARGUMENT on the wire; the error trailer gives the client back the very class."""
    with pytest.raises(SpawnError, match="command not found") as e:
        await connect("alice").start(["/no/such/binary"])
    assert isinstance(e.value, InvalidArgument)


async def test_request_too_large_is_resource_exhausted(connect: Connect) -> None:
    with pytest.raises(ResourceExhausted, match="larger than max"):
        await connect("alice").start(["true"] + ["x" * 100_000] * 50)


# -- limits policy ----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def capped(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, caps: Limits
) -> AsyncIterator[int]:
    """The port of a service with these ``--max-*`` caps. workerd refuses to start with caps the
    host cannot enforce (test_service_daemon), but the caps' check of a request comes before any
    host check: on such a host the service is assembled from its parts to test it anyway."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    config = harness.make_config(tmp_path / "state", pki_dir, cgroup_name, max_limits=caps)
    manager = await JobManager.open(config.state_dir, cgroup_name=cgroup_name)
    try:
        controllers.check(resolve_limits(caps), manager.available_controllers)
    except LimitUnavailable:
        settings = service.Settings(max_limits=resolve_limits(caps), job_account="root")
        servicer = service.JobWorkerService(manager, settings)
        try:
            running = await service.start_server(servicer, load_server(config.tls), config.listen)
            try:
                yield running.port
            finally:
                await running.server.stop(None)
        finally:
            await manager.close()
        return
    await manager.close()
    d = await serve(config)
    try:
        yield d.port
    finally:
        await d.close()


async def test_caps_refuse_requests_above_them(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    caps = Limits(memory=256 << 20, pids=64)
    async with (
        capped(tmp_path, pki_dir, cgroup_name, caps) as port,
        Client.from_pki(f"127.0.0.1:{port}", pki_dir, "alice") as c,
    ):
        with pytest.raises(
            InvalidArgument, match="memory: 1G is above this daemon's maximum of 256M"
        ):
            await c.start(["true"], limits=Limits(memory=1 << 30))
        with pytest.raises(InvalidArgument, match="pids: 100 is above"):
            await c.start(["true"], limits=Limits(pids=100))


def _root_disk() -> tuple[str, str] | None:
    """(a block device path, its whole disk's MAJ:MIN) for the disk under /, if there is one."""
    dev = os.stat("/").st_dev
    sysdir = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not sysdir.exists():
        return None
    disk = sysdir.resolve().parent if (sysdir / "partition").exists() else sysdir.resolve()
    name = disk.name
    node = Path("/dev") / name
    if not node.exists():
        return None
    return str(node), (disk / "dev").read_text().strip()


async def test_io_caps_apply_whatever_the_device_is_called(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """A cap on MAJ:MIN must also catch a request that names the device by path."""
    disk = _root_disk()
    if disk is None:
        pytest.skip("no block device under / to name")
    path, majmin = disk
    caps = Limits(io=(IOLimit(majmin, write_bps=1 << 20),))
    async with (
        capped(tmp_path, pki_dir, cgroup_name, caps) as port,
        Client.from_pki(f"127.0.0.1:{port}", pki_dir, "alice") as c,
    ):
        for name in (path, majmin):
            with pytest.raises(InvalidArgument, match=f"io {majmin} write_bps: .* is above"):
                await c.start(["true"], limits=Limits(io=(IOLimit(name, write_bps=10 << 20),)))


async def test_defaults_above_caps_refuse_to_serve(tmp_path: Path, pki_dir: Path) -> None:
    config = harness.make_config(
        tmp_path / "state",
        pki_dir,
        "unused",
        default_limits=Limits(pids=100),
        max_limits=Limits(pids=10),
    )
    with pytest.raises(InvalidArgument, match="pids: 100 is above"):
        await serve(config)
    assert not (tmp_path / "state").exists()


# -- shutdown and restart ---------------------------------------------------------------------


async def test_graceful_shutdown_ends_streams_cleanly(
    daemon: Daemon, connect: Connect, tmp_path: Path
) -> None:
    alice = connect("alice")
    st = await alice.start(["sh", "-c", GATED, "sh", str(tmp_path / "never")])
    stream = alice.logs(st.id, follow=True)
    assert await anext(stream) == (0, b"first\n")
    waiter = asyncio.create_task(alice.wait(st.id))
    rest = asyncio.create_task(collect_rest(stream))
    await wait_for(lambda: in_flight(daemon, "Wait") == 1, what="the Wait call to arrive")
    await daemon.close()
    assert await rest == []  # ended normally: no error, nothing lost
    final = await waiter
    assert final.state is JobState.STOPPED
    assert final.reason == "stopped: the job manager shut down"
    with pytest.raises(ShuttingDown):
        await alice.status(st.id)


async def collect_rest(stream: object) -> list[tuple[int, bytes]]:
    return [c async for c in stream]  # type: ignore[attr-defined]


async def test_manager_shutting_down_is_unavailable(daemon: Daemon, connect: Connect) -> None:
    await daemon.manager.close()
    with pytest.raises(ShuttingDown, match="no new jobs are accepted"):
        await connect("alice").start(["true"])


async def test_restart_keeps_records_and_logs(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    config = harness.make_config(tmp_path / "state", pki_dir, cgroup_name)
    first = await serve(config)
    try:
        async with Client.from_pki(f"127.0.0.1:{first.port}", pki_dir, "alice") as c:
            done = await c.start(["sh", "-c", "echo done; exit 4"])
            done_final = await c.wait(done.id)
            running = await c.start(["sh", "-c", GATED, "sh", str(tmp_path / "never")])
            assert await anext(c.logs(running.id, follow=True)) == (0, b"first\n")
    finally:
        await first.close()
    second = await serve(config)
    try:
        async with Client.from_pki(f"127.0.0.1:{second.port}", pki_dir, "alice") as c:
            assert await c.status(done.id) == done_final
            assert joined(await collect(c, done.id)) == b"done\n"
            stopped = await c.status(running.id)
            assert stopped.state is JobState.STOPPED
            assert joined(await collect(c, running.id, follow=True)) == b"first\n"
        async with Client.from_pki(f"127.0.0.1:{second.port}", pki_dir, "bob") as bob:
            with pytest.raises(JobNotFound):
                await bob.status(done.id)
    finally:
        await second.close()


async def test_spec_roundtrip_through_api(daemon: Daemon, connect: Connect) -> None:
    """What the daemon records is what was asked, with the caller as owner."""
    alice = connect("alice")
    st = await alice.start(["env"], env={"A": "1"}, cwd="/tmp")
    await alice.wait(st.id)
    assert daemon.manager.spec(st.id) == JobSpec(
        argv=("env",), env={"A": "1"}, cwd="/tmp", owner="alice", sandbox=Sandbox(Network.HOST)
    )


async def test_a_pids_limit_of_one(daemon: Daemon, connect: Connect) -> None:
    """The smallest task limits through the daemon: a sandboxed job (every job, by default)
    needs pids >= 2, its init counting, so pids=1 is INVALID_ARGUMENT saying why, before
    anything is created; pids=2 runs where the host has a pids controller, and is refused
    (FAILED_PRECONDITION) before anything is created where it has none."""
    client = connect("alice")
    with pytest.raises(InvalidArgument, match="init counts as a task"):
        await client.start(["true"], limits=Limits(pids=1))
    if "pids" in daemon.manager.available_controllers:
        st = await client.start(["true"], limits=Limits(pids=2))
        assert st.limits.pids == 2
        assert (await client.wait(st.id)).exit_code == 0
        return
    with pytest.raises(LimitUnavailable, match="'pids' controller"):
        await client.start(["true"], limits=Limits(pids=2))
    assert await client.list(all=True) == []
