"""io controller: per-device ``io.max`` lines and ``io.stat`` byte counters."""

from __future__ import annotations

from pathlib import Path

from jobworker.cgroup import fs
from jobworker.cgroup.devices import resolve_device
from jobworker.limits import IOLimit, Limits

_KEYS = (
    ("rbps", "read_bps"),
    ("wbps", "write_bps"),
    ("riops", "read_iops"),
    ("wiops", "write_iops"),
)


def max_line(limit: IOLimit, device: str | None = None) -> str:
    """One ``io.max`` line: ``"MAJ:MIN rbps=.. wbps=.. riops=.. wiops=.."``.

    Unset caps are written as ``max`` so a line always states the whole limit for the device.
    """
    parts = [device or limit.device]
    for key, attr in _KEYS:
        value = getattr(limit, attr)
        parts.append(f"{key}={'max' if value is None else value}")
    return " ".join(parts)


def apply(
    group: Path, limits: Limits, sysfs: Path = Path("/sys"), dev: Path = Path("/dev")
) -> None:
    for limit in limits.io:
        fs.write(group, "io.max", max_line(limit, resolve_device(limit.device, sysfs=sysfs)))


def parse_stat(text: str) -> dict[str, dict[str, int]]:
    """``io.stat`` text -> {"MAJ:MIN": {"rbytes": .., "wbytes": .., ...}}."""
    out: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        counters: dict[str, int] = {}
        for field in fields[1:]:
            key, _, value = field.partition("=")
            if value.isdigit():
                counters[key] = int(value)
        out[fields[0]] = counters
    return out


def stats(group: Path) -> dict[str, int]:
    """Bytes and operations summed over all devices (``rbytes``, ``wbytes``, ``rios``, ``wios``)."""
    text = fs.read_optional(group, "io.stat")
    totals: dict[str, int] = {}
    if text is None:
        return totals
    for counters in parse_stat(text).values():
        for key, value in counters.items():
            totals[key] = totals.get(key, 0) + value
    return totals
