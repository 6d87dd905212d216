"""Runs the attack matrix against a real daemon: alice starts a job holding a secret; bob, an
ordinary ``user``, runs ``attacker.py`` as a job of his own, and one more job with no network.
Returns {attack: [outcome, evidence]}; an attack that worked has outcome "SUCCEEDED"."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jobworker import JobState, Limits, Network
from jobworker.client import Client
from jobworker.server.daemon import Daemon

ATTACKER = Path(__file__).with_name("attacker.py")
NEEDED_ROWS = (
    "environ", "cmdline", "fd/1", "mem", "kill", "ps", "/tmp", "/dev/shm", "state dir", "log",
    "record", "server key", "CA key", "cgroup.procs", "debug endpoint", "setuid", "network none",
)  # fmt: skip
"""Every attack the issue lists has at least one row."""


@contextmanager
def public_dir() -> Iterator[Path]:
    """World-readable: jobs run as their owners' own uids, which cannot enter pytest's 0700
    temporary directories."""
    d = Path("/var/tmp") / f"jobworker-attack-{uuid.uuid4().hex[:12]}"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _output(client: Client, job_id: str) -> bytes:
    return b"".join([data async for _, data in client.logs(job_id, follow=True)])


HERS = """\
import os, sys, time
for d in ('/tmp', '/dev/shm'):
    with open(d + '/alice-secret', 'w') as f:
        f.write(os.environ['API_TOKEN'])
print('ready', flush=True)
time.sleep(600)
"""

OFFLINE = """\
import socket, sys
try:
    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).close()
    print('SUCCEEDED connected')
except OSError as e:
    print('refused', type(e).__name__, e)
"""


async def run_matrix(
    daemon: Daemon, pki: Path, state: Path, public: Path, limits: Limits | None = None
) -> dict[str, list[str]]:
    address = f"127.0.0.1:{daemon.port}"
    secret, marker = f"token-{uuid.uuid4().hex}", f"alice-marker-{uuid.uuid4().hex[:8]}"
    script = public / "attacker.py"
    shutil.copy(ATTACKER, script)
    setuid_id = public / "id-setuid-root"
    shutil.copy("/usr/bin/id", setuid_id)
    setuid_id.chmod(0o4755)
    async with (
        Client.from_pki(address, pki, "alice") as alice,
        Client.from_pki(address, pki, "bob") as bob,
    ):
        hers = await alice.start(
            ["python3", "-c", HERS, marker], env={"API_TOKEN": secret}, limits=limits
        )
        async for _, data in alice.logs(hers.id, follow=True):
            assert data == b"ready\n", data
            break
        manager = daemon.manager
        args = {
            "secret_name": "API_TOKEN",
            "marker": marker,
            "pids": [hers.pid],
            "job": hers.id,
            "state": str(state),
            "pki": str(pki),
            "cgroup_parent": str(manager.cgroup_parent),
            "debug_socket": str(daemon.debug_socket),
            "setuid_id": str(setuid_id),
        }
        (public / "args.json").write_text(json.dumps(args))
        his = await bob.start(
            ["python3", str(script), str(public / "args.json")], cwd=str(public), limits=limits
        )
        out = await _output(bob, his.id)
        final = await bob.wait(his.id)
        assert final.exit_code == 0, (final, out)
        matrix: dict[str, list[str]] = json.loads(out.decode().splitlines()[-1])

        offline = await bob.start(
            ["python3", "-c", OFFLINE, str(daemon.port)], network=Network.NONE, limits=limits
        )
        said = (await _output(bob, offline.id)).decode().strip()
        matrix["reach the daemon's gRPC port with --network none"] = said.split(" ", 1)

        still = await alice.status(hers.id)
        matrix["kill any of her processes (checked after: her job runs on)"] = (
            ["refused", "running"] if still.state is JobState.RUNNING else ["SUCCEEDED", str(still)]
        )
        await alice.stop(hers.id)
    return matrix


def report(matrix: dict[str, list[str]]) -> str:
    width = max(map(len, matrix))
    rows = [
        f"  {attack:<{width}}  {outcome:<9}  {why}" for attack, (outcome, why) in matrix.items()
    ]
    return "\n".join(["attack matrix (bob's job against alice's job and the daemon):", *rows])


def check(matrix: dict[str, list[str]]) -> None:
    won = {k: v for k, v in matrix.items() if v[0] != "refused"}
    assert not won, f"attacks that worked: {won}"
    kinds = " ".join(matrix)
    missing = [row for row in NEEDED_ROWS if row not in kinds]
    assert not missing, f"no attack row for {missing}"
