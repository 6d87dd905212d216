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
    JobRunning,
    JobworkerError,
    LimitUnavailable,
    PermissionDenied,
    RemoteError,
    ResourceExhausted,
    ShuttingDown,
    SpawnError,
    StdinClosed,
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
    (JobRunning, "FAILED_PRECONDITION"),
    (StdinClosed, "FAILED_PRECONDITION"),
    (ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (ShuttingDown, "UNAVAILABLE"),
    (HostError, "INTERNAL"),
)

ERROR_TRAILER: Final = "jobworker-error"
"""Trailing metadata key naming the error's class (:func:`name_for`), so a client can tell
apart classes that share a code (a missing controller, a running job)."""

_FORWARD: Final = dict(ERROR_CODES)
_BY_NAME: Final = {cls.__name__: cls for cls, _ in ERROR_CODES}
_BACKWARD: Final[dict[str, type[JobworkerError]]] = {}
for _cls, _code in ERROR_CODES:
    _BACKWARD.setdefault(_code, _cls)


def _nearest(error: JobworkerError) -> type[JobworkerError] | None:
    for cls in type(error).__mro__:
        if cls in _FORWARD:
            return cls
    return None


def code_for(error: JobworkerError) -> str:
    """The status code name for an error: that of its nearest class in :data:`ERROR_CODES`."""
    cls = _nearest(error)
    return "INTERNAL" if cls is None else _FORWARD[cls]


def name_for(error: JobworkerError) -> str:
    """What the service sends in :data:`ERROR_TRAILER`: the nearest class's name."""
    cls = _nearest(error)
    return "HostError" if cls is None else cls.__name__


def error_for(
    code: str, message: str, job_id: str | None = None, name: str | None = None
) -> JobworkerError:
    """The error a client raises for a status code, its details and the trailer's class name.

    The named class wins when it belongs to the code (a daemon sends it); else the first class
    listed for the code. NOT_FOUND becomes :class:`JobNotFound` for ``job_id`` (which the
    caller knows); UNAVAILABLE, :class:`ShuttingDown`, also stands for a daemon that cannot be
    reached at all.
    """
    named = _BY_NAME.get(name or "")
    cls = named if named is not None and _FORWARD[named] == code else _BACKWARD.get(code)
    if cls is None:
        return RemoteError(code, message)
    if cls is JobNotFound:
        error: JobworkerError = JobNotFound(job_id or "")
        error.args = (message,) if message else error.args
        return error
    return cls(message)
