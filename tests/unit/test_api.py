"""The wire layer without a network: the error table and the value <-> message conversions."""

from __future__ import annotations

# isort: off
from jobworker.server import tls13  # noqa: F401 - before grpc: no TLS 1.2 in this process
import grpc

# isort: on
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jobworker.api import convert
from jobworker.api.convert import limits_from_pb, limits_to_pb, status_from_pb, status_to_pb
from jobworker.api.errors import ERROR_CODES, code_for, error_for
from jobworker.api.proto import pb
from jobworker.errors import (
    HostError,
    InvalidArgument,
    JobNotFound,
    JobworkerError,
    LimitUnavailable,
    PermissionDenied,
    RemoteError,
    ShuttingDown,
    SpawnError,
    Unauthenticated,
)
from jobworker.limits import IOLimit, Limits
from jobworker.outlog import Chunk, Stream
from jobworker.outread import Query
from jobworker.spec import JobState, JobStatus, Usage

T0 = datetime(2030, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidArgument("x"), "INVALID_ARGUMENT"),
        (SpawnError("x"), "INVALID_ARGUMENT"),
        (JobNotFound("j"), "NOT_FOUND"),
        (PermissionDenied("x"), "PERMISSION_DENIED"),
        (Unauthenticated("x"), "UNAUTHENTICATED"),
        (LimitUnavailable("x"), "FAILED_PRECONDITION"),
        (ShuttingDown("x"), "UNAVAILABLE"),
        (HostError("x"), "INTERNAL"),
        (JobworkerError("x"), "INTERNAL"),
    ],
)
def test_code_for(error: JobworkerError, code: str) -> None:
    assert code_for(error) == code


def test_every_code_is_a_grpc_status_code() -> None:
    for _, code in ERROR_CODES:
        assert grpc.StatusCode[code].name == code


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("INVALID_ARGUMENT", InvalidArgument),
        ("NOT_FOUND", JobNotFound),
        ("PERMISSION_DENIED", PermissionDenied),
        ("UNAUTHENTICATED", Unauthenticated),
        ("FAILED_PRECONDITION", LimitUnavailable),
        ("UNAVAILABLE", ShuttingDown),
        ("INTERNAL", HostError),
    ],
)
def test_error_for_round_trips_the_table(code: str, cls: type[JobworkerError]) -> None:
    error = error_for(code, "the message", "job-1")
    assert type(error) is cls
    assert str(error) == "the message"
    assert code_for(error) == code


def test_not_found_keeps_the_job_id() -> None:
    error = error_for("NOT_FOUND", "no job with id 'j'", "j")
    assert isinstance(error, JobNotFound) and error.job_id == "j"


def test_codes_outside_the_table() -> None:
    error = error_for("DEADLINE_EXCEEDED", "Deadline Exceeded")
    assert isinstance(error, RemoteError)
    assert error.code == "DEADLINE_EXCEEDED"
    assert str(error) == "Deadline Exceeded (DEADLINE_EXCEEDED)"


LIMITS = [
    Limits(),
    Limits(cpu=0.5),
    Limits(cpu_weight=1, memory=1 << 20, pids=1),
    Limits(io=(IOLimit("8:0", read_bps=1), IOLimit("/dev/sda", write_iops=7, write_bps=9))),
]


@pytest.mark.parametrize("limits", LIMITS)
def test_limits_round_trip(limits: Limits) -> None:
    assert limits_from_pb(limits_to_pb(limits)) == limits


def test_unset_limits_stay_unset() -> None:
    msg = limits_to_pb(Limits(memory=1 << 30))
    assert not msg.HasField("cpu") and not msg.HasField("pids") and msg.HasField("memory")


@pytest.mark.parametrize(
    "msg",
    [
        pb.Limits(cpu=float("inf")),
        pb.Limits(cpu=0),
        pb.Limits(memory=1 << 63),
        pb.Limits(io=[pb.IOLimit(device="8:0")]),
        pb.Limits(io=[pb.IOLimit(device="8:0", read_bps=1), pb.IOLimit(device="8:0", read_bps=2)]),
    ],
)
def test_bad_limits_from_the_wire(msg: pb.Limits) -> None:
    # Twice: decoded limits are remembered by their bytes, refused ones must never be.
    for _ in range(2):
        with pytest.raises(InvalidArgument):
            limits_from_pb(msg)


def test_limits_decoded_once_are_shared_and_equal_to_a_fresh_decode() -> None:
    wire = limits_to_pb(Limits(memory=96 << 20, pids=33)).SerializeToString()
    first, second = (limits_from_pb(pb.Limits.FromString(wire)) for _ in range(2))
    assert first is second
    assert first == Limits(memory=96 << 20, pids=33)


@given(
    seconds=st.integers(min_value=-(10**10), max_value=10**10),
    micros=st.integers(min_value=0, max_value=999_999),
)
def test_timestamps_from_the_wire_keep_every_microsecond(seconds: int, micros: int) -> None:
    status = replace(
        STATUSES[0], started_at=datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)
    )
    assert status_from_pb(status_to_pb(status)).started_at == status.started_at


STATUSES = [
    JobStatus(
        id="a", state=JobState.RUNNING, argv=("sleep", "1"), owner="alice", pid=7, started_at=T0
    ),
    JobStatus(
        id="b",
        state=JobState.EXITED,
        argv=("x",),
        owner="bob",
        pid=8,
        started_at=T0,
        ended_at=T0 + timedelta(seconds=3),
        exit_code=0,
        limits=Limits(memory=64 << 20),
        usage=Usage(cpu_user_usec=1, memory_peak=5, pids_current=0),
        output_bytes=99,
    ),
    JobStatus(
        id="c",
        state=JobState.STOPPED,
        argv=("x",),
        owner="bob",
        pid=9,
        started_at=T0,
        ended_at=T0,
        signal=15,
        reason="stopped by root",
        oom_killed=True,
        usage=Usage(memory_peak=None),
    ),
    JobStatus(
        id="d",
        state=JobState.LOST,
        argv=("x",),
        owner="o",
        pid=1,
        started_at=T0,
        ended_at=T0,
        reason="lost",
    ),
]


@pytest.mark.parametrize("status", STATUSES, ids=[s.state.value for s in STATUSES])
def test_status_round_trip(status: JobStatus) -> None:
    assert status_from_pb(status_to_pb(status)) == status


def test_exit_code_zero_is_distinct_from_unset() -> None:
    assert status_to_pb(STATUSES[1]).HasField("exit_code")
    assert not status_to_pb(STATUSES[0]).HasField("exit_code")
    assert not status_to_pb(STATUSES[0]).HasField("ended_at")


def test_unknown_state_from_the_wire() -> None:
    msg = status_to_pb(STATUSES[0])
    msg.state = pb.JOB_STATE_UNSPECIFIED
    with pytest.raises(InvalidArgument, match="unknown state"):
        status_from_pb(msg)


def test_network_round_trips_and_unknown_values_are_refused() -> None:
    from jobworker.api.convert import network_from_pb, network_to_pb
    from jobworker.spec import Network

    for network in (None, Network.HOST, Network.NONE):
        assert network_from_pb(network_to_pb(network)) == network
    with pytest.raises(InvalidArgument, match="not one of host"):
        network_from_pb(7)


def test_the_service_serves_every_method_of_the_proto() -> None:
    from jobworker.server.service import _METHODS

    service = pb.DESCRIPTOR.services_by_name["JobWorker"]
    assert {m.name for m in service.methods} == {name for name, _, _ in _METHODS}


def _listed(i: int, state: JobState = JobState.EXITED, output: int = 0) -> JobStatus:
    started = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(milliseconds=i)
    return JobStatus(
        id=f"job-{i}",
        state=state,
        argv=("true", str(i)),
        owner="alice",
        pid=1000 + i,
        started_at=started,
        ended_at=None if state is JobState.RUNNING else started + timedelta(microseconds=7),
        exit_code=None if state is JobState.RUNNING else i % 3,
        output_bytes=output,
    )


def test_a_listing_encodes_each_ended_job_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A page is its jobs' bytes from their first listing, parsed back as the same statuses:
    with 10 000 ended jobs listed twice, the second pass converts none (a bounded LRU of
    conversions misses every time the listing is larger than it)."""
    from jobworker.server import listing

    conversions = 0
    real = convert.status_to_pb

    def counted(status: JobStatus) -> pb.JobStatus:
        nonlocal conversions
        conversions += 1
        return real(status)

    monkeypatch.setattr(convert, "status_to_pb", counted)
    jobs = [_listed(i) for i in range(10_000)]
    pages = listing.Listing(known=lambda job_id: True)
    per_pass = []
    for _ in range(2):
        conversions = 0
        for start in range(0, len(jobs), 500):
            page = jobs[start : start + 500]
            response = pages.response(page, next_page_token=f"after-{start}")
            assert [status_from_pb(m) for m in response.jobs] == page
            assert response.next_page_token == f"after-{start}"
        per_pass.append(conversions)
    assert per_pass == [10_000, 0]
    assert pages.response([]) == pb.ListResponse()


def test_a_listing_follows_a_running_job_and_its_end() -> None:
    from jobworker.server.listing import Listing

    pages = Listing(known=lambda job_id: True)
    for status in (
        _listed(1, JobState.RUNNING, output=0),
        _listed(1, JobState.RUNNING, output=0),
        _listed(1, JobState.RUNNING, output=4096),
        _listed(1, JobState.EXITED, output=5000),
    ):
        (msg,) = pages.response([status]).jobs
        assert status_from_pb(msg) == status


def test_a_listing_forgets_jobs_that_have_gone() -> None:
    """Jobs removed by retention or rm must not stay in the listing for ever: the entries of
    jobs the daemon no longer has are swept once the table has doubled."""
    from jobworker.server.listing import KEPT_AT_LEAST, Listing

    live: set[str] = set()
    pages = Listing(known=live.__contains__)
    n = 0
    for _ in range(10):  # 10 rounds of churn: list 3000 new jobs, then retention removes them
        batch = [_listed(n + i) for i in range(3000)]
        n += len(batch)
        live.update(s.id for s in batch)
        pages.response(batch)
        live.difference_update(s.id for s in batch[:2500])
        assert len(pages) <= max(KEPT_AT_LEAST, 2 * len(live)) + len(batch)
    assert len(pages) <= 2 * max(KEPT_AT_LEAST, len(live))
    still = [_listed(i) for i in range(n) if f"job-{i}" in live]
    assert all(s.id in pages for s in still)
    assert [status_from_pb(m) for m in pages.response(still).jobs] == still


def test_logs_queries_and_chunks_round_trip() -> None:
    for query in (
        Query(),
        Query(view=Stream.STDERR, offset=7, follow=True, tail=0, since_us=1_796_000_000_123_456),
        Query(view=Stream.STDOUT, tail=10, split=True),
    ):
        assert convert.query_from_pb(convert.logs_request_to_pb("j", query)) == query
    chunk = Chunk(12, b"\0\xff", Stream.STDERR, 1_796_000_000_654_321)
    assert convert.chunk_from_pb(convert.chunk_to_pb(chunk)) == chunk


def test_a_stream_outside_the_enum_is_invalid() -> None:
    with pytest.raises(InvalidArgument, match="stream 9 is not one of STDOUT"):
        convert.query_from_pb(pb.LogsRequest(id="j", stream=9))  # type: ignore[arg-type]
