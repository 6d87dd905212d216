"""What every benchmark shares: the settings, a real ``workerd`` subprocess with its own PKI,
state dir and cgroup, readings of its /proc entries, and percentile helpers."""

from __future__ import annotations

# isort: off
from jobworker.server import tls13  # noqa: F401 - first: it must precede grpc

# isort: on
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import _writer
from jobworker.cgroup.discovery import own_cgroup_dir
from jobworker.client import Client
from jobworker.client.pki import init_pki

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WRITER = Path(_writer.__file__).resolve()
USER = "bench"
CGROUP_NAME = os.environ.get("BENCH_CGROUP", "jobworker-bench")
"""The daemon's cgroup, under the bench's own (``BENCH_CGROUP``: two runs side by side)."""
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Settings:
    """Sizes and counts of one run; ``quick`` is the reduced run (``BENCH_QUICK=1``)."""

    quick: bool
    reps: int
    heavy_reps: int
    """Repetitions of the GiB-sized measurements (throughput, fan-out)."""
    latency_lines: int
    latency_interval_ms: float
    throughput_bytes: int
    fanout: tuple[tuple[int, int], ...]
    """(followers, bytes the job writes) for each fan-out step."""
    idle_followers: int
    start_n: int
    cli_reps: int
    scale_jobs: int
    churn_jobs: int
    concurrency: int
    paging_jobs: int = 100_000
    """Ended jobs the daemon retains when one List page is timed (section ``paging``)."""

    @classmethod
    def from_env(cls) -> Settings:
        if os.environ.get("BENCH_QUICK", "") not in ("", "0"):
            return cls(
                quick=True,
                reps=3,
                heavy_reps=3,
                latency_lines=200,
                latency_interval_ms=2.0,
                throughput_bytes=128 << 20,
                fanout=((1, 64 << 20), (10, 8 << 20), (100, 1 << 20)),
                idle_followers=1000,
                start_n=100,
                cli_reps=5,
                scale_jobs=200,
                churn_jobs=1000,
                concurrency=16,
                paging_jobs=5000,
            )
        return cls(
            quick=False,
            reps=5,
            heavy_reps=3,
            latency_lines=1000,
            latency_interval_ms=2.0,
            # Under workerd's default log cap (1 GiB, which the job's ready line would pass).
            throughput_bytes=(1 << 30) - (1 << 20),
            fanout=((1, 512 << 20), (10, 128 << 20), (100, 16 << 20)),
            idle_followers=1000,
            start_n=300,
            cli_reps=10,
            scale_jobs=1000,
            churn_jobs=10_000,
            concurrency=16,
        )


# -- statistics ---------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def expected_output(total: int) -> tuple[int, str]:
    """Size and sha256 of what ``_writer.py bytes TOTAL`` writes (its ready line included)."""
    h = hashlib.sha256(b"ready\n")
    doubled = memoryview(_writer.pattern_block())
    for rotation, length in _writer.chunks(total):
        h.update(doubled[rotation : rotation + length])
    return total + 6, h.hexdigest()


JOB_PYTHON = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin") or sys.executable
"""The jobs' interpreter: one the daemon's job account (``nobody`` by default) may execute,
unlike a virtualenv under /root."""


# -- /proc --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float
    rss_kib: int
    fds: int
    threads: int


def proc_sample(pid: int) -> ProcSample:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads
    rss = threads = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("Threads:"):
            threads = int(line.split()[1])
    return ProcSample(cpu, rss, len(os.listdir(f"/proc/{pid}/fd")), threads)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


def start_followers(args: dict[str, object]) -> subprocess.Popen[str]:
    """A follower process (``bench._followers``) with ``args``; it reports on stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench._followers", json.dumps(args)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the daemon ---------------------------------------------------------------------------------


def _workerd_command() -> list[str]:
    """``workerd``; with ``BENCH_READ_CHUNK=N`` or ``BENCH_MMAP_THRESHOLD=N`` (experiments:
    what a larger read per Logs message, or another fixed mmap threshold, would give) the same
    entry point with the readers' chunk size or the threshold patched to N."""
    chunk = os.environ.get("BENCH_READ_CHUNK")
    mmap = os.environ.get("BENCH_MMAP_THRESHOLD")
    if not chunk and not mmap:
        return [str(BIN / "workerd")]
    prelude = "import jobworker.outread as o, jobworker.server.heap as h; "
    if chunk:
        prelude += f"o.read_chunks.__defaults__ = ({int(chunk)},); "
    if mmap:
        prelude += f"h.map_large_blocks.__defaults__ = ({int(mmap)},); "
    prelude += "from jobworker.server.cli import main; main()"
    return [sys.executable, "-c", prelude]


class Workerd:
    """``workerd`` as a subprocess on 127.0.0.1 (port chosen by the daemon), with the debug
    endpoint on. Stop it with :meth:`stop` (SIGTERM), which checks its cgroup parent is gone."""

    def __init__(
        self,
        workdir: Path,
        *extra: str,
        cgroup_name: str = CGROUP_NAME,
        ready_timeout: float = READY_TIMEOUT,
    ) -> None:
        """``extra``: more ``workerd`` options (e.g. ``--retain-jobs 1000``); ``workdir/state``
        may hold records already (the daemon recovers them at start)."""
        self.workdir = workdir
        self._ready_timeout = ready_timeout
        self.pki = workdir / "pki"
        self.state = workdir / "state"
        self.log_path = workdir / "workerd.log"
        # Jobs may run as an unprivileged account: they get a world-writable (sticky) directory
        # for their program, go files and reports; the rest of workdir stays private.
        workdir.chmod(0o711)
        self.shared = workdir / "shared"
        self.shared.mkdir(mode=0o1777)
        self.shared.chmod(0o1777)
        self.writer_path = self.shared / "writer.py"
        shutil.copyfile(WRITER, self.writer_path)
        self.writer_path.chmod(0o644)
        init_pki(self.pki, [(USER, "admin")])
        self.cgroup_parent = own_cgroup_dir() / cgroup_name
        if self.cgroup_parent.exists():
            raise SystemExit(f"bench: {self.cgroup_parent} exists: is another benchmark running?")
        self.debug_port = free_port()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *_workerd_command(),
                "--pki",
                str(self.pki),
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
                str(self.state),
                "--cgroup-name",
                cgroup_name,
                "--stop-grace",
                "1",
                "--debug-addr",
                f"127.0.0.1:{self.debug_port}",
                *extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.pid = self.proc.pid
        self.port = self._wait_port()
        self.addr = f"127.0.0.1:{self.port}"

    def _wait_port(self) -> int:
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            found = re.search(rb"listening on \S+ \(port (\d+)\)", self.log_path.read_bytes())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.proc.kill()
        self.proc.wait()
        raise SystemExit(f"bench: workerd did not start:\n{self.log_path.read_text()}")

    def writer(self, *args: object) -> list[str]:
        """argv of the job program (:mod:`bench._writer`) with ``args``."""
        return [JOB_PYTHON, "-I", "-S", str(self.writer_path), *(str(a) for a in args)]

    def client(self) -> Client:
        return Client.from_pki(self.addr, self.pki, USER)

    def cli(self, *args: str) -> list[str]:
        base = [str(BIN / "worker"), "--addr", self.addr, "--pki", str(self.pki), "--user", USER]
        return [*base, *args]

    def sample(self) -> ProcSample:
        return proc_sample(self.pid)

    def spawner_fds(self) -> int:
        return sum(len(os.listdir(f"/proc/{c}/fd")) for c in children(self.pid))

    def cgroup_dirs(self) -> int:
        if not self.cgroup_parent.exists():
            return 0
        return sum(1 for p in self.cgroup_parent.iterdir() if p.is_dir())

    def debug(self, path: str, timeout: float = 30.0) -> str:
        # The debug endpoint over TCP is HTTPS for admin certificates only (USER is an admin).
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.pem"))
        ctx.load_cert_chain(self.pki / f"{USER}.pem", self.pki / f"{USER}-key.pem")
        url = f"https://127.0.0.1:{self.debug_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout, context=ctx) as response:
            body: bytes = response.read()
            return body.decode()

    def metric(self, name: str) -> dict[str, float]:
        """Every sample of a Prometheus metric, keyed by its label text."""
        out: dict[str, float] = {}
        for line in self.debug("/metrics").splitlines():
            if line.startswith(name):
                key, _, value = line.rpartition(" ")
                out[key[len(name) :]] = float(value)
        return out

    def asyncio_tasks(self) -> int:
        stacks = self.debug("/debug/stacks")
        return stacks.split("=== asyncio tasks", 1)[-1].count("\n--- task ")

    def log_file(self, job_id: str) -> Path:
        return self.state / "jobs" / f"{job_id}.log"

    def drop_log(self, job_id: str) -> None:
        """Free the disk a finished job's big log holds (it is never read again)."""
        with contextlib.suppress(FileNotFoundError):
            self.log_file(job_id).unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise SystemExit("bench: workerd did not stop within a minute of SIGTERM") from None
        self._log.close()
        if self.cgroup_parent.exists():
            raise SystemExit(f"bench: workerd left {self.cgroup_parent} behind")


@contextlib.contextmanager
def go_file(workdir: Path, name: str) -> Iterator[Path]:
    path = workdir / f"go-{name}"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def wait_ended(client: Client, job_id: str, timeout: float = 300.0) -> None:
    async with asyncio.timeout(timeout):
        await client.wait(job_id)
