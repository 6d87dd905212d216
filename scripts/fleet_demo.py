"""What `make run-fleet` runs: an etcd and three workerd hosts on loopback, registered as a fleet,
then `worker hosts`, a placement, `run --on all` and the merged list, and the commands to try.

Everything lives in ./dev/fleet (gitignored): the etcd data dir, a PKI whose hosts/NAME/
directories hold each host's certificate (naming it), each host's state dir and log, the pid
files and dev/fleet/env (the WORKER_* variables). The processes are left running so the printed
commands work; `make stop-fleet` (this script with `stop`) ends them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "dev" / "fleet"
PKI = DEV / "pki"
BIN = Path(sys.executable).parent
ETCD_URL = "http://127.0.0.1:23790"
ETCD_PEER = "http://127.0.0.1:23800"
HOSTS = {
    "host-a": (50061, "zone=a,gpu"),
    "host-b": (50062, "zone=b"),
    "host-c": (50063, "zone=b,gpu"),
}
CAPACITY = "4"
TIMEOUT = 30.0


def say(text: str = "") -> None:
    print(text, flush=True)


def fail(text: str) -> None:
    say(f"\nmake run-fleet: {text}")
    sys.exit(1)


def alive(pidfile: Path) -> bool:
    try:
        os.kill(int(pidfile.read_text()), 0)
    except (OSError, ValueError):
        return False
    return True


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait(what: str, check: Callable[[], bool], log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not check():
        if time.monotonic() > deadline:
            fail(f"{what} did not come up in {TIMEOUT:.0f}s; see {log}")
        time.sleep(0.1)


def spawn(argv: list[str], log: Path, pidfile: Path) -> None:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    pidfile.write_text(f"{proc.pid}\n")


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    e.update(WORKER_PKI=str(PKI), WORKER_USER="alice", WORKER_FLEET=ETCD_URL)
    return e


def worker(*args: str, check: bool = True) -> None:
    say(f"\n$ worker {' '.join(args)}")
    code = subprocess.run([str(BIN / "worker"), *args], env=env(), check=False).returncode
    if check and code != 0:
        fail(f"worker {args[0]} exited {code}")


def start() -> None:
    etcd = shutil.which("etcd")
    if etcd is None:
        fail("no etcd: apt-get install etcd-server (Debian's package)")
        return
    DEV.mkdir(parents=True, exist_ok=True)
    if not (PKI / "ca.pem").exists():
        subprocess.run(
            [str(BIN / "worker"), "certs", "init", "--dir", str(PKI), "--user", "alice:user",
             "--user", "ops:admin"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    for name in HOSTS:
        if not (PKI / "hosts" / name).exists():
            subprocess.run(
                [str(BIN / "worker"), "certs", "host", name, "--dir", str(PKI)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
    say("\n[1/3] etcd and three workerd hosts on loopback")
    if not alive(DEV / "etcd.pid"):
        spawn(
            [etcd, "--name", "dev", "--data-dir", str(DEV / "etcd"),
             "--listen-client-urls", ETCD_URL, "--advertise-client-urls", ETCD_URL,
             "--listen-peer-urls", ETCD_PEER, "--initial-advertise-peer-urls", ETCD_PEER,
             "--initial-cluster", f"dev={ETCD_PEER}"],
            DEV / "etcd.log", DEV / "etcd.pid",
        )  # fmt: skip
        wait("etcd", lambda: listening(23790), DEV / "etcd.log")
    for name, (port, labels) in HOSTS.items():
        if alive(DEV / f"{name}.pid"):
            continue
        spawn(
            [str(BIN / "workerd"), "--pki", str(PKI / "hosts" / name),
             "--listen", f"127.0.0.1:{port}", "--state-dir", str(DEV / f"state-{name}"),
             "--cgroup-name", f"jobworker-dev-{name}", "--job-user", "root",
             "--fleet", ETCD_URL, "--name", name, "--advertise", f"127.0.0.1:{port}",
             "--label", labels, "--capacity", CAPACITY],
            DEV / f"{name}.log", DEV / f"{name}.pid",
        )  # fmt: skip
    for name in HOSTS:
        log = DEV / f"{name}.log"

        def registered(log: Path = log) -> bool:
            return "fleet: registered" in log.read_text()

        wait(name, registered, log)
    (DEV / "env").write_text(
        "".join(f"export {k}={v}\n" for k, v in env().items() if k.startswith("WORKER_"))
    )
    say("\n[2/3] the fleet")
    worker("hosts")
    worker("start", "--on", "zone=b", "--", "sleep", "60")
    worker(
        "run", "--on", "all", "--", "sh", "-c", 'echo "my cgroup: $(grep ^0:: /proc/self/cgroup)"'
    )
    worker("list")
    say("\n[3/3] try next (after `. dev/fleet/env`):")
    for line in (
        "worker hosts",
        "worker run --on gpu -- nproc",
        "id=$(worker start --on zone=a -- sh -c 'for i in 1 2 3; do echo $i; sleep 1; done')",
        'worker logs -f "$id"; worker status "$id"',
        "kill -9 $(cat dev/fleet/host-b.pid); sleep 11; worker hosts   # host-b's lease expired",
        "make stop-fleet",
    ):
        say(f"  {line}")


def stop() -> None:
    """The hosts first (each deregisters, stops its jobs and removes its cgroups), then etcd."""
    for names in (list(HOSTS), ["etcd"]):
        pids = {}
        for name in names:
            pidfile = DEV / f"{name}.pid"
            if alive(pidfile):
                pids[name] = int(pidfile.read_text())
                os.kill(pids[name], signal.SIGTERM)
        deadline = time.monotonic() + TIMEOUT
        for name, pid in pids.items():
            while alive(DEV / f"{name}.pid") and time.monotonic() < deadline:
                time.sleep(0.1)
            say(f"stopped {name}" if not alive(DEV / f"{name}.pid") else f"{name} ({pid}) goes on")
        for name in names:
            (DEV / f"{name}.pid").unlink(missing_ok=True)


if __name__ == "__main__":
    stop() if sys.argv[1:] == ["stop"] else start()
