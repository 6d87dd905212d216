"""stdin and Attach through the real daemon: ``worker run -i`` with 64 MiB, EOF, a job that
never reads (flow control), who may type (viewers, other users), and the policy's
``[terminal]``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from jobworker.api.proto import pb, pb_grpc
from jobworker.client import Client
from jobworker.errors import InvalidArgument, JobNotFound, PermissionDenied, StdinClosed
from jobworker.server.daemon import Daemon, serve
from jobworker.spec import TerminalSize
from jobworker.tls import Paths, load_client
from tests.conftest import wait_for
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect

WORKER = Path(sys.executable).parent / "worker"


def _env(port: int, pki: Path, user: str = "alice") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(WORKER_ADDR=f"127.0.0.1:{port}", WORKER_PKI=str(pki), WORKER_USER=user)
    return env


async def _worker(
    args: list[str], env: dict[str, str], stdin: Path | int
) -> tuple[int, bytes, bytes]:
    """Run the real ``worker`` with ``stdin`` (a file, or an fd); (code, stdout, stderr)."""
    with open(stdin, "rb") if isinstance(stdin, Path) else os.fdopen(stdin, "rb") as f:
        proc = await asyncio.create_subprocess_exec(
            str(WORKER), *args, stdin=f, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        async with asyncio.timeout(120):
            out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_run_i_streams_64_mib_to_the_job(
    daemon: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "stdin.bin"
    with data.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
    expected = hashlib.sha256(data.read_bytes()).hexdigest()
    code, out, err = await _worker(
        ["run", "-i", "--", "sha256sum"], _env(daemon.port, pki_dir), data
    )
    assert code == 0, err
    assert out.split()[0].decode() == expected


async def test_run_i_from_a_pipe_eof_closes_the_jobs_stdin(daemon: Daemon, pki_dir: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"line one\nline two\n")
    os.close(w)  # our EOF
    code, out, err = await _worker(
        ["run", "-i", "--", "sh", "-c", "cat; echo after-eof"], _env(daemon.port, pki_dir), r
    )
    assert code == 0, err
    assert out == b"line one\nline two\nafter-eof\n"


async def test_without_i_the_job_reads_dev_null(daemon: Daemon, pki_dir: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"must not arrive\n")
    os.close(w)
    code, out, err = await _worker(
        ["run", "--", "sh", "-c", "cat; readlink /proc/self/fd/0"], _env(daemon.port, pki_dir), r
    )
    assert code == 0, err
    assert out == b"/dev/null\n"


async def test_close_stdin_through_the_api(connect: Connect) -> None:
    alice = connect("alice")
    status = await alice.start(["sh", "-c", "wc -c; echo done"], stdin=True)
    async with await alice.attach(status.id) as typing:
        assert not typing.tty
        assert await typing.write(b"x" * 100_000)
        await typing.close_stdin()
        assert typing.stdin_closed.is_set()
    final = await alice.wait(status.id)
    out = b"".join([d async for _, d in alice.logs(status.id)])
    assert final.exit_code == 0
    assert out.split() == [b"100000", b"done"]
    # Closed for good: a second attach is refused.
    with pytest.raises(StdinClosed):
        await alice.attach(status.id)


async def test_a_job_that_never_reads_blocks_the_writer_not_the_daemon(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """64 MiB offered to a job that never reads: the daemon takes a bounded amount (its RSS
    does not grow by the offered bytes), the client's write blocks, and when the job is
    stopped the blocked write returns False at once and the call ends cleanly."""
    async with harness.start_workerd(tmp_path, pki_dir, cgroup_name) as workerd:  # noqa: SIM117
        async with Client.from_pki(workerd.address, pki_dir, "alice") as alice:
            status = await alice.start(["sleep", "300"], stdin=True)
            typing = await alice.attach(status.id)
            rss_before = _rss_kib(workerd.proc.pid)
            chunk = os.urandom(1 << 20)
            sent = 0

            async def offer() -> bool:
                nonlocal sent
                for _ in range(64):
                    if not await typing.write(chunk):
                        return False
                    sent += len(chunk)
                return True

            writer = asyncio.create_task(offer())
            # Progress stops once the pipe and the flow-control windows are full.
            last = -1
            while sent != last:
                last = sent
                done, _ = await asyncio.wait({writer}, timeout=1.0)
                assert not done, "64 MiB went into a job that reads nothing"
            assert sent <= 16 << 20, f"{sent} bytes accepted for a job that never reads"
            grown = _rss_kib(workerd.proc.pid) - rss_before
            assert grown < 32 * 1024, f"the daemon grew by {grown} KiB"
            await alice.stop(status.id, grace=0)
            async with asyncio.timeout(10):
                assert await writer is False
            await typing.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_viewer_watches_but_cannot_type(connect: Connect) -> None:
    alice, vera = connect("alice"), connect("vera")
    status = await alice.start(["sh", "-c", "read line; echo got:$line"], stdin=True)
    with pytest.raises(PermissionDenied):
        await vera.attach(status.id)
    async with await alice.attach(status.id) as typing:
        await typing.write(b"from-alice\n")
    final = await alice.wait(status.id)
    assert final.exit_code == 0
    assert b"".join([d async for _, d in vera.logs(status.id)]) == b"got:from-alice\n"


async def test_another_user_cannot_attach_nor_learn_the_job_exists(connect: Connect) -> None:
    alice, bob, root = connect("alice"), connect("bob"), connect("root")
    status = await alice.start(["sh", "-c", "read line; echo got:$line"], stdin=True)
    with pytest.raises(JobNotFound) as other:
        await bob.attach(status.id)
    with pytest.raises(JobNotFound) as missing:
        await bob.attach("00000000-0000-0000-0000-000000000000")
    # The same answer as for a job that does not exist (only the id differs).
    assert str(other.value).replace(status.id, "ID") == str(missing.value).replace(
        "00000000-0000-0000-0000-000000000000", "ID"
    )
    # An admin may type into anyone's job.
    async with await root.attach(status.id) as typing:
        await typing.write(b"from-root\n")
    assert (await alice.wait(status.id)).exit_code == 0
    assert b"".join([d async for _, d in alice.logs(status.id)]) == b"got:from-root\n"


async def test_attach_to_a_job_without_stdin_is_refused(connect: Connect) -> None:
    alice = connect("alice")
    status = await alice.start(["sleep", "30"])
    with pytest.raises(StdinClosed, match="no open stdin"):
        await alice.attach(status.id)
    await alice.stop(status.id, grace=0)


async def test_the_first_request_must_open(daemon: Daemon, pki_dir: Path) -> None:
    material = load_client(Paths.from_pki(pki_dir, "alice"))
    async with harness.channel(daemon.port, material.ca, material.key, material.cert) as ch:
        stub = pb_grpc.JobWorkerStub(ch)
        call = stub.Attach()  # type: ignore[call-arg]
        await call.write(pb.AttachRequest(stdin=b"hello"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "first Attach request must be open" in (e.value.details() or "")


async def test_resize_reaches_a_terminal_job(connect: Connect) -> None:
    alice = connect("alice")
    script = "stty size; read x; stty size"
    status = await alice.start(["sh", "-c", script], tty=TerminalSize(30, 100))
    async with await alice.attach(status.id, window=TerminalSize(40, 120)) as typing:
        assert typing.tty
        await typing.resize(TerminalSize(50, 132))
        await typing.write(b"\n")
    await alice.wait(status.id)
    out = b"".join([d async for _, d in alice.logs(status.id)])
    # The attach's own size replaced the start's before the job printed, or after: either
    # way the second line is the resize's.
    assert out.replace(b"\r\n", b"\n").split(b"\n")[-2] == b"50 132", out


@pytest.fixture
async def terminal_policy_daemon(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> AsyncIterator[Daemon]:
    policy = tmp_path / "policy.toml"
    policy.write_text('[terminal]\nallow = ["admin"]\n')
    config = harness.make_config(tmp_path / "state", pki_dir, cgroup_name, policy_file=policy)
    d = await serve(config)
    try:
        yield d
    finally:
        await d.close()


async def test_the_policy_can_forbid_terminals_for_a_role(
    terminal_policy_daemon: Daemon, pki_dir: Path
) -> None:
    address = f"127.0.0.1:{terminal_policy_daemon.port}"
    async with (
        Client.from_pki(address, pki_dir, "alice") as alice,
        Client.from_pki(address, pki_dir, "root") as root,
    ):
        with pytest.raises(PermissionDenied, match=r"\[terminal\]"):
            await alice.start(["sh"], tty=TerminalSize())
        # stdin without a terminal is still allowed; a terminal for the admin too.
        piped = await alice.start(["cat"], stdin=True)
        async with await alice.attach(piped.id) as typing:
            await typing.close_stdin()
        assert (await alice.wait(piped.id)).exit_code == 0
        status = await root.start(["sh", "-c", "tty"], tty=TerminalSize())
        assert (await root.wait(status.id)).exit_code == 0
        out = b"".join([d async for _, d in root.logs(status.id)])
        assert out.startswith(b"/dev/pts/"), out


async def test_bad_window_sizes_are_refused(connect: Connect) -> None:
    with pytest.raises(InvalidArgument):
        TerminalSize(0, 80)
    alice = connect("alice")
    status = await alice.start(["sh", "-c", "stty size"], tty=TerminalSize(65535, 65535))
    await alice.wait(status.id)
    assert b"".join([d async for _, d in alice.logs(status.id)]).strip() == b"65535 65535"


async def test_the_daemon_stays_clean_after_attached_jobs(connect: Connect) -> None:
    """Attach calls that end every way (close, job end, cancel) leave no task behind (the
    daemon fixture checks tasks, threads and cgroups at the end)."""
    alice = connect("alice")
    status = await alice.start(["sh", "-c", "read x"], stdin=True)
    first = await alice.attach(status.id)
    second = await alice.attach(status.id)
    await first.close()
    await second.write(b"\n")
    await wait_for(second.stdin_closed.is_set, what="stdin closed at the job's end")
    await second.close()
    assert (await alice.wait(status.id)).exit_code == 0
