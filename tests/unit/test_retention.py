"""The retention index: oldest end first for each limit, O(1) bookkeeping per job, removals
on request forgotten; and the duration parser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from jobworker.errors import InvalidArgument
from jobworker.retention import Removal, Retention, RetentionIndex
from jobworker.units import parse_duration

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_count_removes_the_oldest_first() -> None:
    index = RetentionIndex(Retention(max_jobs=2))
    for i in range(4):
        index.add(f"j{i}", "alice", at(i), 10)
    assert index.due(at(10)) == [Removal("j0", "count"), Removal("j1", "count")]
    assert len(index) == 2 and "j2" in index and "j3" in index
    assert index.due(at(10)) == []
    assert index.log_bytes("alice") == 20


def test_age_removes_what_ended_before_the_cutoff() -> None:
    index = RetentionIndex(Retention(max_age=timedelta(seconds=60)))
    index.add("old", "alice", at(0), 0)
    index.add("young", "bob", at(30), 0)
    assert index.due(at(60)) == []  # exactly the age: kept
    assert index.due(at(61)) == [Removal("old", "age")]
    assert index.due(at(91)) == [Removal("young", "age")]
    assert len(index) == 0


def test_log_bytes_per_owner_removes_that_owners_oldest() -> None:
    index = RetentionIndex(Retention(max_log_bytes_per_owner=250))
    index.add("b0", "bob", at(0), 100)
    index.add("a0", "alice", at(1), 100)
    index.add("a1", "alice", at(2), 100)
    assert index.due(at(3)) == []
    index.add("a2", "alice", at(3), 100)
    assert index.due(at(4)) == [Removal("a0", "log_bytes")]
    assert index.log_bytes("alice") == 200 and index.log_bytes("bob") == 100
    # One job alone past the limit is removed too (nothing older of that owner is left).
    index.add("big", "carol", at(5), 1000)
    assert index.due(at(6)) == [Removal("big", "log_bytes")]
    assert index.log_bytes("carol") == 0


def test_discard_forgets_a_job_removed_on_request() -> None:
    index = RetentionIndex(Retention(max_jobs=1, max_log_bytes_per_owner=150))
    index.add("a0", "alice", at(0), 100)
    index.discard("a0")
    index.discard("a0")  # twice: no error
    index.add("a1", "alice", at(1), 100)
    assert index.due(at(2)) == []  # a0's bytes and count are gone with it
    assert index.log_bytes("alice") == 100


def test_no_limits_keep_everything() -> None:
    index = RetentionIndex(Retention())
    for i in range(100):
        index.add(f"j{i}", "alice", at(i), 1 << 30)
    assert index.due(at(1e9)) == []
    assert len(index) == 100


def test_limits_combine() -> None:
    index = RetentionIndex(
        Retention(max_jobs=3, max_age=timedelta(seconds=100), max_log_bytes_per_owner=25)
    )
    for i in range(5):
        index.add(f"j{i}", "alice" if i % 2 else "bob", at(i * 10), 10)
    # count first (j0, j1), then age (j2 ended at 20 < 125-100), then bob's bytes (j4 alone: 10)
    assert index.due(at(125)) == [Removal("j0", "count"), Removal("j1", "count"),
                                  Removal("j2", "age")]  # fmt: skip
    assert len(index) == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("10m", 600), ("12h", 43200), ("7d", 604800), ("2w", 1209600), ("90", 90),
     (" 1.5h ", 5400), ("7D", 604800)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "-1d", "0s", "d", "1d2h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^--retain-for.*30s, 10m, 1.5h, 7d"):
        parse_duration(text, "--retain-for")


@pytest.mark.parametrize(
    "kwargs",
    [{"max_jobs": 0}, {"max_age": timedelta(0)}, {"max_log_bytes_per_owner": 0},
     {"sweep_interval": 0}],
)  # fmt: skip
def test_retention_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must be"):
        Retention(**kwargs)  # type: ignore[arg-type]
