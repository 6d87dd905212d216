"""memory controller: ``memory.max`` with swap off and whole-group OOM kill; usage and events."""

from __future__ import annotations

from pathlib import Path

from jobworker.cgroup import fs
from jobworker.limits import Limits


def max_value(memory: int) -> str:
    return str(memory)


def apply(group: Path, limits: Limits) -> None:
    if limits.memory is None:
        return
    # memory.swap.max only exists when the kernel has swap accounting (CONFIG_MEMCG_SWAP);
    # without it the job cannot swap through this group anyway.
    if (group / "memory.swap.max").exists():
        fs.write(group, "memory.swap.max", "0")
    fs.write(group, "memory.max", max_value(limits.memory))
    # Kill the whole job on OOM rather than one arbitrary process of it (4.19+).
    if (group / "memory.oom.group").exists():
        fs.write(group, "memory.oom.group", "1")


def events(group: Path) -> dict[str, int]:
    """The group's own memory events: ``memory.events.local`` (5.2+) where present."""
    text = fs.read_optional(group, "memory.events.local")
    if text is None:
        text = fs.read_optional(group, "memory.events")
    return fs.parse_flat_keyed(text) if text is not None else {}


def stats(group: Path) -> dict[str, int]:
    """``current`` and ``peak`` (5.19+) in bytes; a key is missing when its file is."""
    out: dict[str, int] = {}
    for key in ("current", "peak"):
        text = fs.read_optional(group, f"memory.{key}")
        if text is not None and text.strip().isdigit():
            out[key] = int(text)
    return out
