"""Shared fixtures. Integration tests run real processes on the host's real cgroup2 tree, each
test under a parent group of its own, and check that nothing leaks."""

from __future__ import annotations

# isort: off
# jobworker.server.tls13 sets GRPC_SSL_CIPHER_SUITES, which grpc reads once, on import: whichever
# test module imports grpc first, the daemon's TLS 1.3-only setting must already be in place.
import jobworker.server.tls13  # noqa: F401

# isort: on
import asyncio
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

# Sandboxed jobs (every daemon job, by default) get a private /tmp: the files tests hand to their
# jobs (scripts, gates, working directories) live under /var/tmp instead. pytest reads this
# when it first makes tmp_path's base directory.
os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", "/var/tmp")

from jobworker import JobManager
from jobworker.cgroup.discovery import own_cgroup_dir

JOB_PYTHON = os.path.realpath(sys.executable)
"""The interpreter that jobs run (stdlib-only scripts): the real one behind the venv's link.
Daemon jobs are sandboxed with a private /tmp, so a checkout (and its venv) under /tmp is out
of their sight; the interpreter it links to is not."""


def cgroup2_usable() -> str | None:
    """Why integration tests cannot run here, or ``None`` when they can."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    try:
        own = own_cgroup_dir()
    except Exception as e:
        return f"no cgroup2 tree: {e}"
    if not os.access(own, os.W_OK):
        return f"cgroup {own} is not writable"
    return None


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Wait until ``predicate()`` holds, checking every few ms; fail after ``timeout``.

    For conditions the library gives no event for (another process's state); the bound is a
    safety net, not a timing assertion.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before``, except the two that live as long as their owner and
    come and go with garbage collection: grpc's aio poller and the loop's default executor."""
    return [
        t.name
        for t in set(threading.enumerate()) - before
        if "_poll_wrapper" not in t.name and not t.name.startswith("asyncio_")
    ]


@pytest.fixture
def cgroup_name() -> str:
    return f"jobworker-test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def manager(tmp_path: Path, cgroup_name: str) -> AsyncIterator[JobManager]:
    reason = cgroup2_usable()
    if reason:
        pytest.skip(reason)
    threads_before = set(threading.enumerate())
    mgr = await JobManager.open(tmp_path / "state", cgroup_name=cgroup_name, stop_grace=1.0)
    parent = mgr.cgroup_parent
    try:
        yield mgr
    finally:
        await mgr.close()
    assert not parent.exists(), f"cgroup {parent} left behind: {list(parent.iterdir())}"
    assert not new_threads(threads_before)


# -- JW_REQUIRE_TIERS=1: a run that proves nothing fails (CI sets it) ------------------------
#
# Tiers skip themselves where they cannot run (not root, no cgroup2 tree, a hybrid host for the
# kernel tier). That is right on a laptop and wrong in CI, where a skipped tier is a tier that
# was not tested. With JW_REQUIRE_TIERS=1 the session fails (exit status 1, or pytest's own
# non-zero status) and says why, when:
#   - no test ran at all (all skipped or deselected, or none collected);
#   - every collected test of a tier (tests/<tier>/...) was skipped;
#   - the probe of a collected tier (TIER_PROBES) says the tier cannot run on this machine;
#     checked after collection, before any test runs. The integration tier has tests that pass
#     without cgroup2 (the CLI's argument checks, TLS files ...), so "all skipped" alone would
#     not catch an unusable cgroup2 tree.

REQUIRE_TIERS = "JW_REQUIRE_TIERS"
TESTS_DIR = Path(__file__).parent
TIER_PROBES: dict[str, Callable[[], str | None]] = {"integration": cgroup2_usable}
"""tier -> why it cannot run on this machine (``None``: it can). tests/kernel/conftest.py adds
``kernel``."""


class RequireTiers:
    """The plugin behind JW_REQUIRE_TIERS (registered only when it is set)."""

    def __init__(self) -> None:
        self.tier_of: dict[str, str] = {}  # nodeid -> tier
        self.ran: set[str] = set()
        self.skipped: dict[str, str] = {}  # nodeid -> skip reason
        self.cannot_run: dict[str, str] = {}  # tier -> its probe's reason
        self.problems: list[str] = []

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            try:
                self.tier_of[item.nodeid] = item.path.relative_to(TESTS_DIR).parts[0]
            except ValueError:
                continue  # not under tests/
        for tier in sorted(set(self.tier_of.values())):
            probe = TIER_PROBES.get(tier)
            reason = probe() if probe is not None else None
            if reason is not None:
                self.cannot_run[tier] = reason

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" and (report.passed or report.failed):
            self.ran.add(report.nodeid)
        elif report.skipped:  # at setup (a fixture skipped) or in the test; xfail counts too
            longrepr = report.longrepr
            reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
            self.skipped[report.nodeid] = reason.removeprefix("Skipped: ")

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.ran:
            self.problems.append(f"no test ran ({len(self.tier_of)} collected)")
        for tier, reason in self.cannot_run.items():
            self.problems.append(f"the {tier} tier cannot run on this machine: {reason}")
        for tier in sorted(set(self.tier_of.values())):
            ids = [n for n, t in self.tier_of.items() if t == tier]
            if ids and not any(n in self.ran for n in ids):
                reasons = sorted({self.skipped[n] for n in ids if n in self.skipped})
                self.problems.append(
                    f"every one of the {len(ids)} {tier} tests was skipped: "
                    + ("; ".join(reasons) or "no reason given")
                )
        if self.problems and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.section(f"{REQUIRE_TIERS}=1")
        for tier in sorted(set(self.tier_of.values())):
            ids = [n for n, t in self.tier_of.items() if t == tier]
            ran = sum(n in self.ran for n in ids)
            skipped = sum(n in self.skipped for n in ids)
            terminalreporter.write_line(f"{tier}: {ran} ran, {skipped} skipped")
        for problem in self.problems:
            terminalreporter.write_line(f"FAIL: {problem}", red=True, bold=True)


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(REQUIRE_TIERS, "") not in ("", "0"):
        config.pluginmanager.register(RequireTiers(), "jobworker-require-tiers")
