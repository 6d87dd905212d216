"""pids controller: ``pids.max`` and the current task count."""

from __future__ import annotations

from pathlib import Path

from jobworker.cgroup import fs
from jobworker.limits import Limits


def max_value(pids: int) -> str:
    return str(pids)


def apply(group: Path, limits: Limits) -> None:
    if limits.pids is not None:
        fs.write(group, "pids.max", max_value(limits.pids))


def stats(group: Path) -> dict[str, int]:
    """``current`` task count and ``max`` (times a fork was refused, from ``pids.events``)."""
    out: dict[str, int] = {}
    text = fs.read_optional(group, "pids.current")
    if text is not None and text.strip().isdigit():
        out["current"] = int(text)
    events = fs.read_optional(group, "pids.events")
    if events is not None:
        out["max"] = fs.parse_flat_keyed(events).get("max", 0)
    return out
