"""The one table between the :mod:`jobworker.errors` tree and gRPC status codes.

The service maps a raised error to its code with :func:`code_for`; the client maps a code back to
the class with :func:`error_for`. Codes are named by their ``grpc.StatusCode`` member name, so
this module does not import grpc.
"""

from __future__ import annotations

from typing import Final

from jobworker.errors import (
    HostError,
    InvalidArgument,
    JobNotFound,
    JobworkerError,
    LimitUnavailable,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    SpawnError,
    Unauthenticated,
)

ERROR_CODES: Final[tuple[tuple[type[JobworkerError], str], ...]] = (
    # (error class, grpc.StatusCode name); a client gets back the first class listed for a code.
    (InvalidArgument, "INVALID_ARGUMENT"),
    (SpawnError, "INVALID_ARGUMENT"),
    (JobNotFound, "NOT_FOUND"),
    (Unauthenticated, "UNAUTHENTICATED"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (LimitUnavailable, "FAILED_PRECONDITION"),
    (ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (ShuttingDown, "UNAVAILABLE"),
    (HostError, "INTERNAL"),
)

_FORWARD: Final = dict(ERROR_CODES)
_BACKWARD: Final[dict[str, type[JobworkerError]]] = {}
for _cls, _code in ERROR_CODES:
    _BACKWARD.setdefault(_code, _cls)


def code_for(error: JobworkerError) -> str:
    """The status code name for an error: that of its nearest class in :data:`ERROR_CODES`."""
    for cls in type(error).__mro__:
        if cls in _FORWARD:
            return _FORWARD[cls]
    return "INTERNAL"


def error_for(code: str, message: str, job_id: str | None = None) -> JobworkerError:
    """The error a client raises for a status code and its details.

    NOT_FOUND becomes :class:`JobNotFound` for ``job_id`` (which the caller knows); UNAVAILABLE,
    :class:`ShuttingDown`, also stands for a daemon that cannot be reached at all.
    """
    cls = _BACKWARD.get(code)
    if cls is None:
        return RemoteError(code, message)
    if cls is JobNotFound:
        error: JobworkerError = JobNotFound(job_id or "")
        error.args = (message,) if message else error.args
        return error
    return cls(message)
