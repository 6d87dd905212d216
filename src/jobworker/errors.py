"""The one exception tree of jobworker.

::

    JobworkerError
    ├── InvalidArgument (also ValueError)   the caller's request is malformed
    │   └── SpawnError                      the command cannot be executed (not found, bad cwd, ...)
    ├── JobNotFound (also LookupError)      no such job, or not one the caller may see
    ├── PermissionDenied                    the caller's role forbids the action
    ├── LimitUnavailable                    a limit the host cannot enforce (controller missing)
    ├── ShuttingDown                        the manager is closing or closed
    └── HostError                           the host failed us (cgroupfs, state dir)

Each names who caused the problem. The gRPC service maps this tree to status codes in one table
(:mod:`jobworker.service`); the client maps the codes back to these classes.
"""

from __future__ import annotations


class JobworkerError(Exception):
    """Base of every error jobworker raises on purpose."""


class InvalidArgument(JobworkerError, ValueError):
    """The request is malformed: the message says which field and what is accepted."""


class SpawnError(InvalidArgument):
    """The command could not be executed; nothing was left behind."""


class JobNotFound(JobworkerError, LookupError):
    """No job with that id (or none the caller may see)."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class PermissionDenied(JobworkerError):
    """The caller's role does not allow the action."""


class LimitUnavailable(JobworkerError):
    """A requested limit needs a cgroup controller this host does not offer."""


class ShuttingDown(JobworkerError):
    """The manager is shutting down and accepts no new work."""


class HostError(JobworkerError):
    """An operation on the host failed (cgroupfs, state directory, spawner).

    The message names the path and value involved; the OS error is kept as ``__cause__``.
    """
