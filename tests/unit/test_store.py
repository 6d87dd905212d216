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
    fd = store.create("j1")
    import os

    os.close(fd)
    assert store.log_path("j1").stat().st_mode & 0o777 == 0o600
    store.save(spec, status)
    assert [(s, st) for s, st in store.load_all()] == [(spec, status)]


def test_directory_without_record_is_discarded(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.setup()
    import os

    os.close(store.create("half"))
    assert list(store.load_all()) == []
    assert not store.job_dir("half").exists()
