"""The store's pool of empty files (jobworker.storepool) when things go wrong: what it follows,
reuses, gives up and reports (cases found by a review of the pool)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from jobworker.spec import JobSpec, JobState, JobStatus
from jobworker.store import Store

SPEC = JobSpec(argv=("true",), owner="alice")


def _running(job_id: str) -> JobStatus:
    return JobStatus(
        id=job_id,
        state=JobState.RUNNING,
        argv=SPEC.argv,
        owner="alice",
        pid=0,
        started_at=datetime.now(UTC),
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "state")
    s.setup()
    s._writer.submit(int).result()  # the first refill is done
    try:
        yield s
    finally:
        s.close()


def test_a_symlink_left_in_the_pool_is_removed_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    pool = tmp_path / "state" / "pool"
    pool.mkdir(parents=True)
    os.symlink(victim, pool / "x")
    s = Store(tmp_path / "state")
    s.setup()
    try:
        s._writer.submit(int).result()
        files = s.create("j1")
        os.write(files.out, b"job output")
        files.close()
    finally:
        s.close()
    assert victim.read_bytes() == b"precious"
    assert not (pool / "x").is_symlink()


def test_what_an_earlier_store_left_in_the_pool_is_not_reused(tmp_path: Path) -> None:
    """A crash between the link under a job's name and the pool's unlink: the job's log is
    also a pool name; adopting the pool must not hand that inode to another job."""
    pool = tmp_path / "state" / "pool"
    for s in (Store(tmp_path / "state"),):
        s.setup()
        s._writer.submit(int).result()
        s.close()
    log = tmp_path / "state" / "jobs" / "j1.log"
    log.write_bytes(b"job one output")
    os.link(log, pool / "crashed")
    s = Store(tmp_path / "state")
    s.setup()
    try:
        s._writer.submit(int).result()
        assert not (pool / "crashed").exists()
        assert log.stat().st_nlink == 1
        for i in range(40):
            s.create(f"k{i}").close()
        assert log.read_bytes() == b"job one output"
        for i in range(40, 80):
            s.create(f"k{i}").close()
        assert log.read_bytes() == b"job one output"
    finally:
        s.close()


def test_a_hard_link_to_an_old_record_keeps_what_it_had(store: Store, tmp_path: Path) -> None:
    """A hard-link backup of the state directory (rsnapshot, cp -al) shares the start record's
    inode: a job's end must not empty it, nor may a later job's output land in it."""
    store.create("j1").close()
    store.save(SPEC, _running("j1"), new=True)
    backup = tmp_path / "backup.json"
    os.link(store.record_path("j1"), backup)
    ended = replace(_running("j1"), state=JobState.EXITED, exit_code=0, ended_at=datetime.now(UTC))
    store.save(SPEC, ended)
    for i in range(2, 40):
        files = store.create(f"j{i}")
        os.write(files.out, f"output of j{i}\n".encode())
        files.close()
    assert b'"running"' in backup.read_bytes()


def test_one_failed_link_does_not_give_the_pool_up(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from link() is this start's problem (its own create reports it), not a file
    system without hard links: the pool stays."""
    real_link = os.link
    failed: list[object] = []

    def full_once(src: object, dst: object, **kwargs: object) -> None:
        if not failed:
            failed.append(dst)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_link(src, dst, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "link", full_once)
    store.create("j1").close()
    store.create("j2").close()
    store._writer.submit(int).result()
    assert failed and os.listdir(store.pool)
    assert store.log_path("j1").exists() and store.log_path("j2").exists()


def test_a_pool_that_cannot_be_refilled_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "mknod", full)
    s = Store(tmp_path / "state")
    s.setup()
    caplog.set_level(logging.WARNING, logger="jobworker.store")
    try:
        for i in range(20):
            s.create(f"j{i}").close()  # created without the pool
            s._writer.submit(int).result()
    finally:
        s.close()
    warnings = [r for r in caplog.records if "cannot be refilled" in r.getMessage()]
    assert len(warnings) == 1
    assert all(s.log_path(f"j{i}").exists() for i in range(20))


def test_a_log_from_the_pool_is_dated_by_its_start_not_by_the_refill(store: Store) -> None:
    """Recovery dates a log whose record is lost by the log's mtime: a pool file made long
    before the job must not lend it its own."""
    for name in os.listdir(store.pool):
        os.utime(store.pool / name, (0, 0))
    store.create("j1").close()
    age = datetime.now(UTC).timestamp() - store.log_path("j1").stat().st_mtime
    assert 0 <= age < 60
