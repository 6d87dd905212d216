"""cgroupfs gateway: a vanished group and a missing file in an existing group are different
errors (plain directories stand in for cgroups)."""

from pathlib import Path

import pytest

from jobworker.cgroup import fs
from jobworker.errors import GroupGone, HostError, LimitUnavailable


def test_write_to_a_vanished_group_is_group_gone(tmp_path: Path) -> None:
    group = tmp_path / "job"  # never created: the job's group was removed
    with pytest.raises(GroupGone, match=r"the cgroup .*/job no longer exists"):
        fs.write(group, "cgroup.freeze", "1")
    with pytest.raises(GroupGone):
        fs.write(group, "memory.max", "1")


def test_read_from_a_vanished_group_is_group_gone(tmp_path: Path) -> None:
    group = tmp_path / "job"
    group.mkdir()
    (group / "cgroup.events").write_text("populated 0\n")
    assert fs.read(group, "cgroup.events") == "populated 0\n"
    (group / "cgroup.events").unlink()
    group.rmdir()
    with pytest.raises(GroupGone):
        fs.read(group, "cgroup.events")
    with pytest.raises(GroupGone):
        fs.read_optional(group, "memory.peak")


def test_missing_controller_file_in_an_existing_group_is_limit_unavailable(
    tmp_path: Path,
) -> None:
    with pytest.raises(LimitUnavailable, match=r"controller 'memory' is not available") as e:
        fs.write(tmp_path, "memory.max", "1")
    assert not isinstance(e.value, GroupGone)


def test_missing_core_file_names_the_kernel_feature(tmp_path: Path) -> None:
    with pytest.raises(HostError, match=r"this kernel lacks cgroup.kill \(.*Linux 5.14") as e:
        fs.write(tmp_path, "cgroup.kill", "1")
    assert not isinstance(e.value, GroupGone | LimitUnavailable)


def test_absent_files_of_an_existing_group(tmp_path: Path) -> None:
    assert fs.read_optional(tmp_path, "memory.peak") is None
    with pytest.raises(HostError) as e:
        fs.read(tmp_path, "cgroup.events")
    assert not isinstance(e.value, GroupGone)
