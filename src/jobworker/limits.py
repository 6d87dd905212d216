"""Resource limits: one value type shared by the library, the API and the CLI.

Human units are parsed here and only here (:func:`parse_size`, :func:`parse_cpu`,
:func:`parse_rate`, :func:`parse_io`, :meth:`Limits.parse`). Every value is validated when a
:class:`Limits` or :class:`IOLimit` is built, so a bad limit never reaches the host; errors are
:class:`~jobworker.errors.InvalidArgument` naming the field and the accepted form.

Sizes and rates use powers of 1024 (``K``, ``M``, ``G``, ``T``; ``KiB``... and ``KB``... are
accepted as the same), like systemd and cgroupfs users expect.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path

from jobworker.errors import InvalidArgument

MIN_CPU = 0.01
"""cpu.max refuses a quota under 1 ms per 100 ms period."""
MAX_CPU = 8192.0
"""No machine Linux runs on has more CPUs (NR_CPUS tops out at 8192)."""
MIN_WEIGHT, MAX_WEIGHT = 1, 10_000
MIN_MEMORY = 1 << 20
"""Below 1 MiB a process cannot even be executed."""
MAX_BYTES = (1 << 63) - 1
"""The largest value cgroupfs accepts (s64) and far beyond any machine."""
MAX_PIDS = 4_194_304
"""PID_MAX_LIMIT: the kernel never has more tasks."""
MAX_IOPS = (1 << 63) - 1

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE_RE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)
_MAJMIN_RE = re.compile(r"(\d+):(\d+)")

_SIZE_FORM = "bytes, or a number with K, M, G or T (powers of 1024), e.g. 1024, 512M, 1.5G"
_RATE_FORM = "bytes per second, or a number with K, M, G or T, e.g. 10M or 10M/s"
_CPU_FORM = f"a number of cores from {MIN_CPU} to {MAX_CPU:g}, e.g. 0.5 or 2"
_IO_FORM = (
    "DEV=RATE (read and write bytes/s) or DEV=KEY=VALUE[,KEY=VALUE...] with keys "
    "rbps, wbps (bytes/s, e.g. 10M), riops, wiops (operations/s); DEV is a block device "
    "path or MAJ:MIN, e.g. /dev/sda=10M or 8:0=wbps=5M,riops=100"
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _scaled(text: str, field: str, form: str) -> int:
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise InvalidArgument(f"{field}: {text!r} is not understood; use {form}")
    try:
        value = Decimal(m.group(1)) * _UNITS[m.group(2).upper()]
    except InvalidOperation as e:  # pragma: no cover - the regex admits only decimals
        raise InvalidArgument(f"{field}: {text!r} is not understood; use {form}") from e
    if value != value.to_integral_value():
        raise InvalidArgument(f"{field}: {text!r} is not a whole number of bytes; use {form}")
    return int(value)


def parse_size(text: str | int, field: str = "memory") -> int:
    """``"512M"`` -> 536870912; ``"1.5G"``; ``"1024"`` (bytes). Must be positive."""
    value = text if _is_int(text) else _scaled(str(text), field, _SIZE_FORM)
    assert isinstance(value, int)
    if value <= 0:
        raise InvalidArgument(f"{field} must be positive, got {text!r}; use {_SIZE_FORM}")
    return value


def parse_rate(text: str | int, field: str = "io rate") -> int:
    """Bytes per second: ``"10M"``, ``"10M/s"``, ``"10MiB/s"``, ``"1048576"``."""
    if _is_int(text):
        value = text
    else:
        raw = str(text).strip()
        raw = raw[:-2] if raw.lower().endswith("/s") else raw
        value = _scaled(raw, field, _RATE_FORM)
    assert isinstance(value, int)
    if value <= 0:
        raise InvalidArgument(f"{field} must be positive, got {text!r}; use {_RATE_FORM}")
    return value


def parse_cpu(text: str | float) -> float:
    """Cores, fractional: ``"0.5"``, ``"2"``."""
    if isinstance(text, bool):
        raise InvalidArgument(f"cpu: {text!r} is not a number; use {_CPU_FORM}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        try:
            value = float(text.strip())
        except ValueError:
            raise InvalidArgument(f"cpu: {text!r} is not a number; use {_CPU_FORM}") from None
    _check_cpu(value)
    return value


def _parse_count(text: str | int, field: str, upper: int, form: str) -> int:
    if _is_int(text):
        value = text
    else:
        raw = str(text).strip()
        if not raw.isdigit():
            raise InvalidArgument(f"{field}: {text!r} is not a whole number; use {form}")
        value = int(raw)
    assert isinstance(value, int)
    if not 1 <= value <= upper:
        raise InvalidArgument(f"{field} must be from 1 to {upper}, got {text!r}")
    return value


def parse_pids(text: str | int) -> int:
    return _parse_count(text, "pids", MAX_PIDS, f"a number of tasks from 1 to {MAX_PIDS}")


def parse_cpu_weight(text: str | int) -> int:
    return _parse_count(
        text, "cpu_weight", MAX_WEIGHT, f"a relative weight from {MIN_WEIGHT} to {MAX_WEIGHT}"
    )


def _check_cpu(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"cpu: {value!r} is not a number; use {_CPU_FORM}")
    if not MIN_CPU <= value <= MAX_CPU:
        raise InvalidArgument(f"cpu must be {_CPU_FORM}, got {value!r}")


def _check_int(field: str, value: object, lower: int, upper: int, form: str) -> None:
    if not _is_int(value):
        raise InvalidArgument(f"{field} must be {form}, got {value!r}")
    assert isinstance(value, int)
    if not lower <= value <= upper:
        raise InvalidArgument(f"{field} must be {form}, got {value!r}")


_IO_KEYS = {
    "rbps": "read_bps",
    "wbps": "write_bps",
    "riops": "read_iops",
    "wiops": "write_iops",
    "read_bps": "read_bps",
    "write_bps": "write_bps",
    "read_iops": "read_iops",
    "write_iops": "write_iops",
}


@dataclass(frozen=True, slots=True)
class IOLimit:
    """Bandwidth and IOPS caps for one block device (``io.max``); ``None`` = unlimited.

    ``device`` is a block device path or ``MAJ:MIN``; it is resolved to the whole disk's
    ``MAJ:MIN`` (:func:`resolve_device`) when the limit is checked against the host.
    """

    device: str
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise InvalidArgument(f"io device must be a block device path or MAJ:MIN; {_IO_FORM}")
        if "\0" in self.device or "\n" in self.device or " " in self.device:
            raise InvalidArgument(f"io device {self.device!r} contains a space, newline or NUL")
        values = {
            "read_bps": self.read_bps,
            "write_bps": self.write_bps,
            "read_iops": self.read_iops,
            "write_iops": self.write_iops,
        }
        for name, value in values.items():
            if value is not None:
                _check_int(
                    f"io {self.device} {name}", value, 1, MAX_BYTES, "a positive whole number"
                )
        if all(v is None for v in values.values()):
            raise InvalidArgument(
                f"io limit for {self.device} sets nothing; give at least one of "
                "rbps, wbps, riops, wiops"
            )

    @classmethod
    def parse(cls, text: str) -> IOLimit:
        """CLI form: ``DEV=RATE`` caps read and write bandwidth; ``DEV=wbps=5M,riops=100``."""
        device, sep, spec = text.partition("=")
        if not sep or not device.strip() or not spec.strip():
            raise InvalidArgument(f"io: {text!r} is not understood; use {_IO_FORM}")
        device = device.strip()
        if "=" not in spec:
            rate = parse_rate(spec, f"io {device}")
            return cls(device, read_bps=rate, write_bps=rate)
        kwargs: dict[str, int] = {}
        for item in spec.split(","):
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            attr = _IO_KEYS.get(key)
            if not sep or attr is None:
                raise InvalidArgument(f"io: {item!r} in {text!r} is not understood; use {_IO_FORM}")
            if attr in kwargs:
                raise InvalidArgument(f"io: {key} is given twice in {text!r}")
            if attr.endswith("bps"):
                kwargs[attr] = parse_rate(value, f"io {device} {key}")
            else:
                kwargs[attr] = _parse_count(
                    value, f"io {device} {key}", MAX_IOPS, "operations per second, e.g. 100"
                )
        return cls(device, **kwargs)


def parse_io(text: str) -> IOLimit:
    """Same as :meth:`IOLimit.parse`."""
    return IOLimit.parse(text)


@dataclass(frozen=True, slots=True)
class Limits:
    """Hard limits for one job; ``None`` (or empty) means "not limited"."""

    cpu: float | None = None
    """CPU bandwidth in cores (0.5 = half a CPU) -> ``cpu.max``."""
    cpu_weight: int | None = None
    """Relative CPU share, 1..10000 -> ``cpu.weight``."""
    memory: int | None = None
    """Bytes -> ``memory.max`` (swap off, whole group OOM-killed together)."""
    io: tuple[IOLimit, ...] = ()
    pids: int | None = None
    """Maximum number of tasks -> ``pids.max``."""

    def __post_init__(self) -> None:
        if self.cpu is not None:
            _check_cpu(self.cpu)
            object.__setattr__(self, "cpu", float(self.cpu))
        if self.cpu_weight is not None:
            _check_int(
                "cpu_weight",
                self.cpu_weight,
                MIN_WEIGHT,
                MAX_WEIGHT,
                f"a whole number from {MIN_WEIGHT} to {MAX_WEIGHT}",
            )
        if self.memory is not None:
            _check_int(
                "memory",
                self.memory,
                MIN_MEMORY,
                MAX_BYTES,
                f"a number of bytes of at least {MIN_MEMORY} (1M); {_SIZE_FORM}",
            )
        if self.pids is not None:
            _check_int("pids", self.pids, 1, MAX_PIDS, f"a whole number from 1 to {MAX_PIDS}")
        if isinstance(self.io, IOLimit) or not isinstance(self.io, Iterable):
            raise InvalidArgument("io must be a list of per-device limits")
        io = tuple(self.io)
        seen: set[str] = set()
        for item in io:
            if not isinstance(item, IOLimit):
                raise InvalidArgument(f"io entries must be IOLimit values, got {item!r}")
            if item.device in seen:
                raise InvalidArgument(f"io: device {item.device} is given more than once")
            seen.add(item.device)
        object.__setattr__(self, "io", io)

    @classmethod
    def parse(
        cls,
        *,
        cpu: str | float | None = None,
        cpu_weight: str | int | None = None,
        memory: str | int | None = None,
        io: Iterable[str] = (),
        pids: str | int | None = None,
    ) -> Limits:
        """Build from human text (CLI flags, config files): ``memory="512M"``, ``cpu="0.5"``,
        ``io=["/dev/sda=10M"]``, ``pids="100"``. ``None`` leaves a limit unset."""
        return cls(
            cpu=None if cpu is None else parse_cpu(cpu),
            cpu_weight=None if cpu_weight is None else parse_cpu_weight(cpu_weight),
            memory=None if memory is None else parse_size(memory, "memory"),
            io=tuple(parse_io(i) for i in io),
            pids=None if pids is None else parse_pids(pids),
        )

    def is_empty(self) -> bool:
        return (
            self.cpu is None
            and self.cpu_weight is None
            and self.memory is None
            and not self.io
            and self.pids is None
        )

    def with_defaults(self, defaults: Limits) -> Limits:
        """These limits, with every unset field taken from ``defaults``.

        io is per device: a default for a device the request does not mention is added.
        """
        own = {i.device for i in self.io}
        return Limits(
            cpu=defaults.cpu if self.cpu is None else self.cpu,
            cpu_weight=defaults.cpu_weight if self.cpu_weight is None else self.cpu_weight,
            memory=defaults.memory if self.memory is None else self.memory,
            io=self.io + tuple(i for i in defaults.io if i.device not in own),
            pids=defaults.pids if self.pids is None else self.pids,
        )

    def resolved(self, *, sysfs: Path = Path("/sys")) -> Limits:
        """The same limits with every io device as its whole disk's ``MAJ:MIN``."""
        if not self.io:
            return self
        return replace(
            self,
            io=tuple(replace(i, device=resolve_device(i.device, sysfs=sysfs)) for i in self.io),
        )


def _fmt_bytes(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def check_caps(limits: Limits, caps: Limits) -> None:
    """Refuse limits above the daemon's maximums (``caps``; an unset cap means "no maximum").

    A limit left unset where a cap exists counts as unlimited, so it is refused too: apply
    defaults first (:meth:`Limits.with_defaults`, or :func:`effective_limits`). io caps are
    matched by device string: give both sides the same form (see :meth:`Limits.resolved`).
    Raises :class:`InvalidArgument` naming the field, the request and the maximum.
    """

    def refuse(field: str, asked: str, cap: str) -> None:
        raise InvalidArgument(f"{field}: {asked} is above this daemon's maximum of {cap}")

    if caps.cpu is not None and (limits.cpu is None or limits.cpu > caps.cpu):
        refuse(
            "cpu", "unlimited" if limits.cpu is None else f"{limits.cpu:g} cores", f"{caps.cpu:g}"
        )
    if caps.cpu_weight is not None and (
        limits.cpu_weight is None or limits.cpu_weight > caps.cpu_weight
    ):
        refuse(
            "cpu_weight",
            "the default weight (100)" if limits.cpu_weight is None else str(limits.cpu_weight),
            str(caps.cpu_weight),
        )
    if caps.memory is not None and (limits.memory is None or limits.memory > caps.memory):
        asked = "unlimited" if limits.memory is None else _fmt_bytes(limits.memory)
        refuse("memory", asked, _fmt_bytes(caps.memory))
    if caps.pids is not None and (limits.pids is None or limits.pids > caps.pids):
        refuse("pids", "unlimited" if limits.pids is None else str(limits.pids), str(caps.pids))
    asked_io = {i.device: i for i in limits.io}
    for cap in caps.io:
        own = asked_io.get(cap.device)
        for name in ("read_bps", "write_bps", "read_iops", "write_iops"):
            limit = getattr(cap, name)
            if limit is None:
                continue
            value = None if own is None else getattr(own, name)
            if value is None or value > limit:
                refuse(
                    f"io {cap.device} {name}",
                    "unlimited" if value is None else str(value),
                    str(limit),
                )


def effective_limits(requested: Limits, defaults: Limits, caps: Limits) -> Limits:
    """What a job really gets: its request, unset fields from ``defaults`` and then from
    ``caps`` (a maximum is also the limit of a job that asks for nothing), checked against
    ``caps``. Raises :class:`InvalidArgument` when the request is above a cap."""
    limits = requested.with_defaults(defaults).with_defaults(caps)
    check_caps(limits, caps)
    return limits


def resolve_device(
    device: str,
    *,
    sysfs: Path = Path("/sys"),
    device_number: Callable[[str], tuple[int, int]] | None = None,
) -> str:
    """``MAJ:MIN`` of the whole disk for a block device path or ``MAJ:MIN``.

    A partition resolves to its disk (io.max only takes whole disks): the kernel's
    ``/sys/dev/block/MAJ:MIN`` of a partition has a ``partition`` file and lives in its disk's
    directory. ``device_number`` maps a path to (major, minor); the default stats it.
    Raises :class:`InvalidArgument` for a path that is not a block device or an unknown number.
    """
    m = _MAJMIN_RE.fullmatch(device.strip())
    if m is not None:
        major, minor = int(m.group(1)), int(m.group(2))
    elif device.startswith("/"):
        major, minor = (device_number or _device_number)(device)
    else:
        raise InvalidArgument(
            f"io device {device!r} must be a block device path (/dev/...) or MAJ:MIN"
        )
    node = sysfs / "dev" / "block" / f"{major}:{minor}"
    if not node.exists():
        shown = device if m is not None else f"{device} ({major}:{minor})"
        raise InvalidArgument(f"io device {shown} is not a known block device (no {node})")
    if (node / "partition").exists():
        disk = node.resolve().parent
        try:
            text = (disk / "dev").read_text().strip()
        except OSError as e:
            raise InvalidArgument(
                f"io device {device!r} is a partition whose disk cannot be found ({disk}/dev)"
            ) from e
        if _MAJMIN_RE.fullmatch(text) is None:
            raise InvalidArgument(f"io device {device!r}: unexpected {disk}/dev content {text!r}")
        return text
    return f"{major}:{minor}"


def _device_number(path: str) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidArgument(f"io device {path!r}: {e.strerror}") from e
    if not stat.S_ISBLK(st.st_mode):
        raise InvalidArgument(f"io device {path!r} is not a block device")
    return os.major(st.st_rdev), os.minor(st.st_rdev)


__all__ = [
    "IOLimit",
    "Limits",
    "check_caps",
    "effective_limits",
    "parse_cpu",
    "parse_cpu_weight",
    "parse_io",
    "parse_pids",
    "parse_rate",
    "parse_size",
    "resolve_device",
]
