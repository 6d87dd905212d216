"""A fleet of three real workerd hosts on loopback, registered in a real etcd, driven through the
real ``worker`` CLI (and the :class:`jobworker.client.fleet.Fleet` library for the concurrent
placement): registration, placement, routing, run everywhere, and the failure modes of
docs/fleet.md."""

from __future__ import annotations

import asyncio
import collections
import json
import re
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from jobworker import tls
from jobworker.api import fleet as layout
from jobworker.api.fleet import Endpoints, HostRecord, Selector
from jobworker.client.fleet import Fleet as FleetClient
from jobworker.errors import ResourceExhausted
from tests.conftest import JOB_PYTHON
from tests.fleet.conftest import (
    HOSTS,
    TTL,
    Etcd,
    Fleet,
    Host,
    Proxy,
    store_of,
    worker,
    worker_argv,
)


def client_of(fleet: Fleet, user: str = "alice") -> FleetClient:
    return FleetClient(
        Endpoints.parse(fleet.etcd.url), tls.Paths.from_pki(fleet.pki, user), timeout=30
    )


async def slots_of(fleet: Fleet) -> dict[str, int]:
    async with store_of(fleet.etcd) as store:
        kvs, _ = await store.get_prefix(layout.SLOTS)
    return dict(collections.Counter(kv.key.removeprefix(layout.SLOTS).split("/")[0] for kv in kvs))


async def registered(fleet: Fleet) -> set[str]:
    async with store_of(fleet.etcd) as store:
        kvs, _ = await store.get_prefix(layout.HOSTS)
    return {kv.key.removeprefix(layout.HOSTS) for kv in kvs}


async def poll(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Until ``predicate()`` comes true; bounded (a safety net, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


def gated(tmp_path: Path, name: str = "gate") -> tuple[Path, list[str]]:
    """A command that prints "started", waits for the gate file, prints "done"."""
    gate = tmp_path / name
    script = (
        "import os, sys, time\n"
        "print('started', flush=True)\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.02)\n"
        "print('done', flush=True)\n"
    )
    return gate, [JOB_PYTHON, "-c", script]


async def test_registration_and_hosts(fleet: Fleet, three: dict[str, Host]) -> None:
    result = await worker(fleet, "hosts", "--json")
    assert result.code == 0, result.err
    listed = {h["name"]: h for h in json.loads(result.out)}
    assert set(listed) == set(HOSTS)
    for name, host in three.items():
        entry = listed[name]
        assert entry["address"] == host.address
        assert entry["labels"] == layout.parse_labels([HOSTS[name]])
        assert entry["capacity"] == 20
        assert entry["running"] == 0
        assert entry["version"]
        assert isinstance(entry["controllers"], list)
        assert 0 <= entry["heartbeat_age_seconds"] <= TTL
    text = await worker(fleet, "hosts")
    assert text.code == 0
    assert text.out.splitlines()[0].split()[:5] == ["HOST", "ADDRESS", "LABELS", "SLOTS", "RUNNING"]
    assert re.search(r"^host-b\s+127\.0\.0\.1:\d+\s+zone=b\s+0/20\s+0\s+\d+s ago", text.out, re.M)

    # Graceful shutdown deregisters at once (the lease is revoked, not left to expire).
    three["host-c"].proc.terminate()
    await asyncio.wait_for(three["host-c"].proc.wait(), 20)
    assert "fleet: deregistered host-c" in three["host-c"].log.read_text()
    assert await registered(fleet) == {"host-a", "host-b"}


async def test_label_placement(fleet: Fleet, three: dict[str, Host]) -> None:
    a = await worker(fleet, "start", "--on", "zone=a", "--", "sleep", "30")
    assert a.code == 0, a.err
    assert a.out.strip().startswith("host-a/")
    c = await worker(fleet, "start", "--on", "zone=b,gpu", "--", "sleep", "30")
    assert c.out.strip().startswith("host-c/"), c.err
    not_gpu = await worker(fleet, "start", "--on", "!gpu", "--", "sleep", "30")
    assert not_gpu.out.strip().startswith("host-b/"), not_gpu.err
    # zone=b: host-b has 1 job, host-c 1; the least loaded wins, so two more land one on each.
    placed = [await worker(fleet, "start", "--on", "zone=b", "--", "sleep", "30") for _ in "12"]
    assert sorted(p.out.split("/")[0] for p in placed) == ["host-b", "host-c"]
    assert await slots_of(fleet) == {"host-a": 1, "host-b": 2, "host-c": 2}
    nowhere = await worker(fleet, "start", "--on", "zone=z", "--", "true")
    assert nowhere.code == 75 and "zone=z" in nowhere.err
    bad = await worker(fleet, "start", "--on", "zone=a,=x", "--", "true")
    assert bad.code == 64 and "--on" in bad.err
    no_fleet = await worker(fleet, "start", "--on", "any", "--", "true", fleet_url=False)
    assert no_fleet.code == 64 and "--fleet" in no_fleet.err


async def test_failed_start_releases_its_reservation(fleet: Fleet, three: dict[str, Host]) -> None:
    result = await worker(fleet, "start", "--on", "any", "--", "/no/such/command")
    assert result.code == 65, result.err
    assert await slots_of(fleet) == {}


async def test_two_clients_never_overbook(fleet: Fleet, three: dict[str, Host]) -> None:
    """Two clients place 60 jobs at once onto 3 hosts of 20 slots: each gets exactly 20 (any
    over-booking would leave another host short), and a 61st finds no room."""
    first, second = client_of(fleet), client_of(fleet)
    placed: list[str] = []
    try:

        async def place(client: FleetClient) -> str:
            p = await client.start(Selector.parse("any"), ["sleep", "300"])
            placed.append(p.fleet_id)
            return p.host.name

        names = await asyncio.gather(*(place(c) for c in [first, second] * 30))
        assert collections.Counter(names) == {n: 20 for n in HOSTS}
        assert await slots_of(fleet) == {n: 20 for n in HOSTS}
        with pytest.raises(ResourceExhausted, match="full"):
            await first.start(Selector.parse("any"), ["sleep", "300"])
        for h in await first.hosts():  # each host's own count agrees
            async with first.client(h) as c:
                assert sum(s.state.value == "running" for s in await c.list()) == 20
    finally:

        async def stop(fid: str) -> None:
            host, job = fid.split("/")
            async with first.client((await first.host(host)).record) as c:
                await c.stop(job, grace=0)

        await asyncio.gather(*(stop(f) for f in placed))
        await first.close()
        await second.close()
    # Ended jobs give their slots back (the hosts' reconcile, every TTL/3 s).
    await poll(lambda: _empty(fleet), TTL * 3, "the slots of ended jobs to be released")


async def _empty(fleet: Fleet) -> bool:
    return await slots_of(fleet) == {}


async def test_every_verb_routes_by_fleet_id(
    fleet: Fleet, three: dict[str, Host], tmp_path: Path
) -> None:
    gate, argv = gated(tmp_path)
    started = await worker(fleet, "start", "--on", "zone=b,gpu", "--", *argv)
    assert started.code == 0, started.err
    fid = started.out.strip()
    host, job = fid.split("/")
    assert host == "host-c"
    status = await worker(fleet, "status", "--json", fid)
    assert status.code == 0, status.err
    assert json.loads(status.out)["id"] == job
    await poll(lambda: _logs_have(fleet, fid, "started"), 10, "the job's first line")
    # Another user cannot reach it through its fleet id either.
    assert (await worker(fleet, "status", fid, user="bob")).code == 66
    # A plain id goes to --addr only: the same id on another host is not found.
    other = await worker(fleet, "--addr", three["host-a"].address, "status", job)
    assert other.code == 66
    follow = await asyncio.create_subprocess_exec(
        *worker_argv(fleet, "logs", "-f", fid)[0],
        env=worker_argv(fleet)[1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    gate.touch()
    out, err = await asyncio.wait_for(follow.communicate(), 30)
    assert follow.returncode == 0, err
    assert out.decode().splitlines() == ["started", "done"]
    waited = await worker(fleet, "wait", fid)
    assert waited.code == 0, waited.err
    stopped = await worker(fleet, "stop", fid)
    assert stopped.code == 0 and "exited" in stopped.out
    removed = await worker(fleet, "rm", fid)
    assert removed.code == 0, removed.err
    assert (await worker(fleet, "status", fid)).code == 66
    ghost = await worker(fleet, "status", "host-z/" + job)
    assert ghost.code == 66 and "host-z" in ghost.err
    unrouted = await worker(fleet, "status", fid, fleet_url=False)
    assert unrouted.code == 64 and "--fleet" in unrouted.err
    # The merged list: a HOST column, every host's jobs.
    for on in ("zone=a", "!gpu"):
        assert (await worker(fleet, "start", "--on", on, "--", "true")).code == 0
    listing = await worker(fleet, "list")
    assert listing.code == 0, listing.err
    assert listing.out.splitlines()[0].split()[:2] == ["HOST", "ID"]
    assert sorted(line.split()[0] for line in listing.out.splitlines()[1:]) == ["host-a", "host-b"]


async def _logs_have(fleet: Fleet, fid: str, text: str) -> bool:
    result = await worker(fleet, "logs", fid)
    return text in result.out


async def test_run_on_all_with_a_host_killed(
    fleet: Fleet, three: dict[str, Host], tmp_path: Path
) -> None:
    gate, argv = gated(tmp_path)
    args, env = worker_argv(fleet, "run", "--on", "all", "--", *argv)
    run = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert run.stdout is not None and run.stderr is not None
    seen: list[str] = []
    async with asyncio.timeout(30):
        while len(seen) < 3:
            seen.append((await run.stdout.readline()).decode())
    assert sorted(seen) == [f"{n}: started\n" for n in sorted(HOSTS)]
    three["host-b"].kill()
    await three["host-b"].proc.wait()
    await poll(lambda: _gone(fleet, "host-b"), TTL + 2, "host-b's lease to expire")
    gate.touch()
    rest, err = await asyncio.wait_for(run.communicate(), 30)
    assert sorted(rest.decode().splitlines()) == ["host-a: done", "host-c: done"]
    summary = err.decode()
    assert re.search(r"^host-a\s+0\s+exited", summary, re.M), summary
    assert re.search(r"^host-b\s+71\s+lost", summary, re.M), summary
    assert re.search(r"^host-c\s+0\s+exited", summary, re.M), summary
    assert "failed on 1 of 3 host(s): host-b (lost" in summary
    assert run.returncode == 71


async def test_run_on_selector_without_prefix(fleet: Fleet, three: dict[str, Host]) -> None:
    result = await worker(fleet, "run", "--on", "gpu", "--no-prefix", "--", "echo", "hi")
    assert result.code == 0, result.err
    assert result.out == "hi\nhi\n"
    failing = await worker(fleet, "run", "--on", "zone=b", "--", "sh", "-c", "echo x; exit 3")
    assert failing.code == 3
    assert sorted(failing.out.splitlines()) == ["host-b: x", "host-c: x"]
    assert "failed on 2 of 2 host(s)" in failing.err


async def _gone(fleet: Fleet, name: str) -> bool:
    return name not in await registered(fleet)


async def test_lease_expiry_removes_a_dead_host(fleet: Fleet, three: dict[str, Host]) -> None:
    killed = time.monotonic()
    three["host-a"].kill()
    await poll(lambda: _gone(fleet, "host-a"), TTL + 2, "host-a to leave the fleet")
    assert time.monotonic() - killed <= TTL + 2
    assert await registered(fleet) == {"host-b", "host-c"}
    listing = await worker(fleet, "list")
    assert listing.code == 0, listing.err


async def test_etcd_down_and_back(fleet: Fleet, three: dict[str, Host], tmp_path: Path) -> None:
    """etcd stopped: jobs go on, --addr works, fleet commands fail clearly. Restarted empty
    (its data lost): every host registers again and its running job gets its slot back."""
    gate, argv = gated(tmp_path)
    fid = (await worker(fleet, "start", "--on", "zone=a", "--", *argv)).out.strip()
    host, job = fid.split("/")
    fleet.etcd.stop()
    down = await worker(fleet, "hosts")
    assert down.code == 69
    assert "etcd" in down.err and "--addr" in down.err
    assert (await worker(fleet, "list")).code == 69
    assert (await worker(fleet, "status", fid)).code == 69
    direct = await worker(fleet, "--addr", three[host].address, "status", "--json", job)
    assert direct.code == 0, direct.err
    assert json.loads(direct.out)["state"] == "running"
    await fleet.etcd.start(wipe=True)
    await poll(lambda: _all_back(fleet), 30, "every host to register again")
    await poll(lambda: _slotted(fleet, host), 10, "the running job's slot")
    status = await worker(fleet, "status", "--json", fid)
    assert status.code == 0, status.err
    assert json.loads(status.out)["state"] == "running"
    gate.touch()
    assert (await worker(fleet, "wait", fid)).code == 0


async def test_partition_between_a_host_and_etcd(fleet: Fleet, tmp_path: Path) -> None:
    """host-b reaches etcd through a relay that is cut: it keeps its job and serves it, leaves
    the fleet when its lease expires, and registers again (its job with a slot) once healed."""
    proxy = Proxy(fleet.etcd.client_port)
    await proxy.start()
    try:
        await fleet.start("host-a", "zone=a")
        b = await fleet.start("host-b", "zone=b", etcd_url=proxy.url)
        gate, argv = gated(tmp_path)
        fid = (await worker(fleet, "start", "--on", "zone=b", "--", *argv)).out.strip()
        assert fid.startswith("host-b/")
        proxy.cut()
        await poll(lambda: _gone(fleet, "host-b"), TTL + 2, "host-b's lease to expire")
        assert await slots_of(fleet) == {}
        hosts = json.loads((await worker(fleet, "hosts", "--json")).out)
        assert [h["name"] for h in hosts] == ["host-a"]
        direct = await worker(fleet, "--addr", b.address, "status", "--json", fid.split("/")[1])
        assert json.loads(direct.out)["state"] == "running", direct.err
        proxy.heal()
        await poll(lambda: _registered_again(fleet, "host-b"), 30, "host-b to register again")
        await poll(lambda: _slotted(fleet, "host-b"), 10, "host-b's job to get its slot back")
        gate.touch()
        waited = await worker(fleet, "wait", fid)
        assert waited.code == 0, waited.err
    finally:
        await proxy.close()


async def _registered_again(fleet: Fleet, name: str) -> bool:
    return name in await registered(fleet)


async def _all_back(fleet: Fleet) -> bool:
    try:
        return await registered(fleet) == set(HOSTS)
    except Exception:
        return False


async def _slotted(fleet: Fleet, host: str) -> bool:
    return (await slots_of(fleet)).get(host) == 1


async def test_a_host_must_prove_its_name(fleet: Fleet, tmp_path: Path) -> None:
    a = await fleet.start("host-a", "zone=a", "--capacity", "10")
    # workerd refuses to register under a name its certificate does not carry ...
    impostor = await fleet.start("host-x", "zone=a", cert_of="host-b", wait=False)
    assert await asyncio.wait_for(impostor.proc.wait(), 30) == 1
    assert "the server certificate names" in impostor.log.read_text()
    # ... and clients drop a record whose host cannot prove the name (one written by hand,
    # naming host-z at host-a's address), with a warning.
    async with store_of(fleet.etcd) as store:
        lease = await store.grant(60)
        forged = HostRecord("host-z", a.address, {"zone": "a"}, capacity=50, lease=lease)
        await store.put(layout.host_key("host-z"), forged.to_json(), lease)
        try:
            hosts = await worker(fleet, "hosts", "--json")
            assert [h["name"] for h in json.loads(hosts.out)] == ["host-a"]
            assert "host-z" in hosts.err and "does not prove that name" in hosts.err
            for _ in range(3):  # host-z has 50 free slots: placement must still skip it
                placed = await worker(fleet, "start", "--on", "zone=a", "--", "true")
                assert placed.out.startswith("host-a/"), placed.err
            assert (await worker(fleet, "status", "host-z/x")).code == 66
        finally:
            await store.revoke(lease)


def test_selectors_and_endpoints() -> None:
    s = Selector.parse("zone=a,gpu,!spot")
    assert s.matches({"zone": "a", "gpu": ""})
    assert not s.matches({"zone": "a", "gpu": "", "spot": "1"})
    assert not s.matches({"zone": "b", "gpu": ""})
    assert Selector.parse("all").matches({})
    e = Endpoints.parse("http://10.0.0.5:2379,http://10.0.0.6")
    assert e.hosts == (("10.0.0.5", 2379), ("10.0.0.6", 2379)) and not e.tls
    assert Endpoints.parse("https://[::1]:2380").hosts == (("::1", 2380),)
    for bad in ("10.0.0.5:2379", "http://a:2379,https://b:2379", "ftp://x", ""):
        with pytest.raises(Exception, match="--fleet"):
            Endpoints.parse(bad)
    assert layout.split_fleet_id("host-a/123") == ("host-a", "123")
    assert layout.split_fleet_id("123") is None
    with pytest.raises(Exception, match="fleet job id"):
        layout.split_fleet_id("Host_A/1")
    # A record is printed by clients: what it may hold is checked (anyone who can write to
    # etcd can write one).
    good = HostRecord("host-a", "10.0.0.7:50051", {"zone": "a"}, capacity=4)
    assert HostRecord.from_json(good.to_json()) == good
    for evil in (
        {"advertise": "\x1b[2J:1"},
        {"labels": {"zone": "\x1b]0;pwned\x07"}},
        {"labels": {"bad key": "x"}},
        {"name": "Host_A"},
        {"capacity": 0},
    ):
        d = {**json.loads(good.to_json()), **evil}
        with pytest.raises(Exception, match="not a host record"):
            HostRecord.from_json(json.dumps(d).encode())


async def test_ctrl_c_stops_every_job(fleet: Fleet, three: dict[str, Host], tmp_path: Path) -> None:
    _, argv = gated(tmp_path)  # the gate never opens: only the stop ends them
    args, env = worker_argv(fleet, "run", "--on", "all", "--", *argv)
    run = await asyncio.create_subprocess_exec(
        *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert run.stdout is not None
    async with asyncio.timeout(30):
        for _ in HOSTS:
            assert (await run.stdout.readline()).endswith(b": started\n")
    run.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(run.communicate(), 30)
    summary = err.decode()
    assert "stopping the job on 3 host(s)" in summary
    for name in HOSTS:
        assert re.search(rf"^{name}\s+143\s+stopped \(stopped by alice\)", summary, re.M), summary
    assert run.returncode == 143
    listing = json.loads((await worker(fleet, "list", "--json")).out)
    assert sorted(j["host"] for j in listing) == sorted(HOSTS)
    assert {j["state"] for j in listing} == {"stopped"}


async def test_etcd_over_mutual_tls(tmp_path: Path, fleet_pki: Path, tls_etcd: Etcd) -> None:
    """https:// endpoints with etcd's own mTLS, on both sides; without a client certificate etcd
    refuses, and the command says etcd is unavailable."""
    tls_fleet = Fleet(tmp_path, fleet_pki, tls_etcd)
    client_tls = tls_etcd.client_tls()
    assert client_tls is not None and client_tls.cert and client_tls.key and client_tls.ca
    flags = ["--etcd-ca", str(client_tls.ca), "--etcd-cert", str(client_tls.cert)]
    flags += ["--etcd-key", str(client_tls.key)]
    try:
        await tls_fleet.start("host-a", "zone=a", *flags)
        hosts = await worker(tls_fleet, *flags, "hosts", "--json")
        assert hosts.code == 0, hosts.err
        assert [h["name"] for h in json.loads(hosts.out)] == ["host-a"]
        placed = await worker(tls_fleet, *flags, "start", "--on", "any", "--", "true")
        assert placed.out.startswith("host-a/"), placed.err
        refused = await worker(tls_fleet, "--etcd-ca", str(client_tls.ca), "hosts")
        assert refused.code == 69 and "etcd" in refused.err
    finally:
        await tls_fleet.close()


async def test_forged_slots_cannot_keep_a_host_full(fleet: Fleet) -> None:
    """Anyone who can write to etcd can fill a host's slots with forged reservations (dated in
    the future, too) and slots of jobs that do not exist. The host takes them back: a job slot
    for no running job at its next reconcile, a pending one after the grace it measures itself."""
    grace = 3
    await fleet.start("host-a", "zone=a", "--capacity", "2", "--fleet-grace", str(grace))
    async with store_of(fleet.etcd) as store:
        kv = await store.get(layout.host_key("host-a"))
        assert kv is not None
        lease = HostRecord.from_json(kv.value).lease
        future = time.time() + 3600
        await store.put(
            layout.slot_key("host-a", 0),
            layout.Slot("pending", token="x", at=future).to_json(),
            lease,
        )
        await store.put(
            layout.slot_key("host-a", 1), layout.Slot("job", job="no-such-job").to_json(), lease
        )
    full = await worker(fleet, "start", "--on", "any", "--", "true")
    assert full.code == 75 and "full" in full.err
    await poll(lambda: _empty(fleet), grace * 1.25 + TTL + 2, "the forged slots to be taken back")
    placed = await worker(fleet, "start", "--on", "any", "--", "true")
    assert placed.code == 0, placed.err


async def test_list_names_the_hosts_that_do_not_answer(fleet: Fleet) -> None:
    """A registered host that does not answer (stopped, not dead: its lease lives on) is named
    on stderr; the others' jobs are listed and the command succeeds."""
    await fleet.start("host-a", "zone=a")
    b = await fleet.start("host-b", "zone=b", "--fleet-ttl", "60")
    assert (await worker(fleet, "start", "--on", "zone=a", "--", "true")).code == 0
    b.proc.send_signal(signal.SIGSTOP)
    try:
        listing = await worker(fleet, "--timeout", "2", "list")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert listing.code == 0, listing.err
    assert [line.split()[0] for line in listing.out.splitlines()[1:]] == ["host-a"]
    assert "host host-b did not answer" in listing.err


async def test_jobs_cannot_read_the_ca_key_above_a_host_directory(fleet: Fleet) -> None:
    """A host run from PKI/hosts/NAME (``certs host``) hides PKI/ca-key.pem from its jobs, as a
    daemon run from PKI hides the one beside its key."""
    await fleet.start("host-a", "zone=a")
    ca_key = fleet.pki / "ca-key.pem"
    assert b"PRIVATE KEY" in ca_key.read_bytes()
    result = await worker(fleet, "run", "--on", "all", "--", "cat", str(ca_key))
    assert "PRIVATE KEY" not in result.out
    assert result.code != 0, result.out


async def test_a_short_job_gives_its_slot_back_at_the_next_tick(fleet: Fleet) -> None:
    """A job that starts and ends between two ticks of its host still frees its slot at the
    next one (within TTL/3 s; the bound here is below the host's 15 s periodic reconcile)."""
    await fleet.start("host-a", "zone=a", "--capacity", "1")
    for _ in range(3):
        placed = await worker(fleet, "start", "--on", "any", "--", "true")
        assert placed.code == 0, placed.err
        assert (await worker(fleet, "wait", placed.out.strip())).code == 0
        await poll(lambda: _empty(fleet), TTL + 2, "the ended job's slot to be released")
