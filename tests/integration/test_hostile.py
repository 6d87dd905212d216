"""Hostile and malformed requests against a real in-process daemon, property-based.

Every request is sent on a raw channel (the typed client would refuse some of them itself), its
status code is compared with what an oracle written here — independently of the daemon's code —
says it must be, and after each hypothesis run the daemon must still serve and have leaked no
cgroup, fd, task or RPC. Example counts are bounded so the whole module runs in CI in seconds.
"""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness
import grpc

# isort: on
import asyncio
import math
import os
import resource
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from jobworker.api.proto import pb, pb_grpc
from jobworker.server.daemon import Daemon
from jobworker.spec import MINIMAL_ENV
from tests.conftest import open_fds, wait_for

pki_dir, daemon = harness.pki_dir, harness.daemon

Code = grpc.StatusCode
OK, INVALID, NOT_FOUND = Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND
PRECONDITION, TOO_BIG = Code.FAILED_PRECONDITION, Code.RESOURCE_EXHAUSTED

# The bounds, written out here rather than imported, so a changed bound fails a test.
ARG_MAX_BYTES = 128 * 1024  # Linux MAX_ARG_STRLEN, one argument or variable
ARGV_ENV_MAX_BYTES = 1024 * 1024
REQUEST_MAX_BYTES = 4 * 1024 * 1024
ID_MAX_BYTES = 128
S64 = (1 << 63) - 1
U64 = (1 << 64) - 1

HYPOTHESIS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
"""One daemon per test function, shared by its examples on purpose: the leak check runs after
the whole run."""


@dataclass
class Rig:
    daemon: Daemon
    stub: pb_grpc.JobWorkerAsyncStub
    channel: grpc.aio.Channel

    async def call(self, method: str, request: object) -> tuple[Code, str, list[pb.LogsChunk]]:
        """(code, details, chunks) of one call; the status, never an exception."""
        chunks: list[pb.LogsChunk] = []
        try:
            if method == "Logs":
                async for chunk in self.stub.Logs(request):  # type: ignore[arg-type]
                    chunks.append(chunk)
            else:
                await getattr(self.stub, method)(request)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or "", chunks
        return OK, "", chunks

    async def raw(self, method: str, data: bytes) -> tuple[Code, str]:
        """Send ``data`` as the serialized request, bypassing protobuf on the client."""
        path = f"/jobworker.v1.JobWorker/{method}"
        try:
            if method == "Logs":
                async for _ in self.channel.unary_stream(path, _same, _same)(data):
                    pass
            else:
                await self.channel.unary_unary(path, _same, _same)(data)
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
        return OK, ""


def _same(data: bytes) -> bytes:
    return data


def job_groups(d: Daemon) -> list[str]:
    return sorted(p.name for p in d.manager.cgroup_parent.iterdir() if p.is_dir())


@pytest.fixture
async def rig(daemon: Daemon, pki_dir: Path) -> AsyncIterator[Rig]:
    """A raw channel as root (admin: every job is visible, so NOT_FOUND means "no such job").
    Afterwards: every job ended, no job group, fd, task or RPC left, and the daemon serves."""
    ca, key, cert = ((pki_dir / n).read_bytes() for n in ("ca.pem", "root-key.pem", "root.pem"))
    channel = harness.channel(daemon.port, ca, key, cert)
    r = Rig(daemon, pb_grpc.JobWorkerStub(channel), channel)
    # Warm every path once (grpc opens some fds lazily), then take the baseline.
    warm = await r.call("Start", pb.StartRequest(argv=["true"]))
    assert warm[0] is OK
    await r.call("Wait", pb.WaitRequest(id=daemon.manager.list()[0].id))
    await r.call("Logs", pb.LogsRequest(id=daemon.manager.list()[0].id))
    await r.raw("Status", b"\xff")
    fds, tasks = open_fds(), harness.other_tasks()
    try:
        yield r
        await wait_for(
            lambda: all(s.state.ended for s in daemon.manager.list()), what="every job to end"
        )
        await wait_for(lambda: job_groups(daemon) == [], what="job groups to be removed")
        await wait_for(lambda: open_fds() == fds, what=f"fds back to {sorted(fds)}")
        await wait_for(lambda: harness.other_tasks() <= tasks, what="the daemon's tasks to end")
        for method in ("Start", "Stop", "Status", "List", "Logs", "Wait"):
            assert daemon.metrics.in_flight.labels(method)._value.get() == 0
        assert daemon.metrics.followers._value.get() == 0
        # Still serving, and correctly.
        code, _, _ = await r.call("Start", pb.StartRequest(argv=["printf", "alive"]))
        assert code is OK
    finally:
        await channel.close(None)


# -- Start: argv -----------------------------------------------------------------------------


def kernel_arg_limit() -> int:
    """execve's room for strings and pointers: a quarter of the stack rlimit, at most 6 MiB."""
    soft, _ = resource.getrlimit(resource.RLIMIT_STACK)
    quarter = (6 << 20) if soft == resource.RLIM_INFINITY else soft // 4
    return min(6 << 20, quarter)


def expected_start(argv: list[str], env: dict[str, str], command_exists: bool) -> set[Code]:
    """The codes a Start may end with. INVALID_ARGUMENT from this oracle's own bounds must come
    from checking the request, before any process exists (see :func:`check_start`)."""
    request = pb.StartRequest(argv=argv, env=env)
    if request.ByteSize() > REQUEST_MAX_BYTES:
        return {TOO_BIG}
    if not argv or argv[0] == "":
        return {INVALID}
    if any("\0" in t for t in [*argv, *env, *env.values()]):
        return {INVALID}
    if any(not k or "=" in k for k in env):
        return {INVALID}
    # execve counts the terminating NUL against MAX_ARG_STRLEN.
    strings = [a.encode() + b"\0" for a in argv] + [
        f"{k}={v}".encode() + b"\0" for k, v in env.items()
    ]
    if any(len(s) > ARG_MAX_BYTES for s in strings):
        return {INVALID}
    total = sum(map(len, strings))
    if total > ARGV_ENV_MAX_BYTES:
        return {INVALID}
    if not command_exists:
        return {INVALID}
    full_env = {**MINIMAL_ENV, **env}
    need = 8 * (len(argv) + len(full_env) + 2) + 64
    need += sum(len(a.encode()) + 1 for a in argv)
    need += sum(len(f"{k}={v}".encode()) + 1 for k, v in full_env.items())
    limit = kernel_arg_limit()
    if need > limit:
        return {E2BIG}
    if need > limit - 64 * 1024:
        return {OK, E2BIG}  # too close to call from here
    return {OK}


E2BIG = Code.ABORTED
"""Oracle-only stand-in: INVALID_ARGUMENT from execve itself (E2BIG), after the checks."""


COMMANDS = st.one_of(
    st.just("printf"),
    st.just(""),
    st.text(max_size=12).map(lambda s: "no-such-command-" + s),
    st.text(max_size=12).map(lambda s: "/no/such/dir/" + s),
    st.integers(ARG_MAX_BYTES - 20, ARG_MAX_BYTES + 2).map(
        lambda n: "no-such-command-" * (n // 16)
    ),
)
"""argv[0]: the one harmless command that runs, or names that cannot exist (never a random
command run as root)."""

ARG = st.one_of(
    st.text(max_size=40),
    st.just(""),
    st.text(max_size=5).map(lambda s: s + "\0" + s),
    st.integers(ARG_MAX_BYTES - 2, ARG_MAX_BYTES + 2).map(lambda n: "x" * n),
    st.integers(1, 40_000).map(lambda n: "é" * n),
)

BIG_COUNTS = [1000, 100_000, 300_000, 600_000]
"""Argument counts: ordinary, large, past what execve takes, past our 1 MiB."""

ARGS = st.one_of(
    st.lists(ARG, max_size=10),
    st.sampled_from(BIG_COUNTS).map(lambda n: ["a"] * n),
    st.just(["x" * 100_000] * 45),  # past the 4 MiB request limit
)


async def check_start(rig: Rig, argv: list[str], env: dict[str, str], output: bytes) -> None:
    command_exists = bool(argv) and argv[0] in ("printf", "/usr/bin/env")
    expected = expected_start(argv, env, command_exists)
    code, details, _ = await rig.call("Start", pb.StartRequest(argv=argv, env=env))
    assert len(details.encode()) < 2048, "details travel in a header: they must stay short"
    if code is INVALID and "Argument list too long" in details:
        code = E2BIG
    assert code in expected, (code, details[:300])
    if code is not OK:
        assert details, "an error must say why"
        return
    job = rig.daemon.manager.list()[-1]
    assert job.argv == tuple(argv)
    await rig.call("Wait", pb.WaitRequest(id=job.id))
    code, _, chunks = await rig.call("Logs", pb.LogsRequest(id=job.id))
    assert code is OK
    got = b"".join(c.data for c in chunks)
    if argv[0] == "printf":
        assert got == output
    else:
        assert set(got.split(b"\0")[:-1]) == {
            f"{k}={v}".encode() for k, v in {**MINIMAL_ENV, **env}.items()
        }


@HYPOTHESIS
@given(command=COMMANDS, args=ARGS)
async def test_start_with_hostile_argv(rig: Rig, command: str, args: list[str]) -> None:
    argv = [command, "%s\n", *args]
    output = b"".join(a.encode() + b"\n" for a in args) if args else b"\n"
    await check_start(rig, argv, {}, output)


async def test_start_with_empty_argv(rig: Rig) -> None:
    code, details, _ = await rig.call("Start", pb.StartRequest())
    assert (code, details) == (
        INVALID,
        "argv must be a non-empty list of strings (the command first)",
    )


ENV_TEXT = st.one_of(
    st.text(max_size=12),
    st.just(""),
    st.text(max_size=3).map(lambda s: s + "=" + s),
    st.text(max_size=3).map(lambda s: s + "\0"),
    st.integers(ARG_MAX_BYTES - 2, ARG_MAX_BYTES + 2).map(lambda n: "v" * n),
)


@HYPOTHESIS
@given(env=st.dictionaries(ENV_TEXT, ENV_TEXT, max_size=10))
async def test_start_with_hostile_env(rig: Rig, env: dict[str, str]) -> None:
    # Not even a PATH of the request's own can change which binary runs: it is absolute.
    await check_start(rig, ["/usr/bin/env", "-0"], env, b"")


# -- Start: limits ---------------------------------------------------------------------------


def maybe(values: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.one_of(st.none(), values)


CPU = maybe(
    st.one_of(
        st.sampled_from([0.0, 0.009, 0.01, 1.0, 8192.0, 8192.5, -1.0, math.inf, -math.inf]),
        st.just(math.nan),
        st.floats(),
    )
)
WEIGHT = maybe(
    st.one_of(st.sampled_from([0, 1, 10_000, 10_001, (1 << 32) - 1]), st.integers(0, (1 << 32) - 1))
)
MEMORY = maybe(st.sampled_from([0, 1, (1 << 20) - 1, 1 << 20, 64 << 20, S64, S64 + 1, U64]))
PIDS = maybe(st.sampled_from([0, 1, 2, 4_194_304, 4_194_305, U64]))
IO_VALUE = maybe(st.sampled_from([0, 1, 10 << 20, S64, S64 + 1, U64]))
DEVICE = st.sampled_from(
    ["", " ", "8:0", "7:0", "9999:9999", "/dev/null", "/dev/loop0", "a b", "x\0"]
)
IO = st.lists(st.tuples(DEVICE, IO_VALUE, IO_VALUE, IO_VALUE, IO_VALUE), max_size=3)


def expected_limits(
    cpu: float | None,
    weight: int | None,
    memory: int | None,
    pids: int | None,
    io: list[tuple[str, int | None, int | None, int | None, int | None]],
    available: frozenset[str],
) -> Code:
    if cpu is not None and not (math.isfinite(cpu) and 0.01 <= cpu <= 8192):
        return INVALID
    if weight is not None and not 1 <= weight <= 10_000:
        return INVALID
    if memory is not None and not (1 << 20) <= memory <= S64:
        return INVALID
    # Daemon jobs are sandboxed, and a sandbox's init counts as a task: pids must be >= 2.
    if pids is not None and not 2 <= pids <= 4_194_304:
        return INVALID
    devices = [d for d, *_ in io]
    for device, *values in io:
        if not device.strip() or any(c in device for c in " \n\0"):
            return INVALID
        if any(v is not None and not 1 <= v <= S64 for v in values):
            return INVALID
        if all(v is None for v in values):
            return INVALID
    if len(set(devices)) != len(devices):
        return INVALID
    # The request is checked whole before the host is asked what it can enforce: devices are
    # resolved to their whole disk first (two names for one disk are one device given twice).
    if not all(is_block_device(d) for d in devices):
        return INVALID
    whole = [whole_disk(d) for d in devices]
    if len(set(whole)) != len(whole):
        return INVALID
    needed = {
        c
        for c, v in (("cpu", cpu), ("cpu", weight), ("memory", memory), ("pids", pids))
        if v is not None
    } | ({"io"} if io else set())
    if not needed <= available:
        return PRECONDITION
    return OK


def whole_disk(device: str) -> str:
    """MAJ:MIN of the disk a (known) block device path or number is, or is a partition of."""
    if device.startswith("/"):
        rdev = os.stat(device).st_rdev
        device = f"{os.major(rdev)}:{os.minor(rdev)}"
    sys_dir = Path("/sys/dev/block", device)
    if (sys_dir / "partition").exists():
        return (sys_dir.resolve().parent / "dev").read_text().strip()
    return device


def is_block_device(device: str) -> bool:
    if device.startswith("/"):
        try:
            st_ = os.stat(device)
        except OSError:
            return False
        return stat.S_ISBLK(st_.st_mode)
    return Path("/sys/dev/block", device).exists()


@HYPOTHESIS
@given(cpu=CPU, weight=WEIGHT, memory=MEMORY, pids=PIDS, io=IO)
async def test_limits_at_and_beyond_every_bound(
    rig: Rig,
    cpu: float | None,
    weight: int | None,
    memory: int | None,
    pids: int | None,
    io: list[tuple[str, int | None, int | None, int | None, int | None]],
) -> None:
    limits = pb.Limits(
        cpu=cpu,
        cpu_weight=weight,
        memory=memory,
        pids=pids,
        io=[
            pb.IOLimit(device=d, read_bps=rb, write_bps=wb, read_iops=ri, write_iops=wi)
            for d, rb, wb, ri, wi in io
        ],
    )
    expected = expected_limits(
        cpu, weight, memory, pids, io, rig.daemon.manager.available_controllers
    )
    code, details, _ = await rig.call("Start", pb.StartRequest(argv=["true"], limits=limits))
    assert code is expected, details
    assert code is OK or details


# -- ids -------------------------------------------------------------------------------------

ID_METHODS: dict[str, Callable[[str], object]] = {
    "Status": lambda i: pb.StatusRequest(id=i),
    "Stop": lambda i: pb.StopRequest(id=i, grace_seconds=0),
    "Wait": lambda i: pb.WaitRequest(id=i),
    "Logs": lambda i: pb.LogsRequest(id=i, follow=True),
}


@HYPOTHESIS
@given(
    method=st.sampled_from(sorted(ID_METHODS)),
    job_id=st.one_of(
        st.text(max_size=140),
        st.integers(ID_MAX_BYTES - 2, ID_MAX_BYTES + 2).map(lambda n: "a" * n),
        st.integers(40, 70).map(lambda n: "é" * n),
        st.sampled_from(["", "\0", "../../etc/passwd", ".", "*"]),
        st.sampled_from(["upper", "cut", "longer", "space"]),
    ),
)
async def test_unknown_and_malformed_ids(rig: Rig, method: str, job_id: str) -> None:
    real = rig.daemon.manager.list()[0].id
    job_id = {
        "upper": real.upper(),
        "cut": real[:-1],
        "longer": real + "0",
        "space": " " + real,
    }.get(job_id, job_id)
    size = len(job_id.encode())
    expected = INVALID if size == 0 or size > ID_MAX_BYTES else NOT_FOUND
    code, details, chunks = await rig.call(method, ID_METHODS[method](job_id))
    assert (code, chunks) == (expected, []), details
    if expected is NOT_FOUND:
        assert details == f"no job with id {job_id!r}"


# -- offsets ---------------------------------------------------------------------------------


OFFSETS = st.one_of(
    st.integers(0, U64),
    st.sampled_from([0, 1, 65_535, 65_536, 99_999, 100_000, 100_001, S64, S64 + 1, U64]),
    st.integers(0, 200_000),
)


@HYPOTHESIS
@given(offset=OFFSETS, follow=st.booleans())
async def test_offsets_of_an_ended_job(rig: Rig, tmp_path: Path, offset: int, follow: bool) -> None:
    """A uint64 on the wire: "negative" offsets arrive as values past 2**63."""
    output = bytes(range(256)) * 390 + b"tail"  # 99_844 bytes, every byte value
    job = await ended_job(rig, tmp_path, output)
    code, details, chunks = await rig.call(
        "Logs", pb.LogsRequest(id=job, offset=offset, follow=follow)
    )
    if offset > len(output):
        assert code is INVALID, details
        assert details == f"offset {offset} is past the end of the output ({len(output)} bytes)"
    else:
        assert code is OK, details
        assert b"".join(c.data for c in chunks) == output[offset:]
        assert [c.offset for c in chunks] == [
            offset + sum(len(c.data) for c in chunks[:i]) for i in range(len(chunks))
        ]


async def ended_job(rig: Rig, tmp_path: Path, output: bytes) -> str:
    """The id of a finished job whose whole output is ``output`` (started once per run)."""
    for s in rig.daemon.manager.list():
        if s.argv[:1] == ("cat",):
            return s.id
    source = tmp_path / "output"
    source.write_bytes(output)
    code, details, _ = await rig.call("Start", pb.StartRequest(argv=["cat", str(source)]))
    assert code is OK, details
    job = rig.daemon.manager.list()[-1].id
    await rig.call("Wait", pb.WaitRequest(id=job))
    return job


# -- bytes that are not a request ------------------------------------------------------------

REQUESTS: dict[str, type[Message]] = {
    "Start": pb.StartRequest,
    "Stop": pb.StopRequest,
    "Status": pb.StatusRequest,
    "List": pb.ListRequest,
    "Logs": pb.LogsRequest,
    "Wait": pb.WaitRequest,
}
SAFE_START = pb.StartRequest(
    argv=["no-such-command-x", "arg"], env={"K": "v"}, cwd="/tmp"
).SerializeToString()


@st.composite
def malformed(draw: st.DrawFn) -> tuple[str, bytes]:
    """Random bytes, or a valid request cut short, with a byte flipped (often a string's
    UTF-8: proto3 strings must be valid UTF-8, and the wire allows any bytes), or with
    garbage after it."""
    method = draw(st.sampled_from(sorted(REQUESTS)))
    base = SAFE_START if method == "Start" else draw(st.binary(max_size=64))
    how = draw(st.sampled_from(["as is", "cut", "flip", "append"]))
    if how == "cut" and base:
        base = base[: draw(st.integers(0, len(base) - 1))]
    elif how == "flip" and base:
        i = draw(st.integers(0, len(base) - 1))
        base = base[:i] + bytes([draw(st.sampled_from([0x80, 0xC0, 0xFF, 0xFE]))]) + base[i + 1 :]
    elif how == "append":
        base += draw(st.binary(min_size=1, max_size=16))
    return method, base


def parses(message: type[Message], data: bytes) -> Message | None:
    try:
        return message.FromString(data)
    except DecodeError:
        return None


@HYPOTHESIS
@given(case=malformed())
async def test_bytes_that_are_not_a_request(rig: Rig, case: tuple[str, bytes]) -> None:
    method, data = case
    parsed = parses(REQUESTS[method], data)
    if isinstance(parsed, pb.StartRequest):
        # Never run what random bytes name: only requests whose command cannot exist.
        assume(not parsed.argv or parsed.argv[0].startswith("no-such-command-"))
    code, details = await rig.raw(method, data)
    if parsed is None:
        assert code is INVALID, details
        assert details.startswith("malformed request: Error parsing message")
    else:
        # It parsed: whatever it asks, the answer is one of the codes a caller can act on.
        assert code in {OK, INVALID, NOT_FOUND}, (code, details)


async def test_following_from_past_the_end_of_a_running_job(rig: Rig, tmp_path: Path) -> None:
    """An offset past what a running job has written is a wait for bytes to come: answered
    with them if the job writes that far, and INVALID_ARGUMENT — as for an ended job — once
    the job has ended short of it (never a clean, empty end that looks like "no output")."""
    gate = tmp_path / "gate"
    script = f'printf 0123456789; while [ ! -e "{gate}" ]; do sleep 0.01; done; printf abcdef'
    code, _, _ = await rig.call("Start", pb.StartRequest(argv=["sh", "-c", script]))
    assert code is OK
    job = rig.daemon.manager.list()[-1].id
    await wait_for(lambda: rig.daemon.manager.status(job).output_bytes == 10, what="10 bytes")
    reached = asyncio.create_task(rig.call("Logs", pb.LogsRequest(id=job, offset=13, follow=True)))
    beyond = asyncio.create_task(rig.call("Logs", pb.LogsRequest(id=job, offset=17, follow=True)))
    now = await rig.call("Logs", pb.LogsRequest(id=job, offset=17, follow=False))
    assert now == (OK, "", [])  # not following: nothing yet, and no error while it runs
    gate.touch()
    code, details, chunks = await reached
    assert (code, [(c.offset, c.data) for c in chunks]) == (OK, [(13, b"def")]), details
    code, details, chunks = await beyond
    assert (code, details, chunks) == (
        INVALID,
        "offset 17 is past the end of the output (16 bytes)",
        [],
    )
