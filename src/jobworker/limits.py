"""Resource limits: one value type shared by the library, the API and the CLI."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class IOLimit:
    """Bandwidth and IOPS caps for one block device (``io.max``); ``None`` = unlimited."""

    device: str
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


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

    def is_empty(self) -> bool:
        return (
            self.cpu is None
            and self.cpu_weight is None
            and self.memory is None
            and not self.io
            and self.pids is None
        )
