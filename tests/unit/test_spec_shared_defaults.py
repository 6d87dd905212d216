"""Specs and statuses that set no variable or limit share one empty env and one Limits: a
daemon keeps thousands of ended jobs, and one small object each fragmented its heap."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from jobworker.limits import Limits
from jobworker.spec import JobSpec, JobState, JobStatus


def status(limits: Limits) -> JobStatus:
    return JobStatus(
        id="j",
        state=JobState.RUNNING,
        argv=("/bin/true",),
        owner="",
        pid=1,
        started_at=datetime.now(UTC),
        limits=limits,
    )


def test_specs_without_env_or_limits_share_one_of_each() -> None:
    a = JobSpec(argv=("/bin/true",))
    b = JobSpec(argv=("/bin/echo",), env={}, limits=Limits())
    assert a.env is b.env and a.env == {} and dict(a.env) == {}
    assert a.limits is b.limits and a.limits == Limits()
    assert status(Limits()).limits is a.limits
    assert replace(a, cwd="/tmp").env is a.env
    with pytest.raises(TypeError):
        a.env["X"] = "1"  # type: ignore[index]


def test_specs_with_their_own_values_keep_them() -> None:
    env = {"X": "1"}
    limits = Limits(pids=5)
    spec = JobSpec(argv=("/bin/true",), env=env, limits=limits)
    assert spec.env is env and spec.limits is limits
    assert status(limits).limits is limits
    assert spec.full_env()["X"] == "1"
