"""Jobs run unprivileged unless root is granted by name, each identity as a uid of its own, and
cannot read the daemon's keys, other jobs' logs and records, or write into the state
directory."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import asyncio
import grp
import json
import pwd
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.errors import HostError, InvalidArgument
from jobworker.server.accounts import IDENTITIES_FILE, UidRange
from jobworker.server.daemon import Daemon, serve
from tests.conftest import cgroup2_usable

pki_dir = harness.pki_dir
NOBODY = pwd.getpwnam("nobody")


def open_up_tmp(tmp_path: Path) -> None:
    """pytest's tmp dirs are 0700; the state dir's own 0700 is what must keep jobs out."""
    for parent in (tmp_path, *tmp_path.parents):
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o055)


def free_range(size: int, start: int = 3_100_000) -> UidRange:
    """``size`` consecutive ids that no user or group of this host has."""

    def held(i: int) -> bool:
        for lookup in (pwd.getpwuid, grp.getgrgid):
            try:
                lookup(i)
            except KeyError:
                continue
            return True
        return False

    while any(held(i) for i in range(start, start + size)):
        start += size
    return UidRange(start, start + size - 1)


@pytest.fixture
async def daemon(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Daemon]:
    """A daemon whose jobs run as nobody (--job-user nobody), and a policy that grants root to
    the admin role by name."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    open_up_tmp(tmp_path)
    policy = tmp_path / "policy.toml"
    policy.write_text('[run_as.roles]\nadmin = "root"\n')
    config = harness.make_config(
        tmp_path / "state",
        pki_dir,
        cgroup_name,
        job_account="nobody",
        policy_file=policy,
    )
    d = await serve(config)
    try:
        yield d
    finally:
        await d.close()


async def output(client: Client, *argv: str) -> str:
    st = await client.start(list(argv))
    await client.wait(st.id)
    return b"".join([data async for _, data in client.logs(st.id, follow=True)]).decode()


async def test_jobs_run_as_nobody_and_cannot_touch_secrets(
    daemon: Daemon, pki_dir: Path, tmp_path: Path
) -> None:
    async with Client.from_pki(f"127.0.0.1:{daemon.port}", pki_dir, "alice") as alice:
        first = await alice.start(["echo", "alice's private output"])
        await alice.wait(first.id)
        jobs = tmp_path / "state" / "jobs"
        probe = (
            "id -u; id -g; "
            f"cat {pki_dir}/server-key.pem 2>&1; "
            f"cat {pki_dir}/ca-key.pem 2>&1; "
            f"cat {jobs}/{first.id}.log 2>&1; "
            f"cat {jobs}/{first.id}.json 2>&1; "
            f"touch {jobs}/planted 2>&1; "
            "echo end"
        )
        lines = (await output(alice, "sh", "-c", probe)).splitlines()
    assert lines[:2] == [str(NOBODY.pw_uid), str(NOBODY.pw_gid)]
    assert lines[-1] == "end"
    refusals = lines[2:-1]
    # The state dir is also masked in the job's sandbox: writing there finds no jobs/ at all.
    refused = ("Permission denied", "No such file or directory", "Read-only file system")
    assert len(refusals) == 5 and all(any(w in r for w in refused) for r in refusals), refusals
    assert not (jobs / "planted").exists()


async def test_root_only_when_granted_by_name(daemon: Daemon, pki_dir: Path) -> None:
    address = f"127.0.0.1:{daemon.port}"
    async with Client.from_pki(address, pki_dir, "root") as admin:
        assert (await output(admin, "id", "-u")).strip() == "0"
    async with Client.from_pki(address, pki_dir, "bob") as bob:
        assert (await output(bob, "id", "-u")).strip() == str(NOBODY.pw_uid)


async def test_job_environment_is_not_the_daemons(
    daemon: Daemon, pki_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKERD_SECRET", "x")
    async with Client.from_pki(f"127.0.0.1:{daemon.port}", pki_dir, "alice") as alice:
        st = await alice.start(["env"], env={"ASKED": "1"})
        await alice.wait(st.id)
        env = b"".join([d async for _, d in alice.logs(st.id, follow=True)]).decode()
    names = {line.split("=", 1)[0] for line in env.splitlines()}
    assert names == {"PATH", "LANG", "HOME", "ASKED"}


async def test_unknown_account_stops_the_daemon_at_start(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    config = harness.make_config(
        tmp_path / "state", pki_dir, cgroup_name, job_account="no-such-user-xyz"
    )
    with pytest.raises(InvalidArgument, match=r"no-such-user-xyz.*no such user"):
        await serve(config)


async def id_of(address: str, pki_dir: Path, user: str) -> list[str]:
    """``id -u``, ``id -g`` and ``id -G`` of a job ``user`` starts."""
    async with Client.from_pki(address, pki_dir, user) as client:
        return (await output(client, "sh", "-c", "id -u; id -g; id -G")).split("\n")[:3]


async def test_each_identity_runs_as_its_own_uid_across_restarts(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """The default (no --job-user): alice's and bob's jobs run as two uids of the daemon's
    range, gid = uid and no other group, the same after a restart on the same state dir; a
    policy entry still names root for the admin role."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    open_up_tmp(tmp_path)
    uids = free_range(16)
    policy = tmp_path / "policy.toml"
    policy.write_text('[run_as.roles]\nadmin = "root"\n')
    config = harness.make_config(
        tmp_path / "state",
        pki_dir,
        cgroup_name,
        job_account=None,
        uid_range=uids,
        policy_file=policy,
    )
    seen: list[dict[str, list[str]]] = []
    for _ in range(2):
        d = await serve(config)
        try:
            address = f"127.0.0.1:{d.port}"
            seen.append({u: await id_of(address, pki_dir, u) for u in ("alice", "bob", "root")})
        finally:
            await d.close()
    first, second = seen
    alice, bob = int(first["alice"][0]), int(first["bob"][0])
    assert alice != bob and alice in uids and bob in uids
    assert first["alice"] == [str(alice)] * 3  # gid = uid, no supplementary groups
    assert first["bob"] == [str(bob)] * 3
    assert first["root"][:2] == ["0", "0"]  # named by the policy
    assert second == first
    recorded = json.loads((tmp_path / "state" / IDENTITIES_FILE).read_text())["identities"]
    assert recorded == {"alice": alice, "bob": bob}  # root runs as a named account: no uid
    assert (tmp_path / "state" / IDENTITIES_FILE).stat().st_mode & 0o777 == 0o600


async def test_jobs_of_two_identities_cannot_touch_each_other(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """What a uid of one's own is for: bob's job can neither write nor remove a file alice's
    job made for itself in a shared sticky directory (as one shared account, both succeed)."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    open_up_tmp(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    d = await serve(
        harness.make_config(
            tmp_path / "state", pki_dir, cgroup_name, job_account=None, uid_range=free_range(16)
        )
    )
    try:
        address = f"127.0.0.1:{d.port}"
        async with (
            Client.from_pki(address, pki_dir, "alice") as alice,
            Client.from_pki(address, pki_dir, "bob") as bob,
        ):
            mine = shared / "alice-only"
            assert await output(alice, "sh", "-c", f"umask 022; echo mine > {mine}") == ""
            probe = f"echo x >> {mine} 2>&1; rm -f {mine} 2>&1; echo end"
            lines = (await output(bob, "sh", "-c", probe)).splitlines()
    finally:
        await d.close()
    assert lines[-1] == "end"
    assert len(lines) == 3 and "denied" in lines[0] and "not permitted" in lines[1], lines
    assert mine.read_text() == "mine\n"


async def test_empty_job_user_stops_the_daemon_at_start(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    """It used to mean "no account": every job ran as root."""
    config = harness.make_config(tmp_path / "state", pki_dir, cgroup_name, job_account="")
    with pytest.raises(InvalidArgument, match="--job-user is empty"):
        await serve(config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jobworker.server.daemon", "--pki", str(pki_dir),
        "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0", "--job-user", "",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 1, err
    assert err.decode().strip().splitlines() == [
        "workerd: --job-user is empty: name an account (USER[:GROUP]) for every identity the "
        "policy does not map, or leave it out to give each identity a uid of its own"
    ]
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ('[run_as]\nadmin = "root"\n', r"flat \[run_as\] table.*\[run_as.roles\] admin = 'root'"),
        ('[run_as.identities]\nalice = "no-such-user-xyz"\n', "'no-such-user-xyz': no such user"),
        ('[run_as.roles]\nuser = ""\n', r"\[run_as.roles\] user: the account must be"),
    ],
)
async def test_bad_run_as_stops_the_daemon_at_start(
    tmp_path: Path, pki_dir: Path, cgroup_name: str, policy: str, message: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(policy)
    config = harness.make_config(tmp_path / "state", pki_dir, cgroup_name, policy_file=path)
    with pytest.raises(InvalidArgument, match=message):
        await serve(config)
    assert not (tmp_path / "state").exists()


async def test_a_bad_identities_file_stops_the_daemon_at_start(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / IDENTITIES_FILE).write_text('{"version": 1, "identities": {"alice": "root"}}')
    (state / IDENTITIES_FILE).chmod(0o600)
    config = harness.make_config(state, pki_dir, cgroup_name, job_account=None)
    with pytest.raises(HostError, match=IDENTITIES_FILE):
        await serve(config)
