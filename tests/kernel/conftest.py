"""Kernel tier fixtures: a pure cgroup v2 kernel with cpu/memory/io/pids (scripts/kernel-vm.sh).

Every test runs the library's real JobManager against the delegated group this session started
in (the root cgroup, or JW_VM_CGROUP's child group), checks that it leaves no cgroup behind, and
records the figure it measured; the figures are printed at the end of the run.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from jobworker import JobManager
from jobworker.cgroup.controllers import DAEMON_LEAF
from jobworker.cgroup.discovery import own_cgroup_dir
from tests.conftest import TIER_PROBES

NEEDED = frozenset({"cpu", "memory", "io", "pids"})
FIGURES: dict[str, str] = {}
"""test name -> what it measured, printed in the terminal summary."""


def _why_not_kernel() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        own = own_cgroup_dir()
        offered = frozenset((own / "cgroup.controllers").read_text().split())
    except Exception as e:
        return f"no cgroup2 tree: {e}"
    with open("/proc/self/mounts") as f:
        if any(line.split()[2] == "cgroup" for line in f):
            return "cgroup v1 is mounted (hybrid host): run `make test-kernel` (a pure v2 VM)"
    if not offered >= NEEDED:
        return f"cgroup {own} offers {sorted(offered)}, not all of {sorted(NEEDED)}"
    return None


TIER_PROBES["kernel"] = _why_not_kernel  # JW_REQUIRE_TIERS=1 fails a run where this says no


@pytest.fixture(scope="session")
def delegated() -> Path:
    """The group this session was started in, found once: the first manager moves this process
    into ``<delegated>/daemon`` when the group is not the root, and later ones must reuse it."""
    reason = _why_not_kernel()
    if reason is not None:
        pytest.skip(reason)
    return own_cgroup_dir()


def cgroup_dirs(root: Path) -> set[str]:
    return {
        str(Path(d).relative_to(root))
        for d, _, _ in os.walk(root)
        if Path(d) != root and Path(d).name != DAEMON_LEAF
    }


@pytest.fixture
def no_leftovers(delegated: Path) -> Iterator[None]:
    before = cgroup_dirs(delegated)
    yield
    left = cgroup_dirs(delegated) - before
    assert not left, f"cgroups left behind under {delegated}: {sorted(left)}"


@pytest.fixture
async def manager(tmp_path: Path, delegated: Path, no_leftovers: None) -> AsyncIterator[JobManager]:
    mgr = await JobManager.open(
        tmp_path / "state",
        cgroup_root=delegated,
        cgroup_name=f"jobworker-k-{uuid.uuid4().hex[:8]}",
        stop_grace=1.0,
    )
    parent = mgr.cgroup_parent
    try:
        yield mgr
    finally:
        await mgr.close()
    assert not parent.exists(), f"cgroup {parent} left behind"


@pytest.fixture
def figure(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Record a measured figure: ``figure["cpu share"] = "19.8 %"``."""
    out: dict[str, str] = {}
    yield out
    if out:
        FIGURES[request.node.name] = "; ".join(f"{k} {v}" for k, v in out.items())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("kernel tier figures")
    for name, text in FIGURES.items():
        terminalreporter.write_line(f"{name}: {text}")
