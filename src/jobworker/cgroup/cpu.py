"""cpu controller: bandwidth (``cpu.max``), relative weight (``cpu.weight``) and ``cpu.stat``."""

from __future__ import annotations

from pathlib import Path

from jobworker.cgroup import fs
from jobworker.limits import Limits

PERIOD_USEC = 100_000
"""The cpu.max period: 100 ms, the kernel's default."""
MIN_QUOTA_USEC = 1_000
"""The kernel refuses a quota below 1 ms (EINVAL)."""


def max_value(cores: float) -> str:
    """``cpu.max`` for a bandwidth in cores: ``"QUOTA PERIOD"`` (0.2 -> ``"20000 100000"``)."""
    quota = max(MIN_QUOTA_USEC, round(cores * PERIOD_USEC))
    return f"{quota} {PERIOD_USEC}"


def weight_value(weight: int) -> str:
    return str(weight)


def apply(group: Path, limits: Limits) -> None:
    if limits.cpu is not None:
        fs.write(group, "cpu.max", max_value(limits.cpu))
    if limits.cpu_weight is not None:
        fs.write(group, "cpu.weight", weight_value(limits.cpu_weight))


def stats(group: Path) -> dict[str, int]:
    """``cpu.stat`` as a dict (usage_usec, user_usec, system_usec, nr_throttled, ...).

    The core part of cpu.stat exists in every v2 group, even without the cpu controller.
    """
    text = fs.read_optional(group, "cpu.stat")
    return fs.parse_flat_keyed(text) if text is not None else {}
