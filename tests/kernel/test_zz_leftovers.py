"""Runs last (file order): after every kernel test, no jobworker cgroup is left anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.kernel.conftest import FIGURES, cgroup_dirs

pytestmark = pytest.mark.kernel


def test_no_cgroup_left_behind(delegated: Path) -> None:
    left = sorted(cgroup_dirs(delegated))
    FIGURES["test_no_cgroup_left_behind"] = f"cgroup dirs under {delegated}: {left or 'none'}"
    assert not left
