"""How ``worker`` shows jobs: one-phrase outcomes, the status page, the list table and JSON."""

from __future__ import annotations

import dataclasses
import json
import shlex
import signal
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import click

from jobworker.limits import Limits
from jobworker.spec import JobState, JobStatus


def _safe(text: str) -> str:
    """``text`` with control characters escaped: an owner name or argv chosen by someone else
    must not send escape sequences to this terminal (JSON output is escaped by json)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def outcome(s: JobStatus) -> str:
    """One phrase: how the job is doing or how it ended."""
    if s.state is JobState.RUNNING:
        return "running"
    if s.exit_code is not None:
        how = f", exit code {s.exit_code}"
    elif s.signal is not None:
        how = f", killed by {signame(s.signal)}"
    else:
        how = ""
    if s.oom_killed:
        how += " (out of memory)"
    reason = f" ({_safe(s.reason)})" if s.reason else ""
    return f"{s.state.value}{reason}{how}"


def _short_exit(s: JobStatus) -> str:
    if s.exit_code is not None:
        return str(s.exit_code)
    if s.signal is not None:
        return signame(s.signal)
    return "-"


def _time(t: datetime | None) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _iso(t: datetime | None) -> str | None:
    return t.isoformat() if t else None


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def describe_limits(limits: Limits) -> str:
    parts: list[str] = []
    if limits.cpu is not None:
        parts.append(f"cpu={limits.cpu:g}")
    if limits.cpu_weight is not None:
        parts.append(f"cpu-weight={limits.cpu_weight}")
    if limits.memory is not None:
        parts.append(f"memory={_size(limits.memory)}")
    if limits.pids is not None:
        parts.append(f"pids={limits.pids}")
    for io in limits.io:
        caps = [
            f"{name}={value}"
            for name, value in (
                ("rbps", io.read_bps),
                ("wbps", io.write_bps),
                ("riops", io.read_iops),
                ("wiops", io.write_iops),
            )
            if value is not None
        ]
        parts.append(f"io[{io.device}]={','.join(caps)}")
    return " ".join(parts) or "none"


def status_json(s: JobStatus) -> dict[str, Any]:
    """The ``--json`` shape of one job (stable keys; times in ISO 8601 UTC)."""
    return {
        "id": s.id,
        "state": s.state.value,
        "pid": s.pid,
        "exit_code": s.exit_code,
        "signal": s.signal,
        "oom_killed": s.oom_killed,
        "reason": s.reason,
        "owner": s.owner,
        "argv": list(s.argv),
        "started_at": _iso(s.started_at),
        "ended_at": _iso(s.ended_at),
        "output_bytes": s.output_bytes,
        "limits": dataclasses.asdict(s.limits),
        "usage": dataclasses.asdict(s.usage) if s.usage is not None else None,
    }


def status_text(s: JobStatus) -> str:
    rows = [
        ("id", s.id),
        ("state", outcome(s)),
        ("owner", _safe(s.owner)),
        ("command", _safe(shlex.join(s.argv))),
        ("pid", str(s.pid)),
        ("started", _time(s.started_at)),
        ("ended", _time(s.ended_at)),
        ("output", _size(s.output_bytes)),
        ("limits", describe_limits(s.limits)),
    ]
    u = s.usage
    if u is not None:
        # Counters of a controller the job's group lacks read as zero (a hybrid host has only
        # cpu.stat): show the others when they say something.
        cpu = f"{u.cpu_user_usec / 1e6:.3f}s user, {u.cpu_system_usec / 1e6:.3f}s system"
        if u.nr_throttled:
            cpu += f", throttled {u.nr_throttled} times"
        rows.append(("cpu", cpu))
        if u.memory_current or u.memory_peak is not None:
            memory = _size(u.memory_current)
            if u.memory_peak is not None:
                memory += f" (peak {_size(u.memory_peak)})"
            rows.append(("memory", memory))
        if u.io_read_bytes or u.io_write_bytes:
            rows.append(("io", f"read {_size(u.io_read_bytes)}, written {_size(u.io_write_bytes)}"))
        if u.pids_current:
            rows.append(("tasks", str(u.pids_current)))
    return "\n".join(f"{name + ':':<9} {value}" for name, value in rows)


def list_text(jobs: Sequence[JobStatus]) -> str:
    header = ("ID", "STATE", "EXIT", "OWNER", "STARTED", "COMMAND")
    rows = [
        (
            s.id,
            s.state.value,
            _short_exit(s),
            _safe(s.owner),
            _time(s.started_at),
            _safe(shlex.join(s.argv)),
        )
        for s in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in [header, *rows]
    )


def echo_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))
