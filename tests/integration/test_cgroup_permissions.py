"""Job cgroup directories are private to the daemon's user: another account (a job running as
``nobody``) can neither list the manager's parent group nor read a job group's files, while
jobs running as such an account still start, on both spawn paths."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from jobworker import JobManager
from jobworker.cgroup.tree import CgroupTree
from jobworker.spec import Credentials, JobSpec, JobState
from tests.integration.as_nobody import NOBODY, attempt
from tests.integration.as_nobody import run_as_nobody as as_nobody


async def test_other_accounts_cannot_list_or_read_job_groups(manager: JobManager) -> None:
    parent = manager.cgroup_parent
    st = await manager.start(JobSpec(argv=("sleep", "60")))
    try:
        group = parent / st.id
        assert group.is_dir()
        assert stat.S_IMODE(parent.stat().st_mode) == 0o711
        assert stat.S_IMODE(group.stat().st_mode) == 0o700
        # Control: the daemon's own user lists and reads both.
        assert st.id in os.listdir(parent)
        assert (group / "cgroup.procs").read_text().split()
        assert as_nobody(attempt(f"os.listdir({str(parent)!r})")) == "PermissionError EACCES"
        assert as_nobody(attempt(f"os.listdir({str(group)!r})")) == "PermissionError EACCES"
        assert (
            as_nobody(attempt(f"open({str(group / 'cgroup.procs')!r}).read()"))
            == "PermissionError EACCES"
        )
        # The parent stays traversable (0711): what the daemon's user keeps in it is reachable
        # by name, though not listable; the job group itself is not.
        assert as_nobody(attempt(f"os.stat({str(parent / 'cgroup.procs')!r})")) == "ok"
    finally:
        await manager.stop(st.id, grace=0)
    assert (await manager.wait(st.id)).state is JobState.STOPPED


async def test_a_job_running_as_nobody_still_starts_in_its_private_group(
    manager: JobManager,
) -> None:
    """The job's cgroup.procs is written by the spawner (root) or the forked child before it
    drops its credentials, so a 0700 root-owned group does not keep the job out."""
    nobody = Credentials(uid=NOBODY.pw_uid, gid=NOBODY.pw_gid)
    st = await manager.start(JobSpec(argv=("sh", "-c", "id -u")), nobody)
    final = await manager.wait(st.id)
    assert final.state is JobState.EXITED and final.exit_code == 0
    out = b"".join([chunk async for chunk in manager.output(st.id)])
    assert out.decode().strip() == str(NOBODY.pw_uid)


def test_group_modes_ignore_the_umask(tmp_path: Path) -> None:
    """A permissive umask must not widen the modes (they are set with chmod, not mkdir)."""
    old = os.umask(0)
    try:
        tree = CgroupTree(tmp_path, "parent")
        tree.setup()
        try:
            group = tree.create("job")
            assert stat.S_IMODE(tree.parent.stat().st_mode) == 0o711
            assert stat.S_IMODE(group.stat().st_mode) == 0o700
            group.rmdir()
        finally:
            tree.teardown()
    finally:
        os.umask(old)
