"""What `make run` runs: a dev PKI, workerd in the background, a demo job streamed back through
the `worker` CLI, and the commands to try next.

Everything it makes lives in ./dev (gitignored): dev/pki, dev/state, dev/workerd.log,
dev/workerd.pid and dev/env (the WORKER_* variables for the CLI). Running it again reuses a
daemon that is still running. The daemon is left running so the printed commands work; stop it
with `kill $(cat dev/workerd.pid)`.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "dev"
PKI = DEV / "pki"
STATE = DEV / "state"
LOG = DEV / "workerd.log"
PIDFILE = DEV / "workerd.pid"
ENVFILE = DEV / "env"
BIN = Path(sys.executable).parent
HOST, PORT = "127.0.0.1", 50051
ADDR = f"{HOST}:{PORT}"
USER = "alice"
ADMIN, VIEWER = "ops", "vera"
"""The other default users of `worker certs init` (no user may be named like a role)."""
READY_TIMEOUT = 30.0
CGROUP_NAME = "jobworker-dev"

JOB = (
    'echo "hello from job pid $$"; '
    'echo "my cgroup: $(grep ^0:: /proc/self/cgroup | cut -d: -f3)"; '
    'for i in 1 2 3 4 5; do echo "tick $i"; sleep 0.3; done; '
    "echo done"
)


def say(text: str = "") -> None:
    print(text, flush=True)


def step(n: int, text: str) -> None:
    say(f"\n\033[1m[{n}/5] {text}\033[0m")


def fail(text: str) -> None:
    say(f"\nmake run: {text}")
    sys.exit(1)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env.update(WORKER_ADDR=ADDR, WORKER_PKI=str(PKI), WORKER_USER=USER)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    return env


def show(argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    """Print a worker command as a person would type it, run it, let its output through."""
    say(f"$ {shlex.join(argv)}")
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], env=cli_env(), check=False)


def capture(argv: list[str]) -> subprocess.CompletedProcess[str]:
    say(f"$ {shlex.join(argv)}")
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]], env=cli_env(), capture_output=True, text=True, check=False
    )


# -- host --------------------------------------------------------------------------------------


def check_host() -> frozenset[str]:
    """Root and a writable cgroup2 tree; returns the controllers it offers jobworker."""
    from jobworker.cgroup.discovery import own_cgroup_dir
    from jobworker.errors import HostError

    if os.geteuid() != 0:
        fail(
            "workerd needs root: it creates a cgroup for every job and moves the job into it.\n"
            "Run it as root, e.g. `sudo make run` (it only writes inside this checkout's ./dev "
            "and the cgroup tree)."
        )
    try:
        own = own_cgroup_dir()
    except HostError as e:
        fail(f"no cgroup v2 tree here: {e}\njobworker needs cgroup2 mounted (kernel 5.x+).")
    if not os.access(own, os.W_OK):
        fail(f"the cgroup {own} is not writable, so workerd cannot create job groups in it.")
    offered = frozenset((own / "cgroup.controllers").read_text().split())
    wanted = offered & {"cpu", "memory", "io", "pids"}
    say(f"root: yes; cgroup v2 group: {own}")
    if wanted:
        say(f"controllers offered for limits: {', '.join(sorted(wanted))}")
    else:
        say(
            "controllers offered for limits: none. This is a hybrid host: cgroup v1 owns "
            "cpu/memory/io/pids, so jobs run and are tracked, stopped and killed through "
            "cgroup v2, but workerd refuses limits (it cannot enforce them here)."
        )
    return frozenset(wanted)


# -- PKI and daemon ----------------------------------------------------------------------------


def ensure_pki() -> None:
    users = {USER: "user", ADMIN: "admin", VIEWER: "viewer"}
    missing = [n for n in users if not (PKI / f"{n}.pem").exists()]
    if (PKI / "ca.pem").exists() and not missing:
        say(f"reusing the dev PKI in {PKI.relative_to(ROOT)}")
        return
    argv = ["worker", "certs", "init", "--dir", str(PKI.relative_to(ROOT))]
    if (PKI / "ca.pem").exists():
        # A dev PKI from before the default users were renamed (admin, viewer): add them.
        argv += [a for n in missing for a in ("--user", f"{n}:{users[n]}")]
    if show(argv).returncode != 0:
        fail("could not create the dev PKI (see above)")


def running_pid() -> int | None:
    """The pid of a workerd this script started before, if it is still alive."""
    try:
        pid = int(PIDFILE.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"workerd" in cmdline and str(STATE).encode() in cmdline else None


def port_taken() -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, PORT))
        except OSError:
            return True
    return False


async def answers() -> bool:
    """Whether the daemon answers a List call with alice's certificate."""
    from jobworker.client import Client
    from jobworker.errors import JobworkerError

    try:
        async with Client.from_pki(ADDR, PKI, USER, timeout=2.0) as client:
            await client.list()
    except JobworkerError:
        return False
    return True


def start_daemon() -> int:
    argv = [
        str(BIN / "workerd"),
        "--pki", str(PKI),
        "--state-dir", str(STATE),
        "--listen", ADDR,
        # Not the default name: another workerd or JobManager in this same cgroup must not
        # share (and on close remove) the demo's parent group.
        "--cgroup-name", CGROUP_NAME,
    ]  # fmt: skip
    say(f"$ {shlex.join(['workerd', *argv[1:]])} &   # log: {LOG.relative_to(ROOT)}")
    with open(LOG, "ab") as log:
        # A session of its own: Ctrl+C in this terminal must not reach the daemon.
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    PIDFILE.write_text(f"{proc.pid}\n")
    started = time.monotonic()
    while not asyncio.run(answers()):
        if proc.poll() is not None:
            tail = LOG.read_text(errors="replace").splitlines()[-15:]
            fail("workerd exited at start:\n  " + "\n  ".join(tail))
        if time.monotonic() - started > READY_TIMEOUT:
            proc.send_signal(signal.SIGTERM)
            fail(f"workerd did not answer within {READY_TIMEOUT:g}s; see {LOG}")
        time.sleep(0.05)  # between readiness probes; the loop waits for the condition
    say(f"workerd is up (pid {proc.pid}) after {time.monotonic() - started:.1f}s")
    return proc.pid


def ensure_daemon() -> int:
    pid = running_pid()
    if pid is not None and asyncio.run(answers()):
        say(f"reusing the workerd started earlier (pid {pid}) on {ADDR}")
        return pid
    if port_taken():
        fail(
            f"{ADDR} is already in use by another program (another workerd?). Stop it, "
            "then run `make run` again."
        )
    return start_daemon()


# -- the demo ----------------------------------------------------------------------------------


def demo_job(controllers: frozenset[str]) -> None:
    limits: list[str] = []
    if "memory" in controllers:
        limits.append("--memory=64M")
    if "pids" in controllers:
        limits.append("--pids=32")
    if "cpu" in controllers:
        limits.append("--cpu=0.5")
    if not limits:
        say("This host cannot enforce limits; asking for one shows how workerd refuses it:")
        refused = capture(["worker", "start", "--memory=64M", "--", "sh", "-c", JOB])
        sys.stdout.write(refused.stderr)
        say(f"(exit code {refused.returncode}; no job, record or cgroup was created)\n")
        say("So the demo job runs without limits, still in a cgroup of its own:")
    started = capture(["worker", "start", *limits, "--", "sh", "-c", JOB])
    if started.returncode != 0:
        fail(f"worker start failed: {started.stderr.strip()}")
    job_id = started.stdout.strip()
    say(job_id)
    say("\nIts output, streamed back as it is written:")
    if show(["worker", "logs", "-f", job_id]).returncode != 0:
        fail("worker logs failed (see above)")
    say("")
    show(["worker", "status", job_id])


def write_env_file() -> None:
    ENVFILE.write_text(
        "# . dev/env  -- the worker CLI then talks to the demo daemon without flags\n"
        f"export WORKER_ADDR={shlex.quote(ADDR)}\n"
        f"export WORKER_PKI={shlex.quote(str(PKI))}\n"
        f"export WORKER_USER={USER}\n"
        f'export PATH={shlex.quote(str(BIN))}:"$PATH"\n'
    )


def next_steps(pid: int) -> None:
    env = ENVFILE.relative_to(ROOT)
    say(
        f"""
workerd keeps running (pid {pid}, log dev/workerd.log, jobs in dev/state).
Stop it with:  kill $(cat dev/workerd.pid)

Try it. First set the connection for this shell (WORKER_ADDR, WORKER_PKI, WORKER_USER=alice,
and .venv/bin on PATH):

  . {env}
  worker run -- sh -c 'echo hello; exit 3'; echo "exit code $?"
  id=$(worker start -- sh -c 'for i in $(seq 10); do date; sleep 1; done')
  worker logs -f "$id"              # also: worker -f logs "$id"
  worker status "$id"; worker status --json "$id"
  worker list                       # your jobs;  WORKER_USER={ADMIN} worker list --all
  worker wait "$id"; echo "$?"
  id=$(worker start -- sleep 600); worker stop "$id"
  WORKER_USER={VIEWER} worker stop "$id"     # refused: viewers may only read
  worker run -- seq 1000000 | head -3   # ends quietly and stops the job, as `seq | head` would
  worker run -- sleep 600              # Ctrl+C stops the job; a second Ctrl+C detaches
  worker --help                         # every command, the exit codes

Shell completion: eval "$(worker completion bash)"   (zsh, fish too)
Tests: make test"""
    )


def main() -> None:
    say("\033[1mjobworker demo\033[0m: workerd on this machine, the worker CLI talking to it")
    step(1, "host")
    controllers = check_host()
    DEV.mkdir(exist_ok=True)
    step(2, "a development PKI (CA, server and user certificates, mutual TLS 1.3)")
    ensure_pki()
    step(3, f"workerd in the background on {ADDR}")
    pid = ensure_daemon()
    write_env_file()
    step(4, f"a job, started and followed as {USER} (role user)")
    demo_job(controllers)
    step(5, "next")
    next_steps(pid)


if __name__ == "__main__":
    main()
