"""jobworker: run Linux processes in their own cgroup v2, capture and stream their output.

The public library API is re-exported here; the modules behind it are private machinery.
The core (this package minus ``api``, ``server`` and ``client``) does not import grpc.
"""

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
