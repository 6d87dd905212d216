"""Mutual TLS material, shared by the daemon and the client: reads and checks the PEM files of
one side of a connection and hands out bytes.

All keys must be ECDSA: the daemon's TLS-1.3-only rule (:mod:`jobworker.server.tls13`) depends
on the server key being one. This module does not import grpc and changes no process state.

The full check parses the files with ``cryptography``, whose import alone costs a short-lived
``worker`` command more than the rest of its work, so a client only reads its files up front
(:func:`read_client`) and runs the full check (:func:`load_client`) to explain a connection
that failed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from jobworker.errors import InvalidArgument

if TYPE_CHECKING:
    from cryptography import x509


@dataclass(frozen=True, slots=True)
class Material:
    """PEM bytes for one side of a mutual TLS connection."""

    ca: bytes
    cert: bytes
    key: bytes


@dataclass(frozen=True, slots=True)
class Paths:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_pki(cls, directory: Path, name: str) -> Paths:
        """``ca.pem``, ``NAME.pem`` and ``NAME-key.pem`` of a ``certs init`` directory."""
        return cls(directory / "ca.pem", directory / f"{name}.pem", directory / f"{name}-key.pem")


def _read(what: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise InvalidArgument(f"cannot read the {what} {path}: {e.strerror}") from e


def _read_all(paths: Paths, side: str) -> Material:
    return Material(
        _read("CA certificate", paths.ca),
        _read(f"{side} certificate", paths.cert),
        _read(f"{side} key", paths.key),
    )


def _load(paths: Paths, eku: x509.ObjectIdentifier, side: str) -> Material:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    material = _read_all(paths, side)
    ca, cert_pem, key_pem = material.ca, material.cert, material.key
    try:
        x509.load_pem_x509_certificates(ca)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise InvalidArgument(f"{paths.ca} or {paths.cert} is not a PEM certificate: {e}") from e
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"{paths.key} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(
            f"{paths.key} must be an ECDSA key (P-256): the TLS-1.3-only rule depends on it"
        )
    if key.public_key() != cert.public_key():
        raise InvalidArgument(f"{paths.key} is not the key of {paths.cert}")
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and eku not in usages:
        raise InvalidArgument(f"{paths.cert} is not a {side} certificate (extended key usage)")
    return material


def load_server(paths: Paths) -> Material:
    """Read and check the daemon's CA, certificate and key.

    Raises :class:`InvalidArgument` naming the file when one is unreadable, not PEM, not
    ECDSA, not matching, or the certificate is not for serverAuth.
    """
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return _load(paths, ExtendedKeyUsageOID.SERVER_AUTH, "server")


def load_client(paths: Paths) -> Material:
    """Read and check a client's CA, certificate and key (same errors as :func:`load_server`)."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    return _load(paths, ExtendedKeyUsageOID.CLIENT_AUTH, "client")


_PEM_MARKERS = (
    ("CA certificate", "ca", b"-----BEGIN CERTIFICATE-----"),
    ("client certificate", "cert", b"-----BEGIN CERTIFICATE-----"),
    ("client key", "key", b"PRIVATE KEY-----"),
)


def read_client(paths: Paths) -> Material:
    """Read a client's CA, certificate and key, checking only that each looks like PEM of its
    kind (:class:`InvalidArgument` naming the file otherwise). :func:`load_client` is the full
    check, for when the daemon refuses what was read."""
    material = _read_all(paths, "client")
    for what, field, marker in _PEM_MARKERS:
        if marker not in getattr(material, field):
            path = getattr(paths, field)
            raise InvalidArgument(f"{path} is not a PEM-encoded {what}")
    return material
