"""Parsing and validation of limits: human units, the CLI io form, defaults, caps and device
resolution over a fake sysfs laid out like the kernel's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobworker.cgroup.devices import resolve_device, resolve_limits
from jobworker.errors import InvalidArgument
from jobworker.limits import IOLimit, Limits, parse_cpu, parse_io, parse_rate, parse_size
from jobworker.server.policy import check_caps, effective_limits

MiB = 1 << 20
GiB = 1 << 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1024", 1024),
        ("512M", 512 * MiB),
        ("1.5G", 3 * GiB // 2),
        ("1k", 1024),
        ("2GiB", 2 * GiB),
        ("2GB", 2 * GiB),
        (" 64 M ", 64 * MiB),
        ("1T", 1 << 40),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1", "abc", "1X", "1.2.3", "1.5", "M", "0.1K", "1e9"])
def test_parse_size_rejects_with_field_and_form(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^memory.*512M"):
        parse_size(text, "memory")


def test_parse_size_rejects_zero_int() -> None:
    with pytest.raises(InvalidArgument, match="memory must be positive"):
        parse_size(0)


@pytest.mark.parametrize(
    ("text", "expected"), [("10M", 10 * MiB), ("10M/s", 10 * MiB), ("10MiB/s", 10 * MiB)]
)
def test_parse_rate(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["0", "/s", "fast", "-5M"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="10M/s"):
        parse_rate(text, "io /dev/sda wbps")


@pytest.mark.parametrize(("text", "expected"), [("0.5", 0.5), ("2", 2.0), (" 0.01 ", 0.01)])
def test_parse_cpu(text: str, expected: float) -> None:
    assert parse_cpu(text) == expected


@pytest.mark.parametrize("text", ["0", "-1", "nan", "inf", "half", "0.001", "100000", ""])
def test_parse_cpu_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match=r"^cpu.*cores"):
        parse_cpu(text)


def test_io_parse_rate_caps_both_directions() -> None:
    assert parse_io("/dev/sda=10M") == IOLimit("/dev/sda", read_bps=10 * MiB, write_bps=10 * MiB)


def test_io_parse_keys() -> None:
    assert IOLimit.parse("8:0=wbps=5M,riops=100,wiops=50") == IOLimit(
        "8:0", write_bps=5 * MiB, read_iops=100, write_iops=50
    )
    assert IOLimit.parse("8:0=read_bps=1K") == IOLimit("8:0", read_bps=1024)


@pytest.mark.parametrize(
    "text",
    [
        "nodevice",
        "/dev/sda=",
        "=10M",
        "/dev/sda=speed=1M",
        "/dev/sda=wbps=1M,wbps=2M",
        "/dev/sda=riops=1.5",
        "/dev/sda=wbps=0",
    ],
)
def test_io_parse_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument, match="io"):
        IOLimit.parse(text)


def test_iolimit_must_set_something() -> None:
    with pytest.raises(InvalidArgument, match="sets nothing"):
        IOLimit("8:0")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"cpu": 0}, "cpu"),
        ({"cpu": -1.0}, "cpu"),
        ({"cpu": float("nan")}, "cpu"),
        ({"cpu": True}, "cpu"),
        ({"cpu_weight": 0}, "cpu_weight"),
        ({"cpu_weight": 10_001}, "cpu_weight"),
        ({"memory": 0}, "memory"),
        ({"memory": 4096}, "memory"),
        ({"memory": 1 << 64}, "memory"),
        ({"memory": 1.5}, "memory"),
        ({"pids": 0}, "pids"),
        ({"pids": 1 << 30}, "pids"),
        ({"io": (IOLimit("8:0", read_bps=1), IOLimit("8:0", write_bps=1))}, "io"),
    ],
)
def test_limits_validate_on_construction(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument, match=f"^{field}"):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_limits_parse_from_text() -> None:
    limits = Limits.parse(cpu="0.5", cpu_weight="200", memory="1.5G", io=["8:0=1M"], pids="64")
    assert limits == Limits(
        cpu=0.5,
        cpu_weight=200,
        memory=3 * GiB // 2,
        io=(IOLimit("8:0", read_bps=MiB, write_bps=MiB),),
        pids=64,
    )
    assert Limits.parse() == Limits()
    assert Limits.parse().is_empty()


def test_limits_io_list_becomes_tuple() -> None:
    limits = Limits(io=[IOLimit("8:0", read_bps=1)])  # type: ignore[arg-type]
    assert limits.io == (IOLimit("8:0", read_bps=1),)
    assert Limits(cpu=1).cpu == 1.0


def test_with_defaults_fills_only_unset_fields() -> None:
    defaults = Limits(
        cpu=1,
        memory=256 * MiB,
        pids=100,
        io=(IOLimit("8:0", write_bps=MiB), IOLimit("8:16", write_bps=MiB)),
    )
    asked = Limits(memory=64 * MiB, io=(IOLimit("8:0", read_bps=5),))
    got = asked.with_defaults(defaults)
    assert got == Limits(
        cpu=1,
        memory=64 * MiB,
        pids=100,
        io=(IOLimit("8:0", read_bps=5), IOLimit("8:16", write_bps=MiB)),
    )
    assert Limits().with_defaults(Limits()) == Limits()


def test_check_caps_refuses_above_and_unlimited() -> None:
    caps = Limits(cpu=2, memory=GiB, pids=100, io=(IOLimit("8:0", write_bps=10 * MiB),))
    ok = Limits(cpu=2, memory=GiB, pids=1, io=(IOLimit("8:0", write_bps=MiB),))
    check_caps(ok, caps)
    with pytest.raises(InvalidArgument, match=r"memory: 2G is above this daemon's maximum of 1G"):
        check_caps(Limits(cpu=1, memory=2 * GiB, pids=1, io=ok.io), caps)
    with pytest.raises(InvalidArgument, match=r"cpu: unlimited is above .* maximum of 2"):
        check_caps(Limits(memory=GiB, pids=1, io=ok.io), caps)
    with pytest.raises(InvalidArgument, match=r"pids: 101"):
        check_caps(Limits(cpu=1, memory=GiB, pids=101, io=ok.io), caps)
    with pytest.raises(InvalidArgument, match=r"io 8:0 write_bps: unlimited"):
        check_caps(Limits(cpu=1, memory=GiB, pids=1), caps)
    check_caps(Limits(cpu=100), Limits())


def test_effective_limits_uses_defaults_then_caps() -> None:
    defaults = Limits(memory=128 * MiB)
    caps = Limits(memory=GiB, pids=500)
    assert effective_limits(Limits(), defaults, caps) == Limits(memory=128 * MiB, pids=500)
    assert effective_limits(Limits(pids=10), defaults, caps) == Limits(memory=128 * MiB, pids=10)
    with pytest.raises(InvalidArgument, match="pids"):
        effective_limits(Limits(pids=501), defaults, caps)


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    """/sys/dev/block links into /sys/devices, as the kernel lays them out: sda (8:0) with
    partition sda1 (8:1) in its directory, and nvme0n1 (259:0)."""
    sys_ = tmp_path / "sys"
    disk = sys_ / "devices/pci0000:00/0000:00:1f.2/ata1/host0/target0:0:0/0:0:0:0/block/sda"
    (disk / "sda1").mkdir(parents=True)
    (disk / "dev").write_text("8:0\n")
    (disk / "sda1" / "dev").write_text("8:1\n")
    (disk / "sda1" / "partition").write_text("1\n")
    nvme = sys_ / "devices/pci0000:00/0000:00:04.0/nvme/nvme0/nvme0n1"
    nvme.mkdir(parents=True)
    (nvme / "dev").write_text("259:0\n")
    links = sys_ / "dev" / "block"
    links.mkdir(parents=True)
    for name, target in (("8:0", disk), ("8:1", disk / "sda1"), ("259:0", nvme)):
        (links / name).symlink_to(os.path.relpath(target, links))
    return sys_


def test_resolve_whole_disk_and_partition(sysfs: Path) -> None:
    assert resolve_device("8:0", sysfs=sysfs) == "8:0"
    assert resolve_device("8:1", sysfs=sysfs) == "8:0"
    assert resolve_device("259:0", sysfs=sysfs) == "259:0"


def test_resolve_path_through_its_device_number(sysfs: Path) -> None:
    numbers = {"/dev/sda1": (8, 1), "/dev/nvme0n1": (259, 0)}
    assert resolve_device("/dev/sda1", sysfs=sysfs, device_number=numbers.__getitem__) == "8:0"
    assert resolve_device("/dev/nvme0n1", sysfs=sysfs, device_number=numbers.__getitem__) == "259:0"


def test_resolve_rejects_unknown_devices(sysfs: Path, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"io device 9:9 is not a known block device"):
        resolve_device("9:9", sysfs=sysfs)
    with pytest.raises(InvalidArgument, match="block device path"):
        resolve_device("sda", sysfs=sysfs)
    with pytest.raises(InvalidArgument, match="not a block device"):
        resolve_device("/dev/null", sysfs=sysfs)  # a character device
    with pytest.raises(InvalidArgument, match="No such file"):
        resolve_device(str(tmp_path / "missing"), sysfs=sysfs)


def test_resolved_limits(sysfs: Path) -> None:
    limits = Limits(io=(IOLimit("8:1", write_bps=MiB),), pids=5)
    assert resolve_limits(limits, sysfs=sysfs) == Limits(
        io=(IOLimit("8:0", write_bps=MiB),), pids=5
    )
