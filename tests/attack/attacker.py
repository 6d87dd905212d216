"""bob's job: tries every attack on alice's job and the daemon, prints one JSON object
{attack: [outcome, evidence]}; outcome "SUCCEEDED" only when the attack got what it wanted.

Its arguments come in a file (argv[1]) so that alice's marker is not in its own command line;
it is not told alice's secret, only the variable's name."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

with open(sys.argv[1]) as f:
    args = json.load(f)
secret, marker = args["secret_name"].encode() + b"=", args["marker"].encode()
me = os.getpid()
results: dict[str, list[str]] = {}


def attempt(name: str, fn: Callable[[], Any]) -> None:
    try:
        evidence = fn()
    except Exception as e:
        results[name] = ["refused", f"{type(e).__name__}: {e}"[:160]]
        return
    results[name] = ["SUCCEEDED", repr(evidence)[:160]] if evidence else ["refused", "nothing"]


def hers(pid: int) -> bool:
    """Whether ``pid`` in this job's view is one of alice's processes."""
    if pid == me:
        return False
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return marker in f.read()


def read_proc(pid: int, what: str) -> Callable[[], bytes | None]:
    def go() -> bytes | None:
        with open(f"/proc/{pid}/{what}", "rb") as f:
            data = f.read(65536)
        return data if (secret in data or marker in data) else None

    return go


def open_proc(pid: int, what: str) -> Callable[[], str | bool]:
    def go() -> str | bool:
        fd = os.open(f"/proc/{pid}/{what}", os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        return hers(pid) and f"opened /proc/{pid}/{what}"

    return go


def _kill(pid: int) -> str:
    os.kill(pid, signal.SIGKILL)
    return f"signalled {pid}"


def visible_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


named: set[int] = set(args["pids"])
for pid in visible_pids():
    try:
        if hers(pid):
            named.add(pid)
    except OSError:
        pass
for pid in sorted(named):
    attempt(f"read environ of {pid}", read_proc(pid, "environ"))
    attempt(f"read cmdline of {pid}", read_proc(pid, "cmdline"))
    attempt(f"open fd/1 of {pid}", open_proc(pid, "fd/1"))
    attempt(f"open mem of {pid}", open_proc(pid, "mem"))
    attempt(f"kill {pid}", lambda pid=pid: _kill(pid))  # type: ignore[misc]


def ps() -> bytes | None:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, check=True).stdout
    return out if marker in out else None


attempt("see her processes in ps", ps)


def read_file(path: str, needle: bytes) -> Callable[[], bytes | None]:
    def go() -> bytes | None:
        with open(path, "rb") as f:
            data = f.read()
        return data if needle in data else None

    return go


def write_file(path: str) -> Callable[[], str]:
    def go() -> str:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # hers: never create a file of his own
        try:
            os.write(fd, f"{me}\n".encode())
        finally:
            os.close(fd)
        return f"wrote {path}"

    return go


for where in ("/tmp", "/dev/shm"):
    attempt(f"read her file in {where}", read_file(f"{where}/alice-secret", b"-"))
    attempt(f"write her file in {where}", write_file(f"{where}/alice-secret"))


def listing(path: str) -> Callable[[], list[str] | None]:
    def go() -> list[str] | None:
        return os.listdir(path) or None

    return go


state = args["state"]
attempt("list the state dir", listing(state))
attempt("read her log", read_file(f"{state}/jobs/{args['job']}.log", b"ready"))
attempt("read her record", read_file(f"{state}/jobs/{args['job']}.json", marker))
attempt("read the server key", read_file(f"{args['pki']}/server-key.pem", b"PRIVATE KEY"))
attempt("read the CA key", read_file(f"{args['pki']}/ca-key.pem", b"PRIVATE KEY"))
attempt("list the job cgroups", listing(args["cgroup_parent"]))
for whose, group in (
    ("her job's", f"{args['cgroup_parent']}/{args['job']}"),
    ("the daemon's job parent's", args["cgroup_parent"]),
):
    attempt(f"write {whose} cgroup.procs", write_file(f"{group}/cgroup.procs"))


def debug_endpoint() -> bytes:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(args["debug_socket"])
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return s.recv(100)
    finally:
        s.close()


attempt("connect to the debug endpoint", debug_endpoint)


def setuid_root() -> bytes | None:
    out = subprocess.run([args["setuid_id"], "-u"], capture_output=True, check=True).stdout
    return out if out.strip() == b"0" else None


attempt("gain root through a setuid-root id", setuid_root)
print(json.dumps(results))
