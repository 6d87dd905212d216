"""The one exception tree of jobworker, used by the library, the daemon and the client.

::

    JobworkerError                          who is at fault                 gRPC status
    ├── InvalidArgument (also ValueError)   the caller: malformed request   INVALID_ARGUMENT
    │   └── SpawnError                      the caller: command cannot run  INVALID_ARGUMENT
    ├── JobNotFound (also LookupError)      the caller: no such job, or     NOT_FOUND
    │                                       not one it may see
    ├── PermissionDenied                    the caller: its role forbids    PERMISSION_DENIED
    │   └── Unauthenticated                 the caller: no usable identity  UNAUTHENTICATED
    ├── LimitUnavailable                    the host: controller missing    FAILED_PRECONDITION
    ├── JobRunning                          the caller: the job has not     FAILED_PRECONDITION
    │                                       ended (rm of a running job)
    ├── StdinClosed                         the caller: the job has no      FAILED_PRECONDITION
    │                                       open stdin (none, or it ended)
    ├── ResourceExhausted                   the host: out of processes or   RESOURCE_EXHAUSTED
    │                                       memory for now; try again
    ├── ShuttingDown                        nobody: the manager is closing  UNAVAILABLE
    │                                       (client: daemon unreachable)
    ├── HostError                           the host: cgroupfs, state dir   INTERNAL
    │   ├── GroupGone                       the host: the cgroup vanished   INTERNAL
    │   └── SpawnerDied                     the host: the spawner process   INTERNAL
    │                                       died (its jobs run on)
    ├── ConfigError                         the local user: certificates,   (client only)
    │                                       keys, settings, PKI files
    └── RemoteError                         the transport or the daemon:    any other code
                                            a status outside the table

The status codes are mapped in one table (:mod:`jobworker.api.errors`): the service turns a
raised error into its code there (and names the class in the ``jobworker-error`` trailer, for
codes several classes share), and the client turns them back into the class.
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


class Unauthenticated(PermissionDenied):
    """The peer presented no usable identity (no verified certificate, or no role)."""


class LimitUnavailable(JobworkerError):
    """A requested limit needs a cgroup controller this host does not offer."""


class JobRunning(JobworkerError):
    """The request needs an ended job, and this one still runs (remove it after it ends)."""


class StdinClosed(JobworkerError):
    """The job has no stdin to write to: started without ``stdin`` or a terminal, or its
    stdin is closed (the job ended, or a client ended its input)."""


class ResourceExhausted(JobworkerError):
    """The host has no room for the request right now (fork failed with EAGAIN or ENOMEM:
    out of processes or memory); the message names the cause. Trying later may work."""


class ShuttingDown(JobworkerError):
    """The manager is shutting down and accepts no new work."""


class HostError(JobworkerError):
    """An operation on the host failed (cgroupfs, state directory, spawner).

    The message names the path and value involved; the OS error is kept as ``__cause__``.
    """


class GroupGone(HostError):
    """The cgroup directory itself no longer exists (the job ended and its group was removed,
    or someone else removed it): not a missing controller, which is :class:`LimitUnavailable`.
    The message names the group."""


class ConfigError(JobworkerError):
    """The local configuration is unusable: a certificate or key missing or invalid, no user
    picked, a PKI file that would be overwritten (the CLI exits 78)."""


class RemoteError(JobworkerError):
    """A status code outside the error table (deadline, cancellation, a transport failure the
    daemon did not choose); ``code`` is the ``grpc.StatusCode`` name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})" if message else code)
        self.code = code


class SpawnerDied(HostError):
    """The spawner process is gone (it exited, was killed, or was closed).

    Raised by a spawn in flight or made afterwards (the job may or may not have been started:
    its cgroup tells), and set on every outstanding exit status: that process may still be
    running, re-parented to the nearest subreaper or init, but its exit status cannot be known.
    """
