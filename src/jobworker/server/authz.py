"""Who the caller is, and what it may do.

Identity comes only from the client certificate that the TLS layer verified against the CA: the
common name is the identity (and a job's owner), the role is the subject's organizational unit,
optionally overridden by a server-side policy file. Nothing a client sends in metadata is read.

The whole permission model is :data:`MATRIX`: role x action -> decision on the caller's own jobs
and on other identities' jobs. A hidden job answers exactly like a job that does not exist.

No grpc here: the service hands in the auth context as a plain mapping.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.errors import InvalidArgument, JobNotFound, PermissionDenied, Unauthenticated
from jobworker.identity import Role


class Action(enum.StrEnum):
    START = "start"
    STOP = "stop"
    STATUS = "status"
    LIST = "list"
    LOGS = "logs"
    WAIT = "wait"


class Decision(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    """PERMISSION_DENIED: the caller may see the job but not do this."""
    HIDE = "hide"
    """NOT_FOUND: the caller may not know the job exists."""


_A, _D, _H = Decision.ALLOW, Decision.DENY, Decision.HIDE

MATRIX: Final[Mapping[tuple[Role, Action], tuple[Decision, Decision]]] = {
    # (role, action):              (own job, other's job)
    (Role.ADMIN, Action.START): (_A, _A),
    (Role.ADMIN, Action.STOP): (_A, _A),
    (Role.ADMIN, Action.STATUS): (_A, _A),
    (Role.ADMIN, Action.LIST): (_A, _A),
    (Role.ADMIN, Action.LOGS): (_A, _A),
    (Role.ADMIN, Action.WAIT): (_A, _A),
    (Role.USER, Action.START): (_A, _A),
    (Role.USER, Action.STOP): (_A, _H),
    (Role.USER, Action.STATUS): (_A, _H),
    (Role.USER, Action.LIST): (_A, _H),
    (Role.USER, Action.LOGS): (_A, _H),
    (Role.USER, Action.WAIT): (_A, _H),
    (Role.VIEWER, Action.START): (_D, _D),
    (Role.VIEWER, Action.STOP): (_D, _D),
    (Role.VIEWER, Action.STATUS): (_A, _A),
    (Role.VIEWER, Action.LIST): (_A, _A),
    (Role.VIEWER, Action.LOGS): (_A, _A),
    (Role.VIEWER, Action.WAIT): (_A, _A),
}
"""The permission model. START has no job, so both columns are the same; LIST's columns say
which jobs appear in the listing."""


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    role: Role


def decide(identity: Identity, action: Action, owner: str | None = None) -> Decision:
    """The matrix lookup. ``owner`` is the job's owner (``None`` for START)."""
    own, other = MATRIX[identity.role, action]
    return own if owner is None or owner == identity.name else other


def authorize(
    identity: Identity, action: Action, job_id: str | None = None, owner: str | None = None
) -> None:
    """Raise unless ``identity`` may perform ``action`` (on the job ``job_id`` owned by ``owner``).

    Raises :class:`PermissionDenied` (forbidden on a visible job or without a job) or
    :class:`JobNotFound` (the job is hidden from the caller).
    """
    decision = decide(identity, action, owner)
    if decision is Decision.ALLOW:
        return
    if decision is Decision.HIDE:
        raise JobNotFound(job_id or "")
    target = f" job {job_id}" if job_id else " jobs"
    raise PermissionDenied(f"{identity.name} (role {identity.role}) may not {action}{target}")


def visible(identity: Identity, owner: str) -> bool:
    """Whether a job owned by ``owner`` appears in ``identity``'s listing."""
    return decide(identity, Action.LIST, owner) is not Decision.HIDE


@dataclass(frozen=True, slots=True)
class Policy:
    """Server-side settings per identity: ``roles[name]`` overrides the role in the certificate;
    ``run_as[name or role]`` is the Unix account (``user`` or ``user:group``) its jobs run as."""

    roles: Mapping[str, Role]
    run_as: Mapping[str, str] = field(default_factory=dict)

    def account_for(self, identity: Identity) -> str | None:
        """The identity's own entry, else its role's, else ``None`` (the daemon's default)."""
        return self.run_as.get(identity.name) or self.run_as.get(identity.role.value)

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read a TOML policy file::

            [roles]
            alice = "admin"
            bob = "viewer"

            [run_as]            # identity or role -> Unix account; default: the daemon's
            admin = "root"      # root only when granted by name
            alice = "alice:staff"

        Raises :class:`InvalidArgument` naming the file and entry when it is malformed, and
        ``OSError`` when it cannot be read.
        """
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"policy file {path}: {e}") from e
        table = data.get("roles", {})
        if not isinstance(table, dict):
            raise InvalidArgument(f"policy file {path}: [roles] must be a table")
        roles: dict[str, Role] = {}
        for name, role in table.items():
            try:
                roles[name] = Role(role)
            except ValueError:
                raise InvalidArgument(
                    f"policy file {path}: role {role!r} for {name!r} is not one of "
                    f"{', '.join(Role)}"
                ) from None
        run_as = data.get("run_as", {})
        if not isinstance(run_as, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in run_as.items()
        ):
            raise InvalidArgument(
                f'policy file {path}: [run_as] must map names to accounts ("user[:group]")'
            )
        return cls(roles, run_as)


def identity_from_certificate(pem: bytes, policy: Policy | None = None) -> Identity:
    """The identity of an already verified client certificate.

    Identity = the subject's common name; role = the policy's entry for it, else the one
    organizational unit of the subject that names a role. A certificate without the clientAuth
    extended key usage is refused here too (the TLS layer already refuses it; this keeps the
    rule true if that ever changes).

    Raises :class:`Unauthenticated` when any of that is missing or ambiguous.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise Unauthenticated(f"unreadable peer certificate: {e}") from e
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise Unauthenticated("the peer certificate is not for client authentication")
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(names) != 1 or not names[0]:
        raise Unauthenticated("the client certificate must have exactly one common name")
    name = names[0]
    if policy is not None and name in policy.roles:
        return Identity(name, policy.roles[name])
    units = {
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    }
    roles = sorted(units & set(Role))
    if len(roles) != 1:
        raise Unauthenticated(
            f"the client certificate of {name!r} must name exactly one role "
            f"({', '.join(Role)}) as its organizational unit"
        )
    return Identity(name, Role(roles[0]))


def identity_from_auth_context(
    auth_context: Mapping[str, Sequence[bytes]], policy: Policy | None = None
) -> Identity:
    """The caller's identity from a gRPC auth context (``ServicerContext.auth_context()``).

    gRPC fills ``x509_pem_cert`` only with the peer certificate that passed verification.
    Raises :class:`Unauthenticated` when there is none.
    """
    if auth_context.get("transport_security_type") != [b"ssl"]:
        raise Unauthenticated("the connection is not TLS")
    certs = auth_context.get("x509_pem_cert") or []
    if len(certs) != 1:
        raise Unauthenticated("no verified client certificate")
    return identity_from_certificate(certs[0], policy)
