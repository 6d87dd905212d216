"""Conversions between the library's values and the v1 wire messages, used by both the service
and the client so the two cannot drift apart. Messages from the wire are validated by the value
types they become (:class:`~jobworker.errors.InvalidArgument` on bad input)."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from google.protobuf.timestamp_pb2 import Timestamp

from jobworker.api.proto import pb
from jobworker.errors import InvalidArgument
from jobworker.limits import IOLimit, Limits
from jobworker.outlog import Chunk, Stream
from jobworker.spec import JobState, JobStatus, Network, TerminalSize, Usage

if TYPE_CHECKING:
    # The readers' module is the daemon's; the client only builds requests from a Query.
    from jobworker.outread import Query

_STATES: dict[JobState, pb.JobState.ValueType] = {
    JobState.RUNNING: pb.JOB_STATE_RUNNING,
    JobState.EXITED: pb.JOB_STATE_EXITED,
    JobState.STOPPED: pb.JOB_STATE_STOPPED,
    JobState.LOST: pb.JOB_STATE_LOST,
}
_STATES_BACK = {v: k for k, v in _STATES.items()}
_NETWORKS: dict[Network, pb.Network.ValueType] = {
    Network.HOST: pb.NETWORK_HOST,
    Network.NONE: pb.NETWORK_NONE,
}
_NETWORKS_BACK = {v: k for k, v in _NETWORKS.items()}


def network_to_pb(network: Network | None) -> pb.Network.ValueType:
    """``None``: unspecified, the daemon's default."""
    return pb.NETWORK_UNSPECIFIED if network is None else _NETWORKS[Network(network)]


def network_from_pb(value: int) -> Network | None:
    if value == pb.NETWORK_UNSPECIFIED:
        return None
    try:
        return _NETWORKS_BACK[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(
            f"network {value} is not one of host ({pb.NETWORK_HOST}), none ({pb.NETWORK_NONE})"
        ) from None


def window_from_pb(msg: pb.WindowSize) -> TerminalSize:
    """A terminal size; 0 (unset) rows or cols take the default (24x80)."""
    default = TerminalSize()
    return TerminalSize(msg.rows or default.rows, msg.cols or default.cols)


def window_to_pb(size: TerminalSize) -> pb.WindowSize:
    return pb.WindowSize(rows=size.rows, cols=size.cols)


def _opt(msg: object, field: str) -> int | None:
    return getattr(msg, field) if msg.HasField(field) else None  # type: ignore[attr-defined]


def limits_to_pb(limits: Limits) -> pb.Limits:
    msg = pb.Limits(
        io=[
            pb.IOLimit(
                device=i.device,
                read_bps=i.read_bps,
                write_bps=i.write_bps,
                read_iops=i.read_iops,
                write_iops=i.write_iops,
            )
            for i in limits.io
        ]
    )
    if limits.cpu is not None:
        msg.cpu = limits.cpu
    if limits.cpu_weight is not None:
        msg.cpu_weight = limits.cpu_weight
    if limits.memory is not None:
        msg.memory = limits.memory
    if limits.pids is not None:
        msg.pids = limits.pids
    return msg


_NO_LIMITS = Limits()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


_LIMITS_SEEN: dict[bytes, Limits] = {}
_LIMITS_SEEN_MAX = 256
"""Limits decoded from the wire, by their bytes. Most jobs of a listing share a handful of limit
sets, and decoding one (with its validation) is most of the cost of a status. Limits values are
immutable, so sharing them is safe; the cache is small and simply stops growing when full."""


def limits_from_pb(msg: pb.Limits) -> Limits:
    """Raises :class:`InvalidArgument` for a value :class:`Limits` does not accept."""
    key = msg.SerializeToString(deterministic=True)
    if not key:
        return _NO_LIMITS
    known = _LIMITS_SEEN.get(key)
    if known is not None:
        return known
    limits = _limits_from_pb(msg)
    if len(_LIMITS_SEEN) < _LIMITS_SEEN_MAX:
        _LIMITS_SEEN[key] = limits
    return limits


def _limits_from_pb(msg: pb.Limits) -> Limits:
    cpu = msg.cpu if msg.HasField("cpu") else None
    if cpu is not None and not math.isfinite(cpu):
        raise InvalidArgument(f"cpu must be a finite number of cores, got {cpu}")
    return Limits(
        cpu=cpu,
        cpu_weight=_opt(msg, "cpu_weight"),
        memory=_opt(msg, "memory"),
        io=tuple(
            IOLimit(
                device=i.device,
                read_bps=_opt(i, "read_bps"),
                write_bps=_opt(i, "write_bps"),
                read_iops=_opt(i, "read_iops"),
                write_iops=_opt(i, "write_iops"),
            )
            for i in msg.io
        ),
        pids=_opt(msg, "pids"),
    )


def _ts(when: datetime) -> Timestamp:
    # As Timestamp.FromDatetime (which is three times slower) for an aware datetime.
    d = when - _EPOCH
    return Timestamp(seconds=d.days * 86400 + d.seconds, nanos=d.microseconds * 1000)


def _usage_to_pb(usage: Usage) -> pb.Usage:
    return pb.Usage(
        cpu_user_usec=usage.cpu_user_usec,
        cpu_system_usec=usage.cpu_system_usec,
        memory_current=usage.memory_current,
        memory_peak=usage.memory_peak,
        io_read_bytes=usage.io_read_bytes,
        io_write_bytes=usage.io_write_bytes,
        nr_throttled=usage.nr_throttled,
        pids_current=usage.pids_current,
    )


def status_to_pb(status: JobStatus) -> pb.JobStatus:
    msg = pb.JobStatus(
        id=status.id,
        state=_STATES[status.state],
        argv=status.argv,
        owner=status.owner,
        pid=status.pid,
        started_at=_ts(status.started_at),
        exit_code=status.exit_code,
        signal=status.signal,
        reason=status.reason,
        oom_killed=status.oom_killed,
        output_bytes=status.output_bytes,
    )
    if status.limits != _NO_LIMITS:  # unset reads as no limits: one message less to parse
        msg.limits.CopyFrom(limits_to_pb(status.limits))
    if status.ended_at is not None:
        msg.ended_at.CopyFrom(_ts(status.ended_at))
    if status.usage is not None:
        msg.usage.CopyFrom(_usage_to_pb(status.usage))
    return msg


def status_from_pb(msg: pb.JobStatus) -> JobStatus:
    """Raises :class:`InvalidArgument` for a state this client does not know."""
    # A List page converts 500 of these: positional arguments and no helper calls, which
    # together take a quarter off (a micro-benchmark of one page, same machine, same minute).
    state = _STATES_BACK.get(msg.state)
    if state is None:
        raise InvalidArgument(f"job {msg.id}: unknown state {msg.state} from the daemon")
    has = msg.HasField
    ts = msg.started_at
    started = _EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)
    ended = None
    if has("ended_at"):
        ts = msg.ended_at
        ended = _EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)
    usage = None
    if has("usage"):
        u = msg.usage
        usage = Usage(
            u.cpu_user_usec,
            u.cpu_system_usec,
            u.memory_current,
            u.memory_peak if u.HasField("memory_peak") else None,
            u.io_read_bytes,
            u.io_write_bytes,
            u.nr_throttled,
            u.pids_current,
        )
    return JobStatus(
        msg.id,
        state,
        tuple(msg.argv),
        msg.owner,
        msg.pid,
        started,
        ended,
        msg.exit_code if has("exit_code") else None,
        msg.signal if has("signal") else None,
        msg.reason,
        msg.oom_killed,
        limits_from_pb(msg.limits) if has("limits") else _NO_LIMITS,
        usage,
        msg.output_bytes,
    )


# -- Logs ---------------------------------------------------------------------------------------

_STREAMS: dict[Stream, pb.Stream.ValueType] = {
    Stream.STDOUT: pb.STREAM_STDOUT,
    Stream.STDERR: pb.STREAM_STDERR,
}
_STREAMS_BACK = {v: k for k, v in _STREAMS.items()}


def stream_to_pb(stream: Stream | None) -> pb.Stream.ValueType:
    """``None``: unspecified (in a request: both streams, merged)."""
    return pb.STREAM_UNSPECIFIED if stream is None else _STREAMS[stream]


def stream_from_pb(value: int) -> Stream | None:
    if value == pb.STREAM_UNSPECIFIED:
        return None
    try:
        return _STREAMS_BACK[value]  # type: ignore[index]
    except KeyError:
        raise InvalidArgument(
            f"stream {value} is not one of STDOUT ({pb.STREAM_STDOUT}), STDERR "
            f"({pb.STREAM_STDERR}) or unset (both)"
        ) from None


def logs_request_to_pb(job_id: str, query: Query) -> pb.LogsRequest:
    request = pb.LogsRequest(
        id=job_id,
        follow=query.follow,
        offset=query.offset,
        stream=stream_to_pb(query.view),
        tail_lines=query.tail,
        split_by_time=query.split,
    )
    if query.since_us is not None:
        seconds, micros = divmod(query.since_us, 1_000_000)
        request.since.seconds, request.since.nanos = seconds, micros * 1000
    return request


def query_from_pb(request: pb.LogsRequest) -> Query:
    """Raises :class:`InvalidArgument` for a stream that is not one."""
    from jobworker.outread import Query

    since = None
    if request.HasField("since"):
        since = request.since.seconds * 1_000_000 + request.since.nanos // 1000
    return Query(
        view=stream_from_pb(request.stream),
        offset=request.offset,
        follow=request.follow,
        tail=request.tail_lines if request.HasField("tail_lines") else None,
        since_us=since,
        split=request.split_by_time,
    )


def chunk_to_pb(chunk: Chunk) -> pb.LogsChunk:
    seconds, micros = divmod(chunk.time_us, 1_000_000)
    msg = pb.LogsChunk(offset=chunk.offset, data=chunk.data, stream=_STREAMS[chunk.stream])
    msg.time.seconds, msg.time.nanos = seconds, micros * 1000
    return msg


def chunk_from_pb(msg: pb.LogsChunk) -> Chunk:
    stream = _STREAMS_BACK.get(msg.stream, Stream.STDOUT)
    return Chunk(
        msg.offset, msg.data, stream, msg.time.seconds * 1_000_000 + msg.time.nanos // 1000
    )
