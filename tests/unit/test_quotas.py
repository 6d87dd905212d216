"""The quota arithmetic with an injected clock and fd counts: the start bucket's burst and
refill, running slots, stream slots given back on every way out, the fd reserve whoever asks,
and configuration refused with the flag's name."""

from __future__ import annotations

import pytest

from jobworker.errors import InvalidArgument, ResourceExhausted
from jobworker.server import quotas as q
from jobworker.server.quotas import Quotas


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_start_bucket_bursts_then_refills_at_the_rate() -> None:
    clock = Clock()
    quotas = Quotas(max_starts_per_second=2, clock=clock)
    quotas.take_start("alice")
    quotas.take_start("alice")  # the burst: max(1, rate)
    with pytest.raises(
        ResourceExhausted,
        match=r"^alice is starting jobs faster than --max-starts-per-second-per-user 2 allows; "
        r"retry in 0.5 s$",
    ):
        quotas.take_start("alice")
    quotas.take_start("bob")  # per identity
    clock.now += 0.25
    with pytest.raises(ResourceExhausted, match=r"retry in 0\.25 s"):
        quotas.take_start("alice")
    clock.now += 0.25
    quotas.take_start("alice")
    clock.now += 3600  # refill stops at the burst
    for _ in range(2):
        quotas.take_start("alice")
    with pytest.raises(ResourceExhausted):
        quotas.take_start("alice")


def test_a_rate_below_one_allows_one_start_at_a_time() -> None:
    clock = Clock()
    quotas = Quotas(max_starts_per_second=0.5, clock=clock)
    quotas.take_start("alice")
    clock.now += 1.6
    with pytest.raises(ResourceExhausted, match=r"retry in 0\.4 s"):
        quotas.take_start("alice")
    clock.now += 0.5
    quotas.take_start("alice")


def test_a_clock_that_goes_back_gives_no_tokens() -> None:
    clock = Clock()
    quotas = Quotas(max_starts_per_second=1, clock=clock)
    quotas.take_start("alice")
    clock.now -= 100
    with pytest.raises(ResourceExhausted):
        quotas.take_start("alice")


def test_idle_buckets_are_forgotten_past_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q, "MAX_BUCKETS", 3)
    clock = Clock()
    quotas = Quotas(max_starts_per_second=1, clock=clock)
    for name in ("a", "b", "c"):
        quotas.take_start(name)
    clock.now += 1  # all full again
    quotas.take_start("d")
    assert set(quotas._buckets) == {"d"}


def test_running_slots() -> None:
    quotas = Quotas(max_running=2)
    assert quotas.take_running("alice") and quotas.take_running("alice")
    with pytest.raises(
        ResourceExhausted,
        match=r"^alice has 2 running jobs, the most --max-running-per-user allows; ",
    ):
        quotas.take_running("alice")
    assert quotas.take_running("bob")
    quotas.release_running("alice")
    assert quotas.running("alice") == 1
    assert quotas.take_running("alice")
    assert not Quotas().take_running("alice")  # off: nothing to give back


def test_stream_slots_are_given_back_on_errors() -> None:
    quotas = Quotas(max_streams=1)
    with quotas.stream("alice", "Logs"):
        with (
            pytest.raises(
                ResourceExhausted,
                match=r"^alice has 1 Logs/Wait streams open, the most --max-streams-per-user "
                r"allows; close one first \(Wait refused\)$",
            ),
            quotas.stream("alice", "Wait"),
        ):
            pass  # pragma: no cover
        with quotas.stream("bob", "Wait"):
            assert quotas.streams("bob") == 1
    with pytest.raises(KeyError), quotas.stream("alice", "Logs"):
        raise KeyError("the call failed")
    assert quotas.streams("alice") == 0 and quotas._streams == {}


@pytest.mark.parametrize(("limit", "reserve"), [(1024, 256), (65536, 6554)])
def test_the_fd_reserve_refuses_whoever_asks(limit: int, reserve: int) -> None:
    fds = [0]
    clock = Clock()
    quotas = Quotas(open_fds=lambda: fds[0], fd_limit=lambda: limit, clock=clock)
    fds[0] = limit - reserve - 1
    with quotas.stream("root", "Logs"):
        # One more stream would be past the reserve; the estimate (one per stream since the
        # last count) is near the reserve, so this one counts afresh.
        fds[0] += 1
        with (
            pytest.raises(
                ResourceExhausted,
                match=rf"^the daemon has {limit - reserve} of its {limit} file descriptors open "
                rf"and keeps {reserve} in reserve, so no stream can be opened now \(Logs refused\)",
            ),
            quotas.stream("admin", "Logs"),
        ):
            pass  # pragma: no cover
    fds[0] -= 5
    with quotas.stream("root", "Logs"):
        pass


def test_far_from_the_reserve_fds_are_counted_at_most_every_tenth_of_a_second() -> None:
    counted = [0]

    def open_fds() -> int:
        counted[0] += 1
        return 10

    clock = Clock()
    quotas = Quotas(open_fds=open_fds, fd_limit=lambda: 100_000, clock=clock)
    for _ in range(50):
        with quotas.stream("alice", "Logs"):
            pass
    assert counted[0] == 1
    clock.now += q.FD_MEASURE_SECONDS
    with quotas.stream("alice", "Logs"):
        pass
    assert counted[0] == 2


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"max_running": 0}, "--max-running-per-user must be at least 1, got 0"),
        ({"max_streams": -1}, "--max-streams-per-user must be at least 1, got -1"),
        ({"max_starts_per_second": 0.0}, "--max-starts-per-second-per-user must be a positive"),
        ({"max_starts_per_second": float("nan")}, "--max-starts-per-second-per-user"),
    ],
)
def test_bad_settings(kwargs: dict[str, float], flag: str) -> None:
    with pytest.raises(InvalidArgument, match=flag):
        Quotas(**kwargs)  # type: ignore[arg-type]
