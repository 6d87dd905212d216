"""Jobs run unprivileged unless root is granted by name, and cannot read the daemon's keys,
other jobs' logs and records, or write into the state directory."""

from __future__ import annotations

# isort: off
from tests.integration import daemon_harness as harness

# isort: on
import pwd
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker.client import Client
from jobworker.errors import InvalidArgument
from jobworker.server.daemon import Daemon, serve
from tests.conftest import cgroup2_usable

pki_dir = harness.pki_dir
NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
async def daemon(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Daemon]:
    """A daemon with the product defaults for accounts (jobs as nobody), and a policy that
    grants root to the admin role by name."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    # pytest's tmp dirs are 0700; the state dir's own 0700 is what must keep jobs out.
    for parent in (tmp_path, *tmp_path.parents):
        if parent == Path("/tmp"):
            break
        parent.chmod(parent.stat().st_mode | 0o055)
    policy = tmp_path / "policy.toml"
    policy.write_text('[run_as]\nadmin = "root"\n')
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
