"""stdout and stderr apart, in the order received: through a real daemon, its gRPC API, the
``Client`` and the ``worker`` CLI. Also ``--timestamps``, ``--tail`` and ``--since``, and that
on a 1 GiB log the last two read a bounded amount (the daemon's /proc/PID/io)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import textwrap
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from jobworker import JobManager, JobSpec
from jobworker.api.proto import pb, pb_grpc
from jobworker.client import Client
from jobworker.client.cli.stamps import rfc3339
from jobworker.errors import JobNotFound
from jobworker.outlog import Chunk, Stream
from jobworker.outread import Query
from jobworker.server.daemon import Daemon
from jobworker.spec import JobState, JobStatus
from jobworker.store import Store
from jobworker.tls import Paths, load_client
from tests.conftest import JOB_PYTHON, cgroup2_usable, wait_for
from tests.integration import daemon_harness as harness
from tests.integration.test_cli import (
    WORKER,
    DroppingProxy,
    Env,
    Worker,
    invoke,
    job_id_of,
    open_gate,
    subprocess_env,
    worker_env,
)
from tests.integration.test_cli import W as _W
from tests.integration.test_cli import env as _env
from tests.integration.test_cli import proxy as _proxy

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
W, env, proxy = _W, _env, _proxy
Connect = harness.Connect


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def chunks(client: Client, job_id: str, **query: object) -> list[Chunk]:
    return [c async for c in client.chunks(job_id, Query(**query))]  # type: ignore[arg-type]


def joined(cs: list[Chunk]) -> bytes:
    return b"".join(c.data for c in cs)


def script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


# -- apart, merged, byte-exact ----------------------------------------------------------------


async def test_binary_streams_split_and_merged_byte_exact(
    W: Worker, connect: Connect, tmp_path: Path
) -> None:
    rng = random.Random(14)
    out, err = rng.randbytes(3 << 20), rng.randbytes((2 << 20) + 7)
    (tmp_path / "out").write_bytes(out)
    (tmp_path / "err").write_bytes(err)
    writer = script(
        tmp_path,
        "writer.py",
        """
        import os, sys
        out, err = (open(os.path.join(sys.argv[1], n), "rb").read() for n in ("out", "err"))
        i = j = 0
        while i < len(out) or j < len(err):  # interleaved, in pieces of odd sizes
            if i < len(out):
                i += os.write(1, out[i : i + 40_000])
            if j < len(err):
                j += os.write(2, err[j : j + 30_001])
        """,
    )
    command = [JOB_PYTHON, writer, str(tmp_path)]
    job = job_id_of(await W("start", "--", *command))
    assert (await W("wait", job)).exit_code == 0

    only_out = await W("logs", "--stdout", job)
    only_err = await W("logs", "--stderr", job)
    assert sha(only_out.stdout_bytes) == sha(out)
    assert sha(only_err.stdout_bytes) == sha(err)  # the one stream asked for, on stdout

    merged = await W("logs", job)
    assert merged.stderr_bytes == b""
    alice = connect("alice")
    cs = await chunks(alice, job)
    assert joined(cs) == merged.stdout_bytes and len(merged.stdout_bytes) == len(out) + len(err)
    assert sha(b"".join(c.data for c in cs if c.stream is Stream.STDOUT)) == sha(out)
    assert sha(b"".join(c.data for c in cs if c.stream is Stream.STDERR)) == sha(err)
    assert {c.stream for c in cs} == {Stream.STDOUT, Stream.STDERR}

    for args in (("logs", "-f", job), ("-f", "logs", job)):
        followed = await W(*args)
        assert followed.exit_code == 0
        assert sha(followed.stdout_bytes) == sha(out), args
        assert sha(followed.stderr_bytes) == sha(err), args

    ran = await W("run", "--", *command)
    assert ran.exit_code == 0
    assert sha(ran.stdout_bytes) == sha(out) and sha(ran.stderr_bytes) == sha(err)

    # The Client writes each stream where it belongs.
    got_out, got_err = tmp_path / "got-out", tmp_path / "got-err"
    with got_out.open("wb") as o, got_err.open("wb") as e:
        end = await alice.copy_output(job, stdout=o, stderr=e)
    assert end == len(out) + len(err)
    assert sha(got_out.read_bytes()) == sha(out) and sha(got_err.read_bytes()) == sha(err)


# -- order ------------------------------------------------------------------------------------

ALTERNATE = """
import json, os, sys, time
before = []
for i in range(int(sys.argv[1])):
    before.append(time.time_ns() // 1000)  # just before write i
    os.write(1 + i % 2, b"%d\\n" % i)
    time.sleep(0.001)  # writes to the two streams 1 ms apart
with open(sys.argv[2], "w") as f:
    json.dump(before, f)
"""


async def test_writes_1_ms_apart_keep_their_order_across_streams(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """Writes alternating between the streams, 1 ms apart, through a workerd process of its
    own (this test's client must not share the daemon's GIL), with a follower reading live.

    The order is the order the daemon took the bytes, so the claim checked is exact: whenever
    the daemon received write k (the time in its chunk) before write k+1 began (the time the
    job noted), k comes before k+1. Both times are this host's clock. That holds for every
    pair on a host that schedules the daemon within the 1 ms; on one that does not (a VM whose
    host steals its CPU for milliseconds) the daemon can receive a write late, after the
    next began, and nothing can tell their order then: such pairs are counted, not checked,
    and must stay a minority so that the check is not vacuous."""
    n = 400
    times = tmp_path / "times.json"
    async with (
        harness.start_workerd(tmp_path, pki_dir, cgroup_name) as w,
        Client.from_pki(w.address, pki_dir, "alice") as alice,
    ):
        job = [JOB_PYTHON, script(tmp_path, "alt.py", ALTERNATE), str(n), str(times)]
        st = await alice.start(job)
        followed = await chunks(alice, st.id, follow=True, split=True)
        assert (await alice.wait(st.id)).exit_code == 0
        later = await chunks(alice, st.id, split=True)
    began: list[int] = json.loads(times.read_text())
    assert [(c.offset, c.data, c.stream, c.time_us) for c in followed] == [
        (c.offset, c.data, c.stream, c.time_us) for c in later
    ]
    received: dict[int, int] = {}
    place: dict[int, int] = {}
    for c in later:
        for x in c.data.split():
            k = int(x)
            assert c.stream is (Stream.STDOUT if k % 2 == 0 else Stream.STDERR)
            received[k], place[k] = c.time_us, len(place)
    assert sorted(received) == list(range(n))  # every write, once
    assert [c.time_us for c in later] == sorted(c.time_us for c in later)
    timely = [k for k in range(n - 1) if received[k] < began[k + 1]]
    for k in timely:
        assert place[k] < place[k + 1], out_of_order(later, k)
    assert len(timely) > (n - 1) // 2, f"only {len(timely)} of {n - 1} writes received in time"


def out_of_order(cs: list[Chunk], k: int) -> str:
    """The chunks around write ``k``, with their receive times."""
    near = [(c.stream.name, c.data, c.time_us) for c in cs if abs(int(c.data.split()[0]) - k) < 4]
    return f"write {k + 1} came before write {k}, received before it began: {near}"


# -- resuming in each view --------------------------------------------------------------------

GATED = """
import os, sys, time
gate = sys.argv[1]
for i in range(2000):
    os.write(1 + i % 3 // 2, b"line %d of %s\\n" % (i, b"out" if i % 3 < 2 else b"err"))
os.write(2, b"half\\n")
while not os.path.exists(gate):
    time.sleep(0.005)
for i in range(2000, 4000):
    os.write(1 + i % 3 // 2, b"line %d of %s\\n" % (i, b"out" if i % 3 < 2 else b"err"))
"""


@pytest.mark.parametrize("view", [None, Stream.STDOUT, Stream.STDERR])
async def test_a_follower_resumes_from_its_offset_in_each_view(
    connect: Connect, tmp_path: Path, view: Stream | None
) -> None:
    alice = connect("alice")
    gate = tmp_path / "gate"
    st = await alice.start([JOB_PYTHON, script(tmp_path, "gated.py", GATED), str(gate)])
    # Follow until the first half is in, then drop the stream (as a broken connection would).
    first: list[Chunk] = []
    last = b"line 1999 of out\n" if view is Stream.STDOUT else b"half\n"
    stream = alice.chunks(st.id, Query(view=view, follow=True))
    async for c in stream:
        first.append(c)
        if joined(first).endswith(last):
            break
    await stream.aclose()
    gate.touch()
    offset = first[-1].offset + len(first[-1].data)
    rest = await chunks(alice, st.id, view=view, offset=offset, follow=True)
    assert rest and rest[0].offset == offset
    whole = await chunks(alice, st.id, view=view)
    assert joined(first) + joined(rest) == joined(whole)
    at = 0
    for c in first + rest:
        assert c.offset == at
        at += len(c.data)
    lines = joined(whole).splitlines()
    assert len(lines) == {None: 4001, Stream.STDOUT: 2667, Stream.STDERR: 1334}[view]


# -- timestamps -------------------------------------------------------------------------------

STAMPED = """
import os, sys, time
gate = sys.argv[1]
def wait(name):
    while not os.path.exists(gate + name):
        time.sleep(0.005)
os.write(1, b"one\\ntw")
wait("1")
os.write(1, b"o\\n")
time.sleep(0.01)  # 1 ms apart or more: kept in this order
os.write(2, b"err line\\n")
"""

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"


async def test_timestamps_prefix_each_line_with_the_time_of_its_first_byte(
    W: Worker, connect: Connect, tmp_path: Path
) -> None:
    alice = connect("alice")
    gate = str(tmp_path / "gate")
    st = await alice.start([JOB_PYTHON, script(tmp_path, "stamped.py", STAMPED), gate])
    await wait_for(lambda: alice_size(tmp_path, st.id) >= 6, what="the first write")
    Path(gate + "1").touch()
    await alice.wait(st.id)
    cs = await chunks(alice, st.id, split=True)
    assert [c.data for c in cs] == [b"one\ntw", b"o\n", b"err line\n"]
    t1, t2, t3 = (rfc3339(c.time_us) for c in cs)
    assert t1 < t2  # the second write came after the gate opened

    result = await W("logs", "--timestamps", st.id)
    # "two" was cut by a write boundary: it keeps the time of its first byte.
    assert result.stdout == f"{t1} one\n{t1} two\n{t3} err line\n"
    assert re.fullmatch(f"{STAMP} one", result.stdout.splitlines()[0])
    followed = await W("logs", "-f", "--timestamps", st.id)
    assert followed.stdout == f"{t1} one\n{t1} two\n"
    assert followed.stderr == f"{t3} err line\n"
    only_err = await W("logs", "--stderr", "--timestamps", st.id)
    assert only_err.stdout == f"{t3} err line\n"


def alice_size(tmp_path: Path, job_id: str) -> int:
    log = tmp_path / "state" / "jobs" / f"{job_id}.log"
    return log.stat().st_size if log.exists() else 0


# -- tail and since, small ---------------------------------------------------------------------


async def test_tail_and_since_through_the_cli(
    W: Worker, env: Env, connect: Connect, tmp_path: Path
) -> None:
    alice = connect("alice")
    gate = tmp_path / "gate"
    st = await alice.start([JOB_PYTHON, script(tmp_path, "gated.py", GATED), str(gate)])

    async def halfway() -> bool:
        return (await W("logs", "--stderr", "--tail", "1", st.id)).stdout == "half\n"

    await wait_async(halfway, timeout=10, what="the job at its gate")
    # --tail with -f: the last line, then everything that comes.
    proc = await asyncio.create_subprocess_exec(
        WORKER, "logs", "-f", "--stderr", "--tail", "1", st.id,
        stdout=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    assert proc.stdout is not None
    assert await proc.stdout.readline() == b"half\n"  # the tail, before the gate opens
    gate.touch()
    rest = await proc.stdout.read()
    assert await proc.wait() == 0
    err_lines = (await W("logs", "--stderr", st.id)).stdout.splitlines(keepends=True)
    assert err_lines[0] != "half\n" and err_lines[-1] != "half\n"
    assert "half\n" + rest.decode() == "".join(err_lines[err_lines.index("half\n") :])
    everything = (await W("logs", st.id)).stdout
    tail = await W("logs", "--tail", "3", st.id)
    assert tail.stdout == "".join(everything.splitlines(keepends=True)[-3:])
    assert (await W("logs", "--stdout", "--tail", "2", st.id)).stdout == (
        "line 3997 of out\nline 3999 of out\n"
    )
    assert (await W("logs", "--tail", "0", st.id)).stdout == ""
    assert (await W("logs", "--tail", "100000", st.id)).stdout == everything
    assert (await W("logs", "--since", "1h", st.id)).stdout == everything
    assert (await W("logs", "--since", "2999-01-01T00:00:00Z", st.id)).stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "neither a duration"),
        (["--since", "2026-01-01T00:00:00"], "no time zone"),
        (["--tail", "-1"], "--tail"),
        (["--stdout", "--stderr"], "exclude each other"),
    ],
)
async def test_bad_logs_options_are_usage_errors(
    W: Worker, connect: Connect, args: list[str], message: str
) -> None:
    st = await connect("alice").start(["true"])
    result = await W("logs", *args, st.id)
    assert result.exit_code == 64 and message in result.stderr, result.stderr


async def test_a_bad_stream_is_invalid_argument_and_others_jobs_stay_hidden(
    daemon: Daemon, connect: Connect, pki_dir: Path
) -> None:
    alice, bob = connect("alice"), connect("bob")
    st = await alice.start(["sh", "-c", "echo secret; echo secret >&2"])
    await alice.wait(st.id)
    for query in (
        Query(view=Stream.STDERR),
        Query(tail=1),
        Query(since_us=0),
        Query(view=Stream.STDOUT, split=True, follow=True),
    ):
        with pytest.raises(JobNotFound):
            [c async for c in bob.chunks(st.id, query)]
    material = load_client(Paths.from_pki(pki_dir, "alice"))
    creds = grpc.ssl_channel_credentials(material.ca, material.key, material.cert)
    async with grpc.aio.secure_channel(f"127.0.0.1:{daemon.port}", creds) as channel:
        stub = pb_grpc.JobWorkerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.Logs(pb.LogsRequest(id=st.id, stream=7)):  # type: ignore[arg-type]
                pass
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "stream 7 is not one of" in (caught.value.details() or "")


# -- a 1 GiB log: tail and since read a bounded amount ---------------------------------------------

BIG = """
import os, sys, time
gate = sys.argv[1]
line = b"x" * 63 + b"\\n"
block = line * (1 << 14)  # 1 MiB
for i in range(1024):
    os.write(1, block)
    if i % 64 == 0:
        os.write(2, b"progress %d\\n" % i)
os.write(2, b"big done\\n")
while not os.path.exists(gate):
    time.sleep(0.01)
for i in range(5):
    os.write(1, b"after %d\\n" % i)
    time.sleep(0.002)
    os.write(2, b"after err %d\\n" % i)
    time.sleep(0.002)
"""


def rchar(pid: int) -> int:
    """Bytes the process has read (read, pread, recv...) so far."""
    text = Path(f"/proc/{pid}/io").read_text()
    m = re.search(r"^rchar: (\d+)$", text, re.MULTILINE)
    assert m, text
    return int(m.group(1))


async def test_tail_and_since_on_a_1_gib_log_read_a_bounded_amount(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    gate = tmp_path / "gate"
    async with (
        harness.start_workerd(tmp_path, pki_dir, cgroup_name, "--max-log-bytes", "2G") as w,
        Client.from_pki(w.address, pki_dir, "alice") as alice,
    ):
        cli_env = {**worker_env(w.port, pki_dir), "XDG_CONFIG_HOME": str(tmp_path / "xdg")}
        big = script(tmp_path, "big.py", BIG)
        st = await alice.start([JOB_PYTHON, big, str(gate)])
        before_gate = (1 << 30) + sum(len(b"progress %d\n" % i) for i in range(0, 1024, 64)) + 9

        async def size() -> int:
            return (await alice.status(st.id)).output_bytes

        sizes = [0]

        async def grown() -> bool:
            sizes[0] = await size()
            return sizes[0] >= before_gate

        await wait_async(grown, timeout=120, what="1 GiB of output")
        assert sizes[0] == before_gate
        since = datetime.now(UTC)
        gate.touch()
        final = await alice.wait(st.id)
        assert final.state is JobState.EXITED and final.exit_code == 0

        pid = w.proc.pid
        after_out = "".join(f"after {i}\n" for i in range(5))
        after_err = "".join(f"after err {i}\n" for i in range(5))
        after = "".join(f"after {i}\nafter err {i}\n" for i in range(5))
        cases = [
            (["--tail", "10"], after),
            (["--since", since.isoformat()], after),
            (["--stdout", "--tail", "5"], after_out),
            (["--stderr", "--tail", "6"], "big done\n" + after_err),
            (["--stdout", "--since", since.isoformat().replace("+00:00", "Z")], after_out),
        ]  # fmt: skip
        for args, expected in cases:
            read_before = rchar(pid)
            result = await invoke(["logs", *args, st.id], cli_env)
            read = rchar(pid) - read_before
            assert result.exit_code == 0, result.stderr
            assert result.stdout == expected, args
            assert read < 4 << 20, f"{args}: the daemon read {read} bytes for a 1 GiB log"
        # The measure does measure: reading the last 64 MiB shows as at least that much.
        read_before = rchar(pid)
        n = 0
        async for c in alice.chunks(
            st.id, Query(view=Stream.STDOUT, offset=(1 << 30) - (64 << 20))
        ):
            n += len(c.data)
        assert n == (64 << 20) + len(after_out)
        assert rchar(pid) - read_before >= 64 << 20
        await alice.remove(st.id)


async def wait_async(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll an asynchronous condition every 50 ms until it holds; fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# -- logs from before streams were apart -------------------------------------------------------


async def test_a_log_from_before_streams_were_apart_is_served_as_stdout(
    tmp_path: Path, cgroup_name: str
) -> None:
    """A state directory as an earlier version left it: a record and one ``<id>.log`` holding
    stdout and stderr together, no ``.err``, no index."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    state = tmp_path / "old-state"
    store = Store(state)
    store.setup()
    spec = JobSpec(argv=("sh", "-c", "old"), owner="alice")
    now = datetime.now(UTC)
    old = JobStatus(
        id="old-job",
        state=JobState.EXITED,
        argv=spec.argv,
        owner="alice",
        pid=1,
        started_at=now,
        ended_at=now,
        exit_code=0,
        output_bytes=12,
    )
    store.save(spec, old)
    store.log_path("old-job").write_bytes(b"out\nerr\nout\n")
    store.close()
    async with await JobManager.open(state, cgroup_name=cgroup_name) as mgr:
        assert mgr.status("old-job") == old
        everything = [c async for c in mgr.chunks("old-job", Query())]
        assert joined(everything) == b"out\nerr\nout\n"
        assert {c.stream for c in everything} == {Stream.STDOUT}
        tail = [c async for c in mgr.chunks("old-job", Query(view=Stream.STDOUT, tail=2))]
        assert joined(tail) == b"err\nout\n"
        assert [c async for c in mgr.chunks("old-job", Query(view=Stream.STDERR))] == []
        assert sorted(os.listdir(state / "jobs")) == ["old-job.json", "old-job.log"]


# -- the index cannot outgrow the cap ----------------------------------------------------------

TRICKLE = """
import os, time
for i in range(100_000):
    os.write(1 + i % 2, b"x")  # one byte at a time, the streams in turn: a record each
    time.sleep(0.0002)
"""


async def test_a_job_cannot_grow_its_index_past_the_log_cap(
    tmp_path: Path, cgroup_name: str
) -> None:
    """One-byte writes alternating between the streams cost 32 bytes of index each: the index
    counts against --max-log-bytes on its own, so such a job is stopped at the cap too."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    cap = 4096
    async with await JobManager.open(
        tmp_path / "state", cgroup_name=cgroup_name, max_log_bytes=cap, stop_grace=0.5
    ) as mgr:
        st = await mgr.start(JobSpec(argv=(JOB_PYTHON, script(tmp_path, "t.py", TRICKLE))))
        final = await mgr.wait(st.id)
        assert final.state is JobState.STOPPED
        assert "log size limit of 4096 bytes in its index" in final.reason, final.reason
        assert final.output_bytes < cap  # the bytes themselves were far from it
        idx = tmp_path / "state" / "jobs" / f"{st.id}.idx"
        assert idx.stat().st_size <= cap
        data = joined([c async for c in mgr.chunks(st.id, Query())])
        assert len(data) == final.output_bytes and set(data) == {ord("x")}


# -- the CLI resumes in its view after a dropped connection -----------------------------------


@pytest.mark.parametrize("flag", ["--stdout", "--stderr"])
async def test_logs_follow_resumes_in_its_view_after_the_connection_drops(
    env: Env, proxy: DroppingProxy, tmp_path: Path, flag: str
) -> None:
    rng = random.Random(flag)
    parts = {name: rng.randbytes(100_000 + i) for i, name in enumerate(("fo", "fe", "so", "se"))}
    for name, data in parts.items():
        (tmp_path / name).write_bytes(data)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    d = tmp_path
    script = f"cat {d}/fo; cat {d}/fe >&2; cat {gate}; cat {d}/so; cat {d}/se >&2"
    job = job_id_of(await invoke(["start", "--", "sh", "-c", script], env))
    proc = await asyncio.create_subprocess_exec(
        WORKER, "--addr", f"127.0.0.1:{proxy.port}", "logs", "-f", flag, job,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env(env),
    )  # fmt: skip
    assert proc.stdout is not None
    first, second = ("fo", "so") if flag == "--stdout" else ("fe", "se")
    assert await proc.stdout.readexactly(len(parts[first])) == parts[first]
    connections = proxy.accepted
    proxy.drop()
    await open_gate(gate)
    rest, stderr = await proc.communicate()
    assert sha(rest) == sha(parts[second])  # nothing lost, nothing repeated, nothing else
    assert proc.returncode == 0, stderr
    assert b"reconnecting" in stderr and b"Traceback" not in stderr
    assert proxy.accepted > connections
