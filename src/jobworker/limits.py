"""Resource limits: the value types shared by the library, the API and the CLI.

Every value is validated when a :class:`Limits` or :class:`IOLimit` is built, so a bad limit
never reaches the host; errors are :class:`~jobworker.errors.InvalidArgument` naming the field
and the accepted form. Human text is parsed with :mod:`jobworker.units` (:meth:`Limits.parse`,
:meth:`IOLimit.parse`). These are pure values: resolving io devices on the host is
:mod:`jobworker.cgroup.devices`, defaults and maximums are the daemon's
(:mod:`jobworker.server.policy`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from jobworker.errors import InvalidArgument
from jobworker.units import SIZE_FORM, is_int, parse_count, parse_float, parse_rate, parse_size

MIN_CPU = 0.01
"""cpu.max refuses a quota under 1 ms per 100 ms period."""
MAX_CPU = 8192.0
"""No machine Linux runs on has more CPUs (NR_CPUS tops out at 8192)."""
MIN_WEIGHT, MAX_WEIGHT = 1, 10_000
DEFAULT_WEIGHT = 100
"""The kernel's cpu.weight for a group that sets none."""
MIN_MEMORY = 1 << 20
"""Below 1 MiB a process cannot even be executed."""
MAX_BYTES = (1 << 63) - 1
"""The largest value cgroupfs accepts (s64) and far beyond any machine."""
MAX_PIDS = 4_194_304
"""PID_MAX_LIMIT: the kernel never has more tasks."""
MAX_IOPS = (1 << 63) - 1

_CPU_FORM = f"a number of cores from {MIN_CPU} to {MAX_CPU:g}, e.g. 0.5 or 2"
_IO_FORM = (
    "DEV=RATE (read and write bytes/s) or DEV=KEY=VALUE[,KEY=VALUE...] with keys "
    "rbps, wbps (bytes/s, e.g. 10M), riops, wiops (operations/s); DEV is a block device "
    "path or MAJ:MIN, e.g. /dev/sda=10M or 8:0=wbps=5M,riops=100"
)


def parse_cpu(text: str | float) -> float:
    """Cores, fractional: ``"0.5"``, ``"2"``."""
    value = parse_float(text, "cpu", _CPU_FORM)
    _check_cpu(value)
    return value


def parse_pids(text: str | int) -> int:
    return parse_count(text, "pids", MAX_PIDS, f"a number of tasks from 1 to {MAX_PIDS}")


def parse_cpu_weight(text: str | int) -> int:
    return parse_count(
        text, "cpu_weight", MAX_WEIGHT, f"a relative weight from {MIN_WEIGHT} to {MAX_WEIGHT}"
    )


def _check_cpu(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"cpu: {value!r} is not a number; use {_CPU_FORM}")
    if not MIN_CPU <= value <= MAX_CPU:
        raise InvalidArgument(f"cpu must be {_CPU_FORM}, got {value!r}")


def _check_int(field: str, value: object, lower: int, upper: int, form: str) -> None:
    if not is_int(value):
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
    ``MAJ:MIN`` (:func:`jobworker.cgroup.devices.resolve_device`) when the limit is checked
    against the host.
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
                kwargs[attr] = parse_count(
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
                f"a number of bytes of at least {MIN_MEMORY} (1M); {SIZE_FORM}",
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


__all__ = [
    "IOLimit",
    "Limits",
    "parse_cpu",
    "parse_cpu_weight",
    "parse_io",
    "parse_pids",
    "parse_rate",
    "parse_size",
]
