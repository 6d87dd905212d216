"""Deadlines without processes: durations, the spec field, its record, the caps and the policy's
[runtime] table."""

from __future__ import annotations

import math

import pytest

from jobworker.errors import InvalidArgument
from jobworker.spec import JobSpec
from jobworker.store import spec_from_dict, spec_to_dict
from jobworker.units import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        ("2d", 172800.0),
        ("90", 90.0),
        (" 1.5 H ", 5400.0),
        (".5s", 0.5),
        (45, 45.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "not understood"),
        ("10 minutes", "not understood"),
        ("1h30m", "not understood"),
        ("-5s", "not understood"),
        ("0s", "must be positive"),
        (0, "must be positive"),
        (-1.0, "must be positive"),
        (math.inf, "must be positive"),
        (math.nan, "must be positive"),
        (True, "not a duration"),
    ],
)
def test_parse_duration_refuses(text: str | float, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as e:
        parse_duration(text, "--timeout")
    assert str(e.value).startswith("--timeout")
    assert "30s, 10m, 1.5h" in str(e.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (30, "30s"),
        (0.5, "0.5s"),
        (60, "1m"),
        (5400, "90m"),
        (3600, "1h"),
        (86400, "1d"),
        (61, "61s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_spec_timeout_is_validated() -> None:
    assert JobSpec(argv=("true",)).timeout is None
    spec = JobSpec(argv=("true",), timeout=2)
    assert spec.timeout == 2.0 and isinstance(spec.timeout, float)
    for bad in (0, -1, math.inf, math.nan):
        with pytest.raises(InvalidArgument, match="timeout must be a positive, finite"):
            JobSpec(argv=("true",), timeout=bad)
    for wrong in ("30s", True):
        with pytest.raises(InvalidArgument, match="timeout must be a number of seconds"):
            JobSpec(argv=("true",), timeout=wrong)  # type: ignore[arg-type]


def test_the_timeout_is_persisted_in_the_record() -> None:
    spec = JobSpec(argv=("sleep", "9"), owner="alice", timeout=1.5)
    raw = spec_to_dict(spec)
    assert raw["timeout"] == 1.5
    assert spec_from_dict(raw) == spec
    untimed = JobSpec(argv=("true",))
    assert spec_from_dict(spec_to_dict(untimed)).timeout is None
    # A record written before deadlines existed has no key at all.
    old = spec_to_dict(untimed)
    del old["timeout"]
    assert spec_from_dict(old) == untimed
