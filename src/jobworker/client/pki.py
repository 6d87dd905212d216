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
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobworker.identity import RESERVED_NAMES, Role

CA_DAYS = 3650
LEAF_DAYS = 90
"""Server and user certificates: short-lived, so a lost key is useful for weeks, not years
(renew with :func:`renew`). The CA lives :data:`CA_DAYS`."""
CRL_DAYS = 30
"""A CRL's nextUpdate: when relying parties should expect a fresher one (see :func:`revoke`)."""
CRL_FILE = "crl.pem"
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates are valid from slightly before ``now``, for peers whose clocks lag."""

DEFAULT_USERS: tuple[tuple[str, Role], ...] = (
    ("ops", Role.ADMIN),
    ("alice", Role.USER),
    ("vera", Role.VIEWER),
)
SERVER_DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")
ORGANIZATION = "jobworker"
"""Names no user may have (compared case-insensitively): the roles, so that a name is never
mistaken for one (workerd refuses such certificates too), and this directory's own stems."""
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PkiError(Exception):
    """The PKI request is invalid or would overwrite existing files."""


@dataclass(frozen=True, slots=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Pki:
    """Paths of what :func:`init_pki` wrote (or reused)."""

    dir: Path
    ca: CertPair
    server: CertPair
    users: dict[str, CertPair]


def parse_user(text: str) -> tuple[str, Role]:
    """Parse ``NAME:ROLE`` as given to ``--user``.

    Raises :class:`PkiError` when the name is not a plain file name or the role is unknown.
    """
    name, sep, role = text.partition(":")
    if not sep:
        raise PkiError(f"user {text!r} must be NAME:ROLE (roles: {', '.join(Role)})")
    return _check_name(name), _check_role(role)


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise PkiError(
            f"user name {name!r} must be 1-64 letters, digits, '.', '_' or '-', and start with a "
            "letter or digit"
        )
    if name.casefold() in RESERVED_NAMES:
        raise PkiError(
            f"user name {name!r} is reserved (not {', '.join(sorted(RESERVED_NAMES))}): a role "
            "name is never an identity; pick a person's or a service's name, e.g. ops:admin"
        )
    return name


def _check_role(role: str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise PkiError(f"unknown role {role!r}; roles are {', '.join(Role)}") from None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file: never through a symbolic link, never over an existing file (a
    replacement is unlinked first by the caller)."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode
        )
    except FileExistsError:
        raise PkiError(f"{path} already exists (use --force to replace it)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create(path, data, 0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    _create(path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def check_directory(directory: Path) -> None:
    """Refuse a PKI directory someone else could change files in: it must belong to the
    current user and not be writable by its group or others. Raises :class:`PkiError`."""
    st = directory.stat()
    if not stat.S_ISDIR(st.st_mode):
        raise PkiError(f"{directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise PkiError(
            f"{directory} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): its "
            "owner could replace the keys; use a directory of your own"
        )
    if st.st_mode & 0o022:
        raise PkiError(
            f"{directory} is writable by its group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): they could plant links or replace the keys; "
            f"run chmod go-w {directory}, or use another directory"
        )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime,
    days: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _leaf_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    now: datetime, days: int = CA_DAYS, common_name: str = "jobworker CA"
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate and its key."""
    key = _new_key()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    builder = (
        _builder(name, name, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(key, hashes.SHA256()), key


def _issue(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    subject: x509.Name,
    eku: x509.ObjectIdentifier,
    *,
    now: datetime,
    days: int,
    san: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_usage(), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def issue_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Iterable[str] = (),
    *,
    now: datetime | None = None,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A serverAuth certificate for the daemon; IP literals become IP SANs, the rest DNS SANs."""
    now = now or datetime.now(UTC)
    san: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in (*SERVER_DEFAULT_NAMES, *names):
        if not name or name in seen:
            continue
        seen.add(name)
        try:
            san.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            san.append(x509.DNSName(name))
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, "jobworker server"),
        ]
    )
    return _issue(
        ca_cert, ca_key, subject, ExtendedKeyUsageOID.SERVER_AUTH, now=now, days=days, san=san
    )


def issue_client(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    name: str,
    role: Role | str,
    *,
    now: datetime | None = None,
    days: int = LEAF_DAYS,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A clientAuth certificate: identity in CN, role in OU."""
    now = now or datetime.now(UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, _check_role(str(role)).value),
            x509.NameAttribute(NameOID.COMMON_NAME, _check_name(name)),
        ]
    )
    return _issue(ca_cert, ca_key, subject, ExtendedKeyUsageOID.CLIENT_AUTH, now=now, days=days)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read ``ca.pem``/``ca-key.pem`` from a PKI directory."""
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca-key.pem").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{directory / 'ca-key.pem'} is not an ECDSA key")
    return cert, key


def write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> CertPair:
    """Write ``STEM.pem`` (0644) and ``STEM-key.pem`` (0600) as new files (never through a
    symbolic link). Raises :class:`PkiError` when either already exists."""
    pair = CertPair(directory / f"{stem}.pem", directory / f"{stem}-key.pem")
    _write_key(pair.key, key)
    _write_cert(pair.cert, cert)
    return pair


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
