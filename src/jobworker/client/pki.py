"""A small offline PKI for development and small fleets (``worker certs init``).

Layout of a PKI directory::

    ca.pem, ca-key.pem            the certificate authority (keep ca-key.pem offline in production)
    server.pem, server-key.pem    the daemon (serverAuth; SANs localhost, 127.0.0.1, ::1 + names)
    NAME.pem, NAME-key.pem        one per user (clientAuth; CN=NAME, OU=ROLE)
    crl.pem                       the revoked certificates (``worker certs revoke``), CA-signed

Leaf certificates (server and users) are valid for :data:`LEAF_DAYS` (90) days: renew them
with ``worker certs renew NAME`` (:func:`renew`; a new key and serial, the same name and role).
A certificate is withdrawn before it expires with ``worker certs revoke NAME`` (:func:`revoke`),
which adds its serial to ``crl.pem``; workerd reads that at start and on SIGHUP.

All keys are ECDSA P-256: grpcio's BoringSSL does not accept Ed25519 certificates, and the TLS
setup in :mod:`jobworker.server.tls13` relies on the server key being ECDSA. Keys are written 0600.

Using your own CA instead: give the daemon ``--ca/--cert/--key``; client certificates must chain
to that CA, carry the clientAuth extended key usage, the identity in the subject's common name
and the role (``admin``, ``user`` or ``viewer``) in an organizational unit.

The clock is injectable (``now``) so tests can make certificates that are expired or not yet
valid.

This module is the directory (init, revoke, renew); making the keys and certificates and
writing them safely is :mod:`jobworker.client.issuing`, whose public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobworker.client.issuing import (
    CA_DAYS,
    CLOCK_SKEW,
    LEAF_DAYS,
    ORGANIZATION,
    SERVER_DEFAULT_NAMES,
    CertPair,
    PkiError,
    _check_name,
    _check_role,
    _create,
    check_directory,
    issue_client,
    issue_server,
    load_ca,
    make_ca,
    parse_user,
    write_pair,
)
from jobworker.identity import Role

__all__ = [
    "CA_DAYS",
    "CLOCK_SKEW",
    "CRL_DAYS",
    "CRL_FILE",
    "DEFAULT_USERS",
    "LEAF_DAYS",
    "ORGANIZATION",
    "SERVER_DEFAULT_NAMES",
    "CertPair",
    "Pki",
    "PkiError",
    "Revoked",
    "check_directory",
    "init_pki",
    "issue_client",
    "issue_server",
    "load_ca",
    "make_ca",
    "parse_user",
    "read_crl",
    "renew",
    "revoke",
    "write_pair",
]

CRL_DAYS = 30
"""A CRL's nextUpdate: when relying parties should expect a fresher one (see :func:`revoke`)."""
CRL_FILE = "crl.pem"
DEFAULT_USERS: tuple[tuple[str, Role], ...] = (
    ("ops", Role.ADMIN),
    ("alice", Role.USER),
    ("vera", Role.VIEWER),
)


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of what :func:`init_pki` wrote (or reused)."""

    dir: Path
    ca: CertPair
    server: CertPair
    users: dict[str, CertPair]


def init_pki(
    directory: Path,
    users: Sequence[tuple[str, Role | str]] = (),
    server_names: Sequence[str] = (),
    *,
    now: datetime | None = None,
    force: bool = False,
) -> Pki:
    """Create (or extend) a PKI directory.

    An existing CA (``ca.pem`` + ``ca-key.pem``) is reused, so running this again with new
    ``users`` adds them; otherwise a new CA is made. The server certificate is made when missing.
    ``users`` defaults to :data:`DEFAULT_USERS` when a new CA is made. ``force`` starts over: a
    new CA, server and user certificates, replacing existing files.

    Raises :class:`PkiError` when a file to be written already exists (unless ``force``; a
    symbolic link counts, dangling or not), when the directory holds only one of ``ca.pem`` and
    ``ca-key.pem`` (unless ``force``: a CA whose key was moved away is not replaced), when the
    directory is not the current user's or is writable by others, or when a name or role is
    invalid. Nothing is written when validation fails.
    """
    now = now or datetime.now(UTC)
    checked = [(_check_name(n), _check_role(str(r))) for n, r in users]
    if len({n for n, _ in checked}) != len(checked):
        raise PkiError("a user name is given more than once")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_directory(directory)
    os.chmod(directory, 0o700)
    have_cert, have_key = (os.path.lexists(directory / n) for n in ("ca.pem", "ca-key.pem"))
    if have_cert != have_key and not force:
        there, missing = ("ca.pem", "ca-key.pem") if have_cert else ("ca-key.pem", "ca.pem")
        raise PkiError(
            f"{directory} has {there} but no {missing}: refusing to make a new CA over it (if "
            "the CA key was moved offline, bring it back to add users; --force starts over)"
        )
    fresh = force or not have_cert
    if fresh and not checked:
        checked = list(DEFAULT_USERS)
    make_server = fresh or not os.path.lexists(directory / "server.pem")
    stems = [n for n, _ in checked] + (["server"] if make_server else [])
    if fresh:
        stems.append("ca")
    paths = [directory / f"{stem}{suffix}" for stem in stems for suffix in (".pem", "-key.pem")]
    if not force:
        for p in paths:
            if os.path.lexists(p):
                raise PkiError(f"{p} already exists (use --force to replace it)")
    else:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()  # a symbolic link itself, never its target

    if not fresh:
        ca_cert, ca_key = load_ca(directory)
        ca = CertPair(directory / "ca.pem", directory / "ca-key.pem")
    else:
        ca_cert, ca_key = make_ca(now)
        ca = write_pair(directory, "ca", ca_cert, ca_key)
    if make_server:
        server = write_pair(
            directory, "server", *issue_server(ca_cert, ca_key, server_names, now=now)
        )
    else:
        server = CertPair(directory / "server.pem", directory / "server-key.pem")
    written = {
        name: write_pair(directory, name, *issue_client(ca_cert, ca_key, name, role, now=now))
        for name, role in checked
    }
    return Pki(directory, ca, server, written)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"{path} does not exist: no certificate of that name here") from None
    except ValueError as e:
        raise PkiError(f"{path} is not a PEM certificate: {e}") from e


def _check_stem(name: str) -> str:
    """A certificate's stem in the directory: a user name, or ``server``."""
    return name if name == "server" else _check_name(name)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically: a new file next to it (never through a link), renamed over
    it (a symbolic link at ``path`` is replaced, its target untouched)."""
    tmp = path.with_name(f".{path.name}.new")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    _create(tmp, data, mode)
    os.replace(tmp, path)


def read_crl(directory: Path, ca_cert: x509.Certificate) -> x509.CertificateRevocationList | None:
    """``crl.pem`` of a PKI directory (``None`` when there is none), checked to be the CA's."""
    path = directory / CRL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        crl = x509.load_pem_x509_crl(data)
    except ValueError as e:
        raise PkiError(f"{path} is not a PEM CRL: {e}") from e
    public = ca_cert.public_key()
    if crl.issuer != ca_cert.subject or not (
        isinstance(public, ec.EllipticCurvePublicKey) and crl.is_signature_valid(public)
    ):
        raise PkiError(f"{path} is not signed by this directory's CA; move it away to start over")
    return crl


@dataclass(frozen=True, slots=True)
class Revoked:
    """What :func:`revoke` did."""

    crl: Path
    serial: int
    already: bool
    """The serial was already on the list (the CRL is re-signed anyway, with a new date)."""
    count: int
    next_update: datetime


def revoke(
    directory: Path, name: str, *, now: datetime | None = None, days: int = CRL_DAYS
) -> Revoked:
    """Add the serial of ``NAME.pem`` to ``crl.pem`` (made when missing), keeping the serials
    revoked before; the CRL is signed by the CA, valid from ``now`` to ``now + days``, and
    carries an increasing CRL number.

    Raises :class:`PkiError` when the name is invalid, ``NAME.pem`` is missing or not issued by
    this CA, the existing ``crl.pem`` is not this CA's, or the directory is not safe.
    """
    now = now or datetime.now(UTC)
    stem = _check_stem(name)
    check_directory(directory)
    ca_cert, ca_key = load_ca(directory)
    cert = _load_cert(directory / f"{stem}.pem")
    if cert.issuer != ca_cert.subject:
        raise PkiError(f"{directory / f'{stem}.pem'} was not issued by {directory / 'ca.pem'}")
    old = read_crl(directory, ca_cert)
    entries = list(old) if old is not None else []
    number = 0
    if old is not None:
        with contextlib.suppress(x509.ExtensionNotFound):
            number = old.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    already = any(e.serial_number == cert.serial_number for e in entries)
    if not already:
        entries.append(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now)
            .build()
        )
    next_update = now + timedelta(days=days)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - CLOCK_SKEW)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number + 1), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    for entry in entries:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    path = directory / CRL_FILE
    _replace(path, crl.public_bytes(serialization.Encoding.PEM), 0o644)
    return Revoked(path, cert.serial_number, already, len(entries), next_update)


def renew(
    directory: Path, name: str, *, now: datetime | None = None, days: int = LEAF_DAYS
) -> CertPair:
    """Re-issue ``NAME.pem``/``NAME-key.pem``: a new key and serial, valid from ``now`` for
    ``days``, with the same name and role (for ``server``: the same DNS names and IPs). Both
    files are replaced atomically, the key first. The old certificate stays valid until it
    expires unless it was revoked (revoke before renewing: revoke reads the serial from the
    current ``NAME.pem``).

    Raises :class:`PkiError` when the name is invalid, the certificate is missing, not issued
    by this CA or has no single role, or the directory is not safe.
    """
    now = now or datetime.now(UTC)
    stem = _check_stem(name)
    check_directory(directory)
    ca_cert, ca_key = load_ca(directory)
    path = directory / f"{stem}.pem"
    old = _load_cert(path)
    if old.issuer != ca_cert.subject:
        raise PkiError(f"{path} was not issued by {directory / 'ca.pem'}")
    if stem == "server":
        try:
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        names = [str(v) for v in san.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in san.get_values_for_type(x509.IPAddress)]
        cert, key = issue_server(ca_cert, ca_key, names, now=now, days=days)
    else:
        common = [str(a.value) for a in old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        if common != [stem]:
            raise PkiError(f"{path} is not {stem!r}'s certificate (its common name: {common})")
        units = {
            str(a.value)
            for a in old.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        }
        roles = sorted(units & set(Role))
        if len(roles) != 1:
            raise PkiError(f"{path} names no single role ({', '.join(Role)}) to keep")
        cert, key = issue_client(ca_cert, ca_key, stem, roles[0], now=now, days=days)
    pair = CertPair(path, directory / f"{stem}-key.pem")
    _replace(
        pair.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )
    _replace(pair.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return pair
