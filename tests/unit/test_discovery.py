from pathlib import Path

import pytest

from jobworker.cgroup.discovery import (
    Mount,
    parse_cgroup2_mounts,
    parse_own_cgroup,
    resolve_own_group,
)
from jobworker.errors import HostError

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_CGROUP = """\
9:name=systemd:/
4:memory:/process_api/37482fd62b44657301357c70ac28d293
1:cpu:/
0::/
"""
PURE_V2_MOUNTINFO = (
    "25 30 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 "
    "rw,nsdelegate,memory_recursiveprot\n"
)
SYSTEMD_SERVICE_CGROUP = "0::/system.slice/workerd.service\n"


def test_hybrid_host_finds_unified_tree() -> None:
    mounts = parse_cgroup2_mounts(HYBRID_MOUNTINFO)
    assert mounts == [Mount(root="/", mount_point="/sys/fs/cgroup/unified")]
    own = parse_own_cgroup(HYBRID_CGROUP)
    assert own == "/"
    assert resolve_own_group(mounts, own) == Path("/sys/fs/cgroup/unified")


def test_pure_v2_systemd_service() -> None:
    mounts = parse_cgroup2_mounts(PURE_V2_MOUNTINFO)
    own = parse_own_cgroup(SYSTEMD_SERVICE_CGROUP)
    assert resolve_own_group(mounts, own) == Path("/sys/fs/cgroup/system.slice/workerd.service")


def test_namespaced_mount_root_is_stripped() -> None:
    # Inside a container the mount's root is the container's group.
    info = "40 30 0:30 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    mounts = parse_cgroup2_mounts(info)
    assert resolve_own_group(mounts, "/kubepods/pod1/app") == Path("/sys/fs/cgroup/app")


def test_escaped_mount_point() -> None:
    info = "40 30 0:30 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n"
    assert parse_cgroup2_mounts(info)[0].mount_point == "/mnt/my cgroups"


def test_deleted_group_suffix() -> None:
    assert parse_own_cgroup("0::/gone (deleted)\n") == "/gone"


def test_no_v2_entry_is_a_clear_error() -> None:
    with pytest.raises(HostError, match="0::"):
        parse_own_cgroup("4:memory:/x\n")


def test_group_outside_every_mount() -> None:
    mounts = [Mount(root="/a", mount_point="/sys/fs/cgroup")]
    with pytest.raises(HostError, match="not visible"):
        resolve_own_group(mounts, "/b/c")


def test_non_cgroup2_mounts_ignored() -> None:
    assert parse_cgroup2_mounts("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\ngarbage\n") == []
