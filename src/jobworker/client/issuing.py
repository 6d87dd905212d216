"""Making a jobworker PKI's ECDSA keys and X.509 certificates (the CA, the server's, the users') and
writing them safely, for :mod:`jobworker.client.pki`."""

from __future__ import annotations

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
(renew with :func:`~jobworker.client.pki.renew`). The CA lives :data:`CA_DAYS`."""
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates are valid from slightly before ``now``, for peers whose clocks lag."""

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
