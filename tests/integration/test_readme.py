"""What the README promises, checked against the code: its library snippet runs as printed on
this host, and the defaults it states are the code's."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from jobworker import JobManager
from jobworker.manager import DEFAULT_STOP_GRACE
from tests.conftest import cgroup2_usable

README = Path(__file__).parents[2] / "README.md"
STATE = 'Path("/var/lib/myapp/jobs")'
GROUP = 'cgroup_name="myapp"'


def library_snippet() -> str:
    section = README.read_text().split("\n## The library\n", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block in the README's library section"
    return m[1]


async def test_the_library_snippet_runs_on_this_host(tmp_path: Path, cgroup_name: str) -> None:
    """As root, on any host the README supports, including a hybrid one without controllers.
    Only where it keeps its state and its group's name are changed: a temp dir, a group of the
    test's own."""
    if reason := cgroup2_usable():
        pytest.skip(reason)
    code = library_snippet()
    assert code.count(STATE) == 1 and code.count(GROUP) == 1, code
    code = code.replace(STATE, f"Path({str(tmp_path / 'state')!r})")
    code = code.replace(GROUP, f"cgroup_name={cgroup_name!r}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert "Traceback" not in err.decode(), err.decode()
    assert proc.returncode == 3, err.decode()  # the job's own exit code, passed through
    assert out == b"hello\noops\n"  # stdout and stderr, interleaved
    # It closed its manager, which removed the group.
    probe = await JobManager.open(tmp_path / "probe", cgroup_name=cgroup_name + "-probe")
    root = probe.cgroup_parent.parent
    await probe.close()
    assert not (root / cgroup_name).exists()


def test_the_readme_states_the_default_stop_grace() -> None:
    sentences = re.split(r"(?<=[.;])\s", " ".join(README.read_text().split()))
    stated = [s for s in sentences if "--stop-grace" in s and "default" in s]
    assert any(f"default {DEFAULT_STOP_GRACE:g} s" in s for s in stated), stated
