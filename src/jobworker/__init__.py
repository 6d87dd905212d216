"""jobworker: run Linux processes in their own cgroup v2, capture and stream their output.

The public library API is re-exported here; the modules behind it are private machinery.
The core (this package minus ``api``, ``server`` and ``client``) does not import grpc.

Names are imported on first use (PEP 562), so that importing one light module of the package
(the CLI's, for one) does not pull in the whole library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobworker.errors import (
        HostError,
        InvalidArgument,
        JobNotFound,
        JobworkerError,
        LimitUnavailable,
        PermissionDenied,
        ResourceExhausted,
        ShuttingDown,
        SpawnError,
    )
    from jobworker.limits import IOLimit, Limits
    from jobworker.manager import JobManager
    from jobworker.spec import Credentials, JobSpec, JobState, JobStatus, Network, Sandbox, Usage

_HOMES = {
    **dict.fromkeys(
        (
            "HostError",
            "InvalidArgument",
            "JobNotFound",
            "JobworkerError",
            "LimitUnavailable",
            "PermissionDenied",
            "ResourceExhausted",
            "ShuttingDown",
            "SpawnError",
        ),
        "jobworker.errors",
    ),
    "IOLimit": "jobworker.limits",
    "Limits": "jobworker.limits",
    "JobManager": "jobworker.manager",
    **dict.fromkeys(
        ("Credentials", "JobSpec", "JobState", "JobStatus", "Network", "Sandbox", "Usage"),
        "jobworker.spec",
    ),
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'jobworker' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "Credentials",
    "HostError",
    "IOLimit",
    "InvalidArgument",
    "JobManager",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobworkerError",
    "LimitUnavailable",
    "Limits",
    "Network",
    "PermissionDenied",
    "ResourceExhausted",
    "Sandbox",
    "ShuttingDown",
    "SpawnError",
    "Usage",
]
