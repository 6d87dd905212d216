"""List paging through the daemon: pages cover every job once, oldest first; page sizes have
a default and a cap, a negative one and a token the daemon did not give are INVALID_ARGUMENT;
a token from another caller's listing shows nothing the caller may not see; jobs started or
removed between pages neither repeat nor hide others; ``worker list`` fetches every page; and
the manager answers a page without looking at the other jobs."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from jobworker import InvalidArgument
from jobworker.client import Client
from jobworker.jobtable import JobTable, page_key
from jobworker.runtime import Job
from jobworker.server import service
from jobworker.server.daemon import Daemon
from jobworker.spec import JobSpec, JobState, JobStatus
from tests.integration import daemon_harness as harness
from tests.integration import test_cli

pki_dir, daemon, connect = harness.pki_dir, harness.daemon, harness.connect
Connect = harness.Connect
W, env = test_cli.W, test_cli.env  # `worker` in a thread against the daemon


async def ended(client: Client, n: int) -> list[str]:
    """Start ``n`` quick jobs one after another, wait for their end; their ids in order."""
    ids = []
    for _ in range(n):
        job = await client.start(["true"])
        ids.append(job.id)
    for i in ids:
        await client.wait(i)
    return ids


async def pages(client: Client, size: int, all: bool = False) -> list[list[JobStatus]]:
    out: list[list[JobStatus]] = []
    token = ""
    while True:
        page, token = await client.list_page(all=all, page_size=size, page_token=token)
        out.append(page)
        if not token:
            return out


async def test_pages_cover_every_job_once_oldest_first(daemon: Daemon, connect: Connect) -> None:
    alice, bob, root = connect("alice"), connect("bob"), connect("root")
    order: list[str] = []
    mine: list[str] = []
    for _ in range(4):
        ids = await ended(alice, 2)
        order += ids + await ended(bob, 1)
        mine += ids
    got = await pages(root, 5, all=True)
    assert [len(p) for p in got] == [5, 5, 2]
    assert [s.id for p in got for s in p] == order
    assert [s.id for s in await connect("vera").list(all=True)] == order  # a viewer: everyone's
    got = await pages(alice, 3)
    assert [len(p) for p in got] == [3, 3, 2]
    assert [s.id for p in got for s in p] == mine
    # A user's --all is still only its own jobs; exactly one page of them: no empty last page.
    got = await pages(bob, 4, all=True)
    assert [[s.owner for s in p] for p in got] == [["bob"] * 4]
    assert await alice.list(all=True) == [s for p in await pages(alice, 1) for s in p]


async def test_page_size_default_and_cap(
    daemon: Daemon, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "DEFAULT_PAGE_SIZE", 2)
    monkeypatch.setattr(service, "MAX_PAGE_SIZE", 3)
    alice = connect("alice")
    ids = await ended(alice, 4)
    page, token = await alice.list_page()  # 0: the default
    assert [s.id for s in page] == ids[:2] and token
    page, token = await alice.list_page(page_size=100, page_token=token)  # capped
    assert [s.id for s in page] == ids[2:] and not token
    page, token = await alice.list_page(page_size=100)
    assert [s.id for s in page] == ids[:3] and token
    assert [s.id for s in await alice.list()] == ids  # list() follows every page


async def test_negative_page_size_is_invalid(daemon: Daemon, connect: Connect) -> None:
    with pytest.raises(InvalidArgument, match=r"^page_size must be 0 \(the default, 500\) or"):
        await connect("alice").list_page(page_size=-1)


@pytest.mark.parametrize(
    "token",
    [
        "not base64 !",
        base64.urlsafe_b64encode(b"\xff\xfe").decode(),
        base64.urlsafe_b64encode(b"2:1:x").decode(),  # another version
        base64.urlsafe_b64encode(b"1:soon:x").decode(),
        base64.urlsafe_b64encode(b"1:5:").decode(),
        base64.urlsafe_b64encode(b"1").decode(),
    ],
)
async def test_a_token_the_daemon_did_not_give_is_invalid(
    daemon: Daemon, connect: Connect, token: str
) -> None:
    with pytest.raises(InvalidArgument) as e:
        await connect("alice").list_page(page_token=token)
    assert str(e.value) == service.BAD_PAGE_TOKEN
    assert "\n" not in str(e.value)


async def test_a_token_from_another_listing_shows_only_what_the_caller_may_see(
    daemon: Daemon, connect: Connect
) -> None:
    alice, bob, root = connect("alice"), connect("bob"), connect("root")
    a1 = await ended(alice, 1)
    b1 = await ended(bob, 1)
    a2 = await ended(alice, 2)
    b2 = await ended(bob, 2)
    # root's page ends at bob's first job: with that token alice and bob go on after it.
    page, token = await root.list_page(all=True, page_size=2)
    assert [s.id for s in page] == a1 + b1 and token
    page, rest = await alice.list_page(all=True, page_token=token)
    assert [s.id for s in page] == a2 and not rest
    page, rest = await bob.list_page(page_token=token)
    assert [s.id for s in page] == b2 and not rest
    # alice's own token, used by bob: his jobs after her first one, never hers.
    _, token = await alice.list_page(page_size=1)
    page, _ = await bob.list_page(all=True, page_token=token)
    assert [s.id for s in page] == b1 + b2


async def test_jobs_started_or_removed_between_pages(daemon: Daemon, connect: Connect) -> None:
    alice = connect("alice")
    ids = await ended(alice, 4)
    page, token = await alice.list_page(page_size=2)
    assert [s.id for s in page] == ids[:2]
    await alice.remove(ids[1])  # the job the token points after
    await alice.remove(ids[2])
    ids += await ended(alice, 1)
    page, token = await alice.list_page(page_size=2, page_token=token)
    assert [s.id for s in page] == [ids[3], ids[4]] and not token


async def test_worker_list_fetches_every_page(
    daemon: Daemon, connect: Connect, W: test_cli.Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "DEFAULT_PAGE_SIZE", 2)
    ids = await ended(connect("alice"), 5)
    result = await W("list", "--json")
    assert result.exit_code == 0, result.stderr
    assert [j["id"] for j in json.loads(result.stdout)] == ids
    result = await W("list")
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ids


def _job(n: int, owner: str, started: datetime) -> Job:
    spec = JobSpec(argv=("true",), owner=owner)
    status = JobStatus(
        id=f"job-{n:06d}",
        state=JobState.EXITED,
        argv=spec.argv,
        owner=owner,
        pid=0,
        started_at=started,
    )
    return Job(spec, status)


def test_a_page_looks_only_at_its_own_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager's index: a page snapshots ``limit`` jobs (+0), whatever the total; order is
    by start time even when jobs arrive out of order (recovery); removal keeps it."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    table = JobTable()
    for n in range(20_000):
        table[f"job-{n:06d}"] = _job(n, "alice" if n % 4 else "bob", t0 + timedelta(seconds=n))
    late = _job(999_999, "bob", t0 - timedelta(days=1))  # recovered, older than all
    table[late.id] = late
    looked: list[str] = []
    snapshot = Job.snapshot

    def counting(self: Job) -> JobStatus:
        looked.append(self.id)
        return snapshot(self)

    monkeypatch.setattr(Job, "snapshot", counting)
    page, after = table.page(None, 3, None)
    assert [s.id for s in page] == [late.id, "job-000000", "job-000001"]
    assert looked == [s.id for s in page]
    looked.clear()
    page, after = table.page(after, 500, "bob")
    assert len(page) == 500 and len(looked) == 500
    assert all(s.owner == "bob" for s in page) and page[0].id == "job-000004"
    assert after == page_key(page[-1])
    del table["job-000004"]
    page, _ = table.page(page_key(table["job-000000"].status), 1, "bob")
    assert [s.id for s in page] == ["job-000008"]
    assert "job-000004" not in [s.id for s in table.page(None, 30_000, None)[0]]
    page, after = table.page((10**20, ""), 5, None)
    assert page == [] and after is None
