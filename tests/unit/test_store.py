import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from jobworker.limits import IOLimit, Limits
from jobworker.spec import JobSpec, JobState, JobStatus, Usage
from jobworker.store import Store


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
    os.close(store.create("j1"))
    assert store.log_path("j1").stat().st_mode & 0o777 == 0o600
    store.save(spec, replace(status, state=JobState.RUNNING), new=True)
    store.save(spec, status)
    assert not (store.jobs / "j1.json.tmp").exists()
    assert store.record_path("j1").stat().st_mode & 0o777 == 0o600
    assert [(s, st) for s, st in store.load_all()] == [(spec, status)]


def test_log_without_record_is_discarded(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.setup()
    os.close(store.create("half"))
    assert list(store.load_all()) == []
    assert not store.log_path("half").exists()


def test_start_record_cut_short_is_discarded(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.setup()
    os.close(store.create("cut"))
    store.record_path("cut").write_text('{"version": 1, "spec": {"argv": ["sl')
    (store.jobs / "other.json.tmp").write_text("{")
    assert list(store.load_all()) == []
    assert os.listdir(store.jobs) == []
