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


async def test_the_list_conversion_cache_is_bounded() -> None:
    """Jobs removed by retention or rm must not stay in the service's List cache for ever."""
    from datetime import UTC, datetime

    from jobworker.server import service as service_module
    from jobworker.spec import JobState, JobStatus

    servicer = service_module.JobWorkerService(manager=None)  # type: ignore[arg-type]
    for i in range(service_module.LISTED_CACHE + 500):
        status = JobStatus(
            id=f"job-{i}",
            state=JobState.EXITED,
            argv=("true",),
            owner="alice",
            pid=1,
            started_at=datetime.now(UTC),
        )
        assert servicer._status_pb(status).id == status.id
    assert len(servicer._listed) == service_module.LISTED_CACHE
    assert "job-0" not in servicer._listed and f"job-{service_module.LISTED_CACHE + 499}" in (
        servicer._listed
    )


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
