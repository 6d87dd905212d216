"""Deadlines without processes: durations, the spec field, its record, the caps and the policy's
[runtime] table."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from jobworker.errors import InvalidArgument
from jobworker.identity import Role
from jobworker.server.authz import Identity, Policy
from jobworker.server.policy import effective_timeout
from jobworker.server.service import Settings
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


def test_effective_timeout() -> None:
    assert effective_timeout(None, None, "x") is None
    assert effective_timeout(5.0, None, "x") == 5.0
    assert effective_timeout(None, 60.0, "x") == 60.0  # a job asking for none gets the cap
    assert effective_timeout(60.0, 60.0, "x") == 60.0
    assert effective_timeout(1.0, 60.0, "x") == 1.0
    with pytest.raises(InvalidArgument) as e:
        effective_timeout(3600.0, 600.0, "workerd --max-runtime")
    assert str(e.value) == (
        "timeout: 1h is above the maximum runtime of 10m (workerd --max-runtime); "
        "ask for at most that"
    )


def test_policy_runtime_table(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[runtime]\nuser = "1h"\nviewer = 30\n')
    policy = Policy.load(path)
    assert policy.runtime_roles == {Role.USER: 3600.0, Role.VIEWER: 30.0}
    path.write_text("[roles]\n")
    assert Policy.load(path).runtime_roles == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('runtime = "1h"', r"\[runtime\] must be a table"),
        ('[runtime]\nalice = "1h"', r"\[runtime\] 'alice' is not a role"),
        ('[runtime]\nuser = "forever"', r"\[runtime\] user: 'forever' is not understood"),
        ('[runtime]\nuser = "0s"', r"\[runtime\] user must be positive"),
        ("[runtime]\nuser = [1]", r"\[runtime\] user: \[1\] is not a duration"),
        ("[runtime]\nuser = true", r"\[runtime\] user: True is not a duration"),
    ],
)
def test_policy_runtime_table_refuses(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text + "\n")
    with pytest.raises(InvalidArgument, match=message) as e:
        Policy.load(path)
    assert str(e.value).startswith(f"policy file {path}: ")
    assert "\n" not in str(e.value)


def test_the_roles_runtime_replaces_the_daemons_for_that_role(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[runtime]\nuser = "2h"\n')
    settings = Settings(Policy.load(path), max_runtime=600.0)
    alice, root = Identity("alice", Role.USER), Identity("root", Role.ADMIN)
    assert settings.timeout_for(alice, None) == 7200.0
    assert settings.timeout_for(alice, 3600.0) == 3600.0  # above the daemon's, within the role's
    with pytest.raises(InvalidArgument, match=r"3h is above the maximum runtime of 2h \(the pol"):
        settings.timeout_for(alice, 3 * 3600.0)
    assert settings.timeout_for(root, None) == 600.0
    with pytest.raises(InvalidArgument, match=r"1h is above .* 10m \(workerd --max-runtime\)"):
        settings.timeout_for(root, 3600.0)
    assert Settings().timeout_for(root, None) is None
