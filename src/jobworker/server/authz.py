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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.errors import InvalidArgument, JobNotFound, PermissionDenied, Unauthenticated
from jobworker.identity import RESERVED_NAMES, Role, is_reserved
from jobworker.units import DURATION_FORM, parse_duration


class Action(enum.StrEnum):
    START = "start"
    STOP = "stop"
    STATUS = "status"
    LIST = "list"
    LOGS = "logs"
    WAIT = "wait"
    REMOVE = "remove"
    INPUT = "type into"
    """Write to a job's stdin or terminal (Attach): the right to start jobs, on a job the
    caller may act on."""


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
    (Role.ADMIN, Action.REMOVE): (_A, _A),
    (Role.USER, Action.REMOVE): (_A, _H),
    (Role.VIEWER, Action.REMOVE): (_D, _D),
    (Role.ADMIN, Action.INPUT): (_A, _A),
    (Role.USER, Action.INPUT): (_A, _H),
    (Role.VIEWER, Action.INPUT): (_D, _D),
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


_POLICY_TABLES: Final = {"roles", "run_as", "network", "runtime", "terminal"}
_RUN_AS_TABLES: Final = {"roles", "identities"}


@dataclass(frozen=True, slots=True)
class Policy:
    """Server-side settings per identity: ``roles[name]`` overrides the role in the certificate;
    ``run_as_identities[name]``, else ``run_as_roles[role]``, is the Unix account (``user`` or
    ``user:group``) the identity's jobs run as."""

    roles: Mapping[str, Role]
    run_as_roles: Mapping[Role, str] = field(default_factory=dict)
    run_as_identities: Mapping[str, str] = field(default_factory=dict)
    host_network_roles: frozenset[Role] | None = None
    """``[network] host = [...]``: the roles whose jobs may use the host's network (``None``:
    the daemon's setting, by default every role)."""
    runtime_roles: Mapping[Role, float] = field(default_factory=dict)
    """``[runtime] ROLE = "1h"``: the maximum runtime of the role's jobs in seconds, instead of
    the daemon's ``--max-runtime``."""
    terminal_roles: frozenset[Role] | None = None
    """``[terminal] allow = [...]``: the roles that may start terminal jobs and type into them
    (``None``: every role that may start jobs)."""

    def may_use_terminal(self, role: Role) -> bool:
        return self.terminal_roles is None or role in self.terminal_roles

    def account_for(self, identity: Identity) -> str | None:
        """The identity's own entry, else its role's, else ``None`` (the daemon decides)."""
        named = self.run_as_identities.get(identity.name)
        return named if named is not None else self.run_as_roles.get(identity.role)

    def accounts(self) -> set[str]:
        """Every account the policy names."""
        return {*self.run_as_roles.values(), *self.run_as_identities.values()}

    @classmethod
    def load(cls, path: Path) -> Policy:
        """Read a TOML policy file::

            [roles]               # identity -> role, overriding the certificate's
            alice = "admin"
            bob = "viewer"

            [run_as.roles]        # role -> Unix account
            admin = "root"        # root only when granted by name

            [run_as.identities]   # identity -> Unix account; before its role's entry
            alice = "alice:staff"

            [network]             # the roles whose jobs may use the host's network; the
            host = ["admin"]      # others must start them with --network none

            [runtime]             # role -> the longest its jobs may run (and the deadline of
            user = "1h"           # those that ask for none), instead of --max-runtime

            [terminal]            # the roles that may start terminal jobs (run -t) and
            allow = ["admin"]     # type into them; default: every role that may start jobs

        The old flat ``[run_as]`` table, which mixed identities and roles, is refused with a
        message saying how to rewrite it. Raises :class:`InvalidArgument` naming the file and
        entry when it is malformed, and ``OSError`` when it cannot be read.
        """
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise InvalidArgument(f"policy file {path}: {e}") from e

        def bad(message: str) -> InvalidArgument:
            return InvalidArgument(f"policy file {path}: {message}")

        unknown = sorted(set(data) - _POLICY_TABLES)
        if unknown:
            raise bad(
                f"unknown entry {unknown[0]!r}; the tables are [roles], [run_as.*], [network], "
                "[runtime] and [terminal]"
            )
        table = data.get("roles", {})
        if not isinstance(table, dict):
            raise bad("[roles] must be a table")
        roles: dict[str, Role] = {}
        for name, role in table.items():
            if is_reserved(name):
                raise bad(f"[roles] {name!r}: {_reserved_text(name)}")
            try:
                roles[name] = Role(role)
            except ValueError:
                raise bad(f"role {role!r} for {name!r} is not one of {', '.join(Role)}") from None
        run_as = data.get("run_as", {})
        if not isinstance(run_as, dict) or any(
            k not in _RUN_AS_TABLES or not isinstance(v, dict) for k, v in run_as.items()
        ):
            raise bad(_flat_run_as(run_as))
        by_role: dict[Role, str] = {}
        for role, account in run_as.get("roles", {}).items():
            if role not in set(Role):
                raise bad(
                    f"[run_as.roles] {role!r} is not a role ({', '.join(Role)}); an identity's "
                    "account goes in [run_as.identities]"
                )
            by_role[Role(role)] = _account(bad, f"[run_as.roles] {role}", account)
        by_name: dict[str, str] = {}
        for name, account in run_as.get("identities", {}).items():
            if is_reserved(name):
                raise bad(f"[run_as.identities] {name!r}: {_reserved_text(name)}")
            by_name[name] = _account(bad, f"[run_as.identities] {name}", account)
        network = data.get("network", {})
        if not isinstance(network, dict) or set(network) - {"host"}:
            raise bad('[network] takes one key, host = ["role", ...]')
        host_roles: frozenset[Role] | None = None
        if "host" in network:
            listed = network["host"]
            if not isinstance(listed, list) or any(r not in set(Role) for r in listed):
                raise bad(f"[network] host must list roles ({', '.join(Role)}), got {listed!r}")
            host_roles = frozenset(Role(r) for r in listed)
        runtime = data.get("runtime", {})
        if not isinstance(runtime, dict):
            raise bad('[runtime] must be a table of ROLE = "DURATION"')
        runtimes: dict[Role, float] = {}
        for role, value in runtime.items():
            if role not in set(Role):
                raise bad(f"[runtime] {role!r} is not a role ({', '.join(Role)})")
            if not isinstance(value, str | int | float):
                raise bad(f"[runtime] {role}: {value!r} is not a duration; use {DURATION_FORM}")
            try:
                runtimes[Role(role)] = parse_duration(value, f"[runtime] {role}")
            except InvalidArgument as e:
                raise bad(str(e)) from None
        return cls(roles, by_role, by_name, host_roles, runtimes, _terminal_roles(bad, data))


def _terminal_roles(
    bad: Callable[[str], InvalidArgument], data: Mapping[str, object]
) -> frozenset[Role] | None:
    """``[terminal] allow = ["role", ...]``, or ``None`` without the table."""
    table = data.get("terminal")
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) != {"allow"}:
        raise bad('[terminal] takes one key, allow = ["role", ...]')
    listed = table["allow"]
    if not isinstance(listed, list) or any(r not in set(Role) for r in listed):
        raise bad(f"[terminal] allow must list roles ({', '.join(Role)}), got {listed!r}")
    return frozenset(Role(r) for r in listed)


def _reserved_text(name: str) -> str:
    hint = "; a role's account goes in [run_as.roles]" if name.casefold() in set(Role) else ""
    reserved = ", ".join(sorted(RESERVED_NAMES))
    return f"{name!r} is a reserved name, never an identity ({reserved}){hint}"


def _account(bad: Callable[[str], InvalidArgument], where: str, account: object) -> str:
    if not isinstance(account, str) or not account.strip():
        raise bad(f'{where}: the account must be a non-empty "user" or "user:group"')
    return account


def _flat_run_as(run_as: object) -> str:
    """The one-line refusal of the old flat ``[run_as]`` table, with its rewrite."""
    if not isinstance(run_as, dict):
        return "run_as must hold the tables [run_as.roles] and [run_as.identities]"
    roles = [f"{k} = {v!r}" for k, v in run_as.items() if k in set(Role)]
    names = [f"{k} = {v!r}" for k, v in run_as.items() if k not in set(Role)]
    rewrite = "; ".join(
        f"[run_as.{table}] {', '.join(entries)}"
        for table, entries in (("roles", roles), ("identities", names))
        if entries
    )
    return (
        "the flat [run_as] table (identities and roles mixed) is no longer read; put roles' "
        "accounts under [run_as.roles] and identities' under [run_as.identities]"
        + (f", here: {rewrite}" if rewrite else "")
    )


def identity_from_certificate(pem: bytes, policy: Policy | None = None) -> Identity:
    """The identity of an already verified client certificate.

    Identity = the subject's common name, which must not be a reserved name
    (:data:`RESERVED_NAMES`: a role, ``ca`` or ``server``); role = the policy's entry for it,
    else the one organizational unit of the subject that names a role. A certificate without
    the clientAuth extended key usage is refused here too (the TLS layer already refuses it;
    this keeps the rule true if that ever changes).

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
    if is_reserved(name):
        raise Unauthenticated(
            f"the client certificate's common name {name!r} is a reserved name, not an "
            f"identity ({', '.join(sorted(RESERVED_NAMES))})"
        )
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


RevocationKey = tuple[bytes, int]
"""What a CRL names a certificate by: its issuer (DER) and serial number."""


def revocation_key(pem: bytes) -> RevocationKey:
    """The issuer and serial of a (verified) certificate. Raises :class:`Unauthenticated` for
    an unreadable one."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise Unauthenticated(f"unreadable peer certificate: {e}") from e
    return cert.issuer.public_bytes(), cert.serial_number


@dataclass(frozen=True, slots=True)
class Revocations:
    """The certificates the daemon refuses although they verify: the serials of an X.509 CRL
    (``worker certs revoke`` writes one) signed by one of the daemon's CA certificates.

    grpc's TLS layer cannot check a CRL it could reload, so the service checks every call
    against the current value (:meth:`check`); reloading replaces it."""

    revoked: frozenset[RevocationKey] = frozenset()
    path: Path | None = None
    next_update: datetime | None = None
    """The CRL's nextUpdate: after it the list is stale (still applied; the daemon warns)."""

    @classmethod
    def load(cls, path: Path, ca_pem: bytes) -> Revocations:
        """Read a PEM (or DER) CRL and check it is signed by a certificate in ``ca_pem``.

        Raises :class:`InvalidArgument` naming the file when it is unreadable, not a CRL, or
        not signed by the CA (a CRL anyone could write would let them lock users out, or
        hide a revocation by replacing it)."""
        try:
            data = path.read_bytes()
        except OSError as e:
            raise InvalidArgument(f"cannot read the CRL {path}: {e.strerror}") from e
        try:
            crl = (
                x509.load_pem_x509_crl(data)
                if data.lstrip().startswith(b"-----")
                else x509.load_der_x509_crl(data)
            )
        except ValueError as e:
            raise InvalidArgument(f"{path} is not a CRL (PEM or DER): {e}") from e
        try:
            cas = x509.load_pem_x509_certificates(ca_pem)
        except ValueError as e:
            raise InvalidArgument(f"the CA certificate is not PEM: {e}") from e
        if not any(ca.subject == crl.issuer and _signed_by(crl, ca) for ca in cas):
            raise InvalidArgument(
                f"the CRL {path} is not signed by the daemon's CA (issuer "
                f"{crl.issuer.rfc4514_string()!r}); make it with `worker certs revoke` in the "
                "CA's directory"
            )
        issuer = crl.issuer.public_bytes()
        return cls(
            frozenset((issuer, entry.serial_number) for entry in crl),
            path,
            crl.next_update_utc,
        )

    def stale(self, now: datetime) -> bool:
        """Whether the CRL is past its nextUpdate."""
        return self.next_update is not None and now > self.next_update

    def check(self, key: RevocationKey, name: str) -> None:
        """Raise :class:`Unauthenticated` ("certificate revoked") if ``key`` is on the list."""
        if key in self.revoked:
            raise Unauthenticated(
                f"certificate revoked: {name}'s certificate (serial {key[1]:#x}) is on the "
                "daemon's revocation list; ask an admin for a new one (worker certs renew)"
            )


def _signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    public = ca.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        return False
    return crl.is_signature_valid(public)
