"""Limit -> cgroup file translation, and stats parsing from real kernel file contents
(captured on Linux 6.1 with cgroup_no_v1=all, and on a hybrid host)."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from jobworker.cgroup import controllers, cpu, fs, io, memory, pids
from jobworker.errors import HostError, InvalidArgument, LimitUnavailable
from jobworker.limits import IOLimit, Limits
from jobworker.spec import Usage

MiB = 1 << 20

# A group with cpu.max "20000 100000" that ran a busy loop (6.1, cpu controller enabled).
CPU_STAT = """\
usage_usec 780487
user_usec 351447
system_usec 429039
nr_periods 45
nr_throttled 36
throttled_usec 3882489
nr_bursts 0
burst_usec 0
"""
# The same file in a hybrid host's v2 group: only the core part, no controller.
CPU_STAT_HYBRID = """\
usage_usec 347931361
user_usec 265533326
system_usec 82398034
nice_usec 0
"""
# memory.max 50M, a 200M allocation, memory.oom.group 1.
MEMORY_EVENTS_OOM = """\
low 0
high 0
max 75
oom 1
oom_kill 2
oom_group_kill 1
"""
# memory.events.local of that group's parent: the kill happened below, not here.
MEMORY_EVENTS_LOCAL_QUIET = """\
low 0
high 0
max 0
oom 0
oom_kill 0
oom_group_kill 0
"""
IO_STAT = """\
254:0 rbytes=4196352 wbytes=4194304 rios=6 wios=4 dbytes=0 dios=0
8:0 rbytes=1000 wbytes=24 rios=1 wios=1 dbytes=0 dios=0
"""


def group_with(tmp_path: Path, files: dict[str, str]) -> Path:
    group = tmp_path / "job"
    group.mkdir()
    for name, text in files.items():
        (group / name).write_text(text)
    return group


@pytest.mark.parametrize(
    ("cores", "value"),
    [(0.2, "20000 100000"), (2, "200000 100000"), (0.01, "1000 100000"), (1.5, "150000 100000")],
)
def test_cpu_max_value(cores: float, value: str) -> None:
    assert cpu.max_value(cores) == value


def test_io_max_line() -> None:
    assert (
        io.max_line(IOLimit("254:0", write_bps=2 * MiB))
        == "254:0 rbps=max wbps=2097152 riops=max wiops=max"
    )
    assert (
        io.max_line(IOLimit("/dev/sda1", 1, 2, 3, 4), device="8:0")
        == "8:0 rbps=1 wbps=2 riops=3 wiops=4"
    )


def test_memory_and_pids_values() -> None:
    assert memory.max_value(50 * MiB) == "52428800"
    assert pids.max_value(16) == "16"


CONTROL_FILES = ("cpu.max", "cpu.weight", "memory.max", "memory.swap.max", "memory.oom.group")
CONTROL_FILES_ALL = (*CONTROL_FILES, "io.max", "pids.max")


def test_apply_writes_each_limit(tmp_path: Path) -> None:
    group = group_with(tmp_path, dict.fromkeys(CONTROL_FILES_ALL, ""))
    sysfs = tmp_path / "sys"
    (sysfs / "dev" / "block" / "8:0").mkdir(parents=True)
    limits = Limits(
        cpu=0.5, cpu_weight=50, memory=64 * MiB, pids=10, io=(IOLimit("8:0", read_iops=7),)
    )
    controllers.apply(group, limits, sysfs=sysfs)
    written = {name: (group / name).read_text() for name in CONTROL_FILES_ALL}
    assert written == {
        "cpu.max": "50000 100000",
        "cpu.weight": "50",
        "memory.max": str(64 * MiB),
        "memory.swap.max": "0",
        "memory.oom.group": "1",
        "io.max": "8:0 rbps=max wbps=max riops=7 wiops=max",
        "pids.max": "10",
    }


def test_apply_writes_only_what_was_asked(tmp_path: Path) -> None:
    group = group_with(tmp_path, dict.fromkeys(CONTROL_FILES_ALL, ""))
    controllers.apply(group, Limits(pids=3))
    assert (group / "pids.max").read_text() == "3"
    assert all((group / n).read_text() == "" for n in CONTROL_FILES_ALL if n != "pids.max")


def test_apply_memory_without_swap_accounting(tmp_path: Path) -> None:
    group = group_with(tmp_path, {"memory.max": "", "memory.oom.group": ""})
    memory.apply(group, Limits(memory=8 * MiB))
    assert (group / "memory.max").read_text() == str(8 * MiB)
    assert not (group / "memory.swap.max").exists()


def test_apply_nothing_on_a_hybrid_group(tmp_path: Path) -> None:
    group = group_with(tmp_path, {"cpu.stat": CPU_STAT_HYBRID})
    controllers.apply(group, Limits())
    assert sorted(p.name for p in group.iterdir()) == ["cpu.stat"]


def test_apply_without_the_controller_names_it(tmp_path: Path) -> None:
    group = group_with(tmp_path, {"cpu.stat": CPU_STAT_HYBRID})
    with pytest.raises(LimitUnavailable, match="'memory' is not available"):
        controllers.apply(group, Limits(memory=8 * MiB))


def test_read_usage_full(tmp_path: Path) -> None:
    group = group_with(
        tmp_path,
        {
            "cpu.stat": CPU_STAT,
            "memory.current": "1417216\n",
            "memory.peak": "2060288\n",
            "io.stat": IO_STAT,
            "pids.current": "9\n",
            "pids.events": "max 1\n",
        },
    )
    assert controllers.read_usage(group) == Usage(
        cpu_user_usec=351447,
        cpu_system_usec=429039,
        memory_current=1417216,
        memory_peak=2060288,
        io_read_bytes=4196352 + 1000,
        io_write_bytes=4194304 + 24,
        nr_throttled=36,
        pids_current=9,
    )
    assert pids.stats(group) == {"current": 9, "max": 1}


def test_read_usage_hybrid_host(tmp_path: Path) -> None:
    group = group_with(tmp_path, {"cpu.stat": CPU_STAT_HYBRID})
    assert controllers.read_usage(group) == Usage(
        cpu_user_usec=265533326, cpu_system_usec=82398034, memory_peak=None
    )


def test_read_usage_before_memory_peak(tmp_path: Path) -> None:
    group = group_with(tmp_path, {"cpu.stat": CPU_STAT, "memory.current": "4096\n"})
    usage = controllers.read_usage(group)
    assert usage.memory_current == 4096
    assert usage.memory_peak is None


def test_io_parse_stat() -> None:
    assert io.parse_stat(IO_STAT)["254:0"] == {
        "rbytes": 4196352,
        "wbytes": 4194304,
        "rios": 6,
        "wios": 4,
        "dbytes": 0,
        "dios": 0,
    }


def test_oom_killed_reads_the_groups_own_events(tmp_path: Path) -> None:
    group = group_with(
        tmp_path,
        {"memory.events": MEMORY_EVENTS_OOM, "memory.events.local": MEMORY_EVENTS_OOM},
    )
    assert controllers.oom_killed(group)


def test_oom_below_the_group_is_not_its_own(tmp_path: Path) -> None:
    # The parent's hierarchical memory.events counts a child's kill; .local does not.
    group = group_with(
        tmp_path,
        {"memory.events": MEMORY_EVENTS_OOM, "memory.events.local": MEMORY_EVENTS_LOCAL_QUIET},
    )
    assert not controllers.oom_killed(group)


def test_oom_killed_falls_back_to_memory_events(tmp_path: Path) -> None:
    group = group_with(tmp_path, {"memory.events": MEMORY_EVENTS_OOM})
    assert controllers.oom_killed(group)


def test_oom_killed_without_memory_controller(tmp_path: Path) -> None:
    assert not controllers.oom_killed(group_with(tmp_path, {"cpu.stat": CPU_STAT_HYBRID}))


ALL = frozenset({"cpu", "memory", "io", "pids"})


def test_check_on_a_hybrid_host_names_controller_and_reason() -> None:
    controllers.check(Limits(), frozenset())
    with pytest.raises(LimitUnavailable, match=r"memory limit needs .* 'memory' .* hybrid host"):
        controllers.check(Limits(memory=64 * MiB), frozenset())
    with pytest.raises(LimitUnavailable, match=r"cpu_weight limit needs .* 'cpu'"):
        controllers.check(Limits(cpu_weight=10), frozenset())


def test_check_when_not_delegated() -> None:
    with pytest.raises(LimitUnavailable, match=r"'pids' .* not delegated .*available: cpu, memory"):
        controllers.check(Limits(pids=5), frozenset({"cpu", "memory"}))
    controllers.check(Limits(cpu=1, memory=64 * MiB, pids=5), ALL)


def test_check_rejects_unknown_io_device(tmp_path: Path) -> None:
    (tmp_path / "dev" / "block").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match=r"^io: io device 8:0 is not a known block device"):
        controllers.check(Limits(io=(IOLimit("8:0", write_bps=1),)), ALL, sysfs=tmp_path)


def cgroup_files(group: Path, files: dict[str, str]) -> Path:
    group.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (group / name).write_text(text)
    return group


def test_enable_changes_nothing_on_a_hybrid_host(tmp_path: Path) -> None:
    delegated = cgroup_files(
        tmp_path / "d",
        {"cgroup.controllers": "hugetlb\n", "cgroup.subtree_control": "", "cgroup.procs": "42\n"},
    )
    parent = cgroup_files(delegated / "jobworker", {"cgroup.subtree_control": ""})
    before = {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    assert controllers.enable(delegated, parent) == frozenset()
    assert {p: p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not (delegated / controllers.DAEMON_LEAF).exists()


def test_enable_moves_processes_out_of_a_delegated_group(tmp_path: Path) -> None:
    # cgroupfs files are stand-ins here: the kernel tier checks the real behaviour.
    delegated = cgroup_files(
        tmp_path / "d",
        {
            "cgroup.controllers": "cpuset cpu memory pids\n",
            "cgroup.subtree_control": "",
            "cgroup.type": "domain\n",
            "cgroup.procs": "42\n",
        },
    )
    leaf = cgroup_files(delegated / controllers.DAEMON_LEAF, {"cgroup.procs": ""})
    parent = cgroup_files(delegated / "jobworker", {"cgroup.subtree_control": ""})
    controllers.enable(delegated, parent)
    assert (leaf / "cgroup.procs").read_text() == "42"
    assert (delegated / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (parent / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"


def test_enable_in_the_root_group_moves_nothing(tmp_path: Path) -> None:
    root = cgroup_files(
        tmp_path / "root",
        {
            "cgroup.controllers": "cpu io memory pids\n",
            "cgroup.subtree_control": "",
            "cgroup.procs": "1\n42\n",
        },
    )
    parent = cgroup_files(root / "jobworker", {"cgroup.subtree_control": ""})
    controllers.enable(root, parent)
    assert not (root / controllers.DAEMON_LEAF).exists()
    assert (root / "cgroup.subtree_control").read_text() == "+cpu +memory +io +pids"


def busy_subtree_control(monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """cgroup.subtree_control refuses with EBUSY ``times`` times (a process keeps appearing
    in the group); records every file written. Sleeping in between fails the test."""
    written: list[str] = []
    real_write = fs.write

    def write(group: Path, name: str, value: str) -> None:
        written.append(f"{group.name}/{name}")
        if name == "cgroup.subtree_control" and written.count(f"{group.name}/{name}") <= times:
            raise HostError("busy") from OSError(errno.EBUSY, "Device or resource busy")
        real_write(group, name, value)

    def no_sleep(seconds: float) -> None:
        raise AssertionError(f"slept {seconds}s on the event loop")

    monkeypatch.setattr(fs, "write", write)
    monkeypatch.setattr(time, "sleep", no_sleep)
    return written


def delegated_with_a_process(tmp_path: Path) -> tuple[Path, Path]:
    delegated = cgroup_files(
        tmp_path / "d",
        {
            "cgroup.controllers": "cpu pids\n",
            "cgroup.subtree_control": "",
            "cgroup.type": "domain\n",
            "cgroup.procs": "42\n",
        },
    )
    cgroup_files(delegated / controllers.DAEMON_LEAF, {"cgroup.procs": ""})
    return delegated, cgroup_files(delegated / "jobworker", {"cgroup.subtree_control": ""})


def test_enable_retries_a_busy_group_without_sleeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delegated, parent = delegated_with_a_process(tmp_path)
    written = busy_subtree_control(monkeypatch, times=3)
    assert controllers.enable(delegated, parent) == frozenset()  # stand-in files: none read back
    assert written.count("d/cgroup.subtree_control") == 4
    # Each refusal moved the group's processes again before the next attempt.
    assert written.count("daemon/cgroup.procs") == 1 + 3
    assert (delegated / "cgroup.subtree_control").read_text() == "+cpu +pids"


def test_enable_gives_up_on_a_group_that_stays_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delegated, parent = delegated_with_a_process(tmp_path)
    written = busy_subtree_control(monkeypatch, times=1000)
    with pytest.raises(HostError, match=r"stayed busy through 20 attempts"):
        controllers.enable(delegated, parent)
    assert written.count("d/cgroup.subtree_control") == 20
