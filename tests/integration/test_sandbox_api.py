"""Who may have which sandbox, through the daemon: every job is sandboxed unless an admin asks
otherwise; the network defaults to the daemon's and a role can be kept off the host's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from jobworker import InvalidArgument, Network, PermissionDenied, Sandbox
from jobworker.client import Client
from jobworker.identity import Role
from jobworker.server.daemon import Daemon, serve
from tests.conftest import cgroup2_usable
from tests.integration import daemon_harness as harness

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect


async def test_jobs_are_sandboxed_by_default(daemon: Daemon, connect: Connect) -> None:
    alice = connect("alice")
    job = await alice.start(["true"])
    assert daemon.manager.spec(job.id).sandbox == Sandbox(Network.HOST)
    job = await alice.start(["true"], network=Network.NONE)
    assert daemon.manager.spec(job.id).sandbox == Sandbox(Network.NONE)


async def test_only_an_admin_may_start_without_the_sandbox(
    daemon: Daemon, connect: Connect
) -> None:
    with pytest.raises(PermissionDenied, match="without the sandbox"):
        await connect("alice").start(["true"], sandbox=False)
    assert daemon.manager.list() == []
    job = await connect("root").start(["true"], sandbox=False)
    assert daemon.manager.spec(job.id).sandbox is None
    with pytest.raises(InvalidArgument, match="network applies to the sandbox"):
        await connect("root").start(["true"], sandbox=False, network=Network.NONE)


@pytest.fixture
async def guarded(tmp_path: Path, pki_dir: Path, cgroup_name: str) -> AsyncIterator[Daemon]:
    """Jobs get no network by default, and only admins may have the host's."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    config = harness.make_config(
        tmp_path / "state",
        pki_dir,
        cgroup_name,
        default_network=Network.NONE,
        host_network_roles=frozenset({Role.ADMIN}),
    )
    d = await serve(config)
    try:
        yield d
    finally:
        await d.close()


async def test_the_default_network_and_the_roles_kept_off_the_host(
    guarded: Daemon, pki_dir: Path
) -> None:
    address = f"127.0.0.1:{guarded.port}"
    async with (
        Client.from_pki(address, pki_dir, "alice") as alice,
        Client.from_pki(address, pki_dir, "root") as admin,
    ):
        job = await alice.start(["true"])
        assert guarded.manager.spec(job.id).sandbox == Sandbox(Network.NONE)
        with pytest.raises(PermissionDenied, match="host's network"):
            await alice.start(["true"], network=Network.HOST)
        job = await admin.start(["true"], network=Network.HOST)
        assert guarded.manager.spec(job.id).sandbox == Sandbox(Network.HOST)


async def test_the_policy_file_keeps_roles_off_the_host_network(
    tmp_path: Path, pki_dir: Path, cgroup_name: str
) -> None:
    if reason := cgroup2_usable():
        pytest.skip(reason)
    policy = tmp_path / "policy.toml"
    policy.write_text('[network]\nhost = ["admin"]\n')
    config = harness.make_config(tmp_path / "state", pki_dir, cgroup_name, policy_file=policy)
    d = await serve(config)
    try:
        async with Client.from_pki(f"127.0.0.1:{d.port}", pki_dir, "alice") as alice:
            with pytest.raises(PermissionDenied, match="host's network"):
                await alice.start(["true"])  # the default network is the host's
            job = await alice.start(["true"], network=Network.NONE)
            assert d.manager.spec(job.id).sandbox == Sandbox(Network.NONE)
    finally:
        await d.close()
