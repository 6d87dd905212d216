import asyncio
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from jobworker.errors import HostError
from jobworker.limits import IOLimit, Limits
from jobworker.spec import JobSpec, JobState, JobStatus, Usage
from jobworker.store import UNKNOWN_COMMAND, Store, spec_to_dict, status_to_dict
from jobworker.storepool import POOL_SIZE


def test_record_round_trip(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.setup()
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    limits = Limits(cpu=0.5, memory=1 << 20, io=(IOLimit("8:0", write_bps=1000),), pids=10)
    spec = JobSpec(argv=("echo", "hé"), env={"A": "b"}, owner="alice", limits=limits)
    status = JobStatus(
        id="j1",
        state=JobState.EXITED,
        argv=spec.argv,
        owner="alice",
        pid=42,
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        ended_at=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
        exit_code=3,
        limits=limits,
        usage=Usage(cpu_user_usec=5, memory_peak=10),
        output_bytes=7,
    )
    store.create("j1").close()
    assert store.log_path("j1").stat().st_mode & 0o777 == 0o600
    store.save(spec, replace(status, state=JobState.RUNNING), new=True)
    store.save(spec, status)
    assert not (store.jobs / "j1.json.tmp").exists()
    assert store.record_path("j1").stat().st_mode & 0o777 == 0o600
    assert [(s, st) for s, st in store.load_all()] == [(spec, status)]


def make_store(root: Path, fsync: Callable[[int], None] | None = None) -> Iterator[Store]:
    store = Store(root) if fsync is None else Store(root, fsync=fsync)
    store.setup()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    yield from make_store(tmp_path / "state")


def ended(job_id: str, spec: JobSpec) -> JobStatus:
    return JobStatus(
        id=job_id,
        state=JobState.EXITED,
        argv=spec.argv,
        owner=spec.owner,
        pid=42,
        started_at=datetime(2026, 1, 1, tzinfo=UTC),
        ended_at=datetime(2026, 1, 1, 0, 0, 1, tzinfo=UTC),
        exit_code=0,
        output_bytes=5,
    )


def test_final_record_is_fsynced_with_log_and_directory(tmp_path: Path) -> None:
    synced: list[tuple[str, str]] = []  # (path the fd is open on, record text at that moment)
    record = tmp_path / "state" / "jobs" / "j1.json"

    def fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, record.read_text() if record.exists() else ""))
        os.fsync(fd)

    for store in make_store(tmp_path / "state", fsync):
        assert store.record_path("j1") == record
        spec = JobSpec(argv=("echo", "hello"), owner="alice")
        files = store.create("j1")
        os.write(files.out, b"hello")
        os.write(files.err, b"oops")
        os.write(files.idx, b"index")
        files.close()
        start = replace(ended("j1", spec), state=JobState.RUNNING, ended_at=None)
        store.save(spec, start, new=True)
        assert synced == []  # the start record is not made durable
        store.save(spec, ended("j1", spec))
        start_text = json.dumps({"version": 1, "spec": spec_to_dict(spec), **status_to_dict(start)})
        assert synced == [
            (str(store.log_path("j1")), start_text),
            (str(store.jobs / "j1.err"), start_text),
            (str(store.jobs / "j1.idx"), start_text),
            (str(store.jobs / "j1.json.tmp"), start_text),  # new record, before its rename
            (str(store.jobs), store.record_path("j1").read_text()),  # the rename, after it
        ]
        assert json.loads(synced[-1][1])["state"] == "exited"


def test_log_without_record_is_lost_and_kept(store: Store) -> None:
    files = store.create("half")
    os.write(files.out, b"out")
    files.close()
    [(spec, status)] = store.load_all()
    assert store.log_path("half").read_bytes() == b"out"
    assert (status.id, status.state, status.output_bytes) == ("half", JobState.LOST, 3)
    assert status.reason.startswith("the job's record is missing")
    assert spec.argv == status.argv == (UNKNOWN_COMMAND,)


def test_start_record_cut_short_is_lost_with_its_log_kept(store: Store) -> None:
    files = store.create("cut")
    os.write(files.out, b"12345678")
    files.close()
    store.record_path("cut").write_text('{"version": 1, "spec": {"argv": ["sl')
    (store.jobs / "other.json.tmp").write_text("{")
    [(spec, status)] = store.load_all()
    assert (status.id, status.state, status.output_bytes) == ("cut", JobState.LOST, 8)
    assert "record is unreadable" in status.reason and "output is kept" in status.reason
    assert status.ended_at is not None and status.pid == 0
    assert sorted(os.listdir(store.jobs)) == ["cut.err", "cut.idx", "cut.json", "cut.log"]
    assert store.log_path("cut").read_bytes() == b"12345678"
    # The lost record replaced the bad one: the next restart reads the same job.
    assert list(store.load_all()) == [(spec, status)]


def test_unreadable_record_keeps_what_it_still_tells(store: Store) -> None:
    store.create("j2").close()
    store.record_path("j2").write_text(
        json.dumps({"owner": "bob", "argv": ["sleep", "9"], "started_at": "2026-01-01T00:00"})
    )
    [(spec, status)] = store.load_all()
    assert (spec.owner, spec.argv) == ("bob", ("sleep", "9"))
    assert (status.owner, status.argv, status.state) == ("bob", ("sleep", "9"), JobState.LOST)
    assert status.started_at == datetime(2026, 1, 1)
    assert "KeyError" in status.reason


def test_record_that_cannot_be_read_at_all(store: Store) -> None:
    store.create("j3").close()
    store.record_path("j3").mkdir()  # reading it fails with EISDIR; nothing can replace it
    [(_, status)] = store.load_all()
    assert status.state is JobState.LOST and "could not be read" in status.reason
    assert store.log_path("j3").exists()


async def _save_six(store: Store, synced: list[str], busy: Any, release: Any) -> list[int]:
    """Six final records: the first alone, five asked while the writer is inside the first;
    the number of syncs done when each save returned."""
    spec = JobSpec(argv=("true",), owner="alice")
    done_at: list[int] = []

    async def save(job_id: str) -> None:
        files = store.create(job_id)
        os.write(files.out, b"output")
        files.close()
        await store.save_async(spec, ended(job_id, spec))
        done_at.append(len(synced))

    first = asyncio.ensure_future(save("j0"))
    await asyncio.to_thread(busy.wait, 10)  # the writer is inside the first save
    rest = [asyncio.ensure_future(save(f"j{i}")) for i in range(1, 6)]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *rest)
    return done_at


def test_final_records_written_together_share_one_directory_sync(tmp_path: Path) -> None:
    """Ends that queue up while the writer is busy are made durable as one batch: each record
    and log is synced, the directory once for them all, and no save returns before the
    directory sync that follows its rename."""
    synced: list[str] = []
    busy = threading.Event()
    release = threading.Event()

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        if not busy.is_set():
            busy.set()
            release.wait(10)
        os.fsync(fd)

    for store in make_store(tmp_path / "state", fsync):
        done_at = asyncio.run(_save_six(store, synced, busy, release))
        dir_syncs = [i for i, path in enumerate(synced) if path == str(store.jobs)]
        assert len(dir_syncs) == 2  # the first save alone, then the five queued behind it
        assert all(n > dir_syncs[0] for n in done_at)
        assert sorted(done_at)[1:] == [dir_syncs[1] + 1] * 5
        for job_id in (f"j{i}" for i in range(6)):
            assert json.loads(store.record_path(job_id).read_text())["state"] == "exited"
            for path in (store.log_path(job_id), store.jobs / f"{job_id}.json.tmp"):
                assert str(path) in synced


def test_empty_output_files_have_nothing_to_sync(tmp_path: Path) -> None:
    """A job that wrote nothing on a stream: its empty file has no data to make durable (that
    it exists, the directory sync does), so only the files with data, the record and the
    directory are synced."""
    synced: list[str] = []

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        os.fsync(fd)

    for store in make_store(tmp_path / "state", fsync):
        spec = JobSpec(argv=("true",), owner="alice")
        store.create("quiet").close()
        files = store.create("talks")
        os.write(files.out, b"hello")
        files.close()
        for job_id in ("quiet", "talks"):
            store.save(spec, ended(job_id, spec))
        assert synced == [
            str(store.jobs / "quiet.json.tmp"),
            str(store.jobs),
            str(store.log_path("talks")),
            str(store.jobs / "talks.json.tmp"),
            str(store.jobs),
        ]
        assert [status.id for _, status in sorted(store.load_all(), key=lambda r: r[1].id)] == [
            "quiet",
            "talks",
        ]


def test_a_start_takes_its_files_from_the_pool_the_writer_refills(tmp_path: Path) -> None:
    """The logs, the index and the start record are the pool's empty files linked under the
    job's names (no file is created on the start's path), the pool is refilled by the writer
    thread, and what a crash leaves in it is removed by the next store and made anew."""
    for store in make_store(tmp_path / "state"):
        store._writer.submit(int).result()  # the first refill is done
        pooled = {os.stat(store.pool / name).st_ino for name in os.listdir(store.pool)}
        assert len(pooled) == POOL_SIZE
        spec = JobSpec(argv=("true",), owner="alice")
        store.create("j1").close()
        store.save(spec, replace(ended("j1", spec), state=JobState.RUNNING), new=True)
        logs = store.log_paths("j1")
        paths = [logs.out, logs.err, logs.idx, store.record_path("j1")]
        taken = {os.stat(path).st_ino for path in paths}
        assert taken <= pooled
        assert all(os.stat(path).st_nlink == 1 for path in paths)
        assert all(os.stat(path).st_mode & 0o777 == 0o600 for path in paths)
        store._writer.submit(int).result()
        left = {os.stat(store.pool / name).st_ino for name in os.listdir(store.pool)}
        assert not left & taken
        old = set(os.listdir(store.pool))
        (store.pool / sorted(old)[0]).write_bytes(b"cut short")
    for store in make_store(tmp_path / "state"):
        store._writer.submit(int).result()
        kept = sorted(os.listdir(store.pool))
        assert len(kept) == POOL_SIZE and not old & set(kept)
        assert all(os.stat(store.pool / n).st_size == 0 for n in kept)
        with pytest.raises(HostError, match="cannot create the job's log"):
            store.create("j1")  # it exists: as O_EXCL, and the pool keeps its file
        assert sorted(os.listdir(store.pool)) == kept


def test_a_file_system_without_hard_links_gives_the_pool_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a pool file cannot be linked under a job's name, the start creates its files, and
    the pool is given up and emptied: not refilled, its files not left to pile up."""
    for store in make_store(tmp_path / "state"):
        store._writer.submit(int).result()  # the first refill is done
        assert len(os.listdir(store.pool)) == POOL_SIZE

        def no_links(src: object, dst: object, **kwargs: object) -> None:
            raise PermissionError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", no_links)
        for job_id in ("j1", "j2", "j3", "j4", "j5"):
            store.create(job_id).close()
        store._writer.submit(int).result()
        assert os.listdir(store.pool) == []
        assert all(store.log_path(j).exists() for j in ("j1", "j2", "j3", "j4", "j5"))
