"""Mutual TLS material and the TLS-1.3-only rule.

grpcio has no setting for a minimum TLS version, and its auth context does not say which version
was negotiated (it holds ``transport_security_type``, ``security_level``, ``ssl_session_reused``
and the ``x509_*`` peer fields only). So TLS 1.2 is made impossible instead of detected:

1. ``GRPC_SSL_CIPHER_SUITES`` (the TLS <= 1.2 cipher list; BoringSSL's TLS 1.3 suites are fixed
   and unaffected) is set to :data:`TLS12_SUITES`, suites that authenticate the server with an
   RSA key only;
2. the server key must be ECDSA (:func:`load_server`), so no TLS 1.2 suite is usable and a 1.2
   ClientHello ends in ``NO_SHARED_CIPHER`` before any certificate is sent;
3. grpc reads the variable once, when it is imported. Importing this module sets it, so it must
   be imported before ``grpc`` (``jobworker.service`` and ``jobworker.client`` do). Because
   import order is easy to get wrong, the daemon also probes its own port at start with a TLS
   1.2 ClientHello (:func:`accepts_tls12`) and refuses to serve if a ServerHello comes back.

This module does not import grpc: it reads and checks PEM files and hands out bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from jobworker.errors import InvalidArgument

CIPHER_SUITES_ENV = "GRPC_SSL_CIPHER_SUITES"
TLS12_SUITES = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"
"""The only TLS 1.2 suites grpc may offer or accept: RSA-authenticated, so unusable with the
ECDSA keys jobworker requires. TLS 1.3 suites are not configurable and stay enabled."""


def _configure() -> bool:
    """Set the cipher list unless grpc has already read the environment without it."""
    if os.environ.get(CIPHER_SUITES_ENV) == TLS12_SUITES:
        return True
    if "grpc" in sys.modules:
        return False
    os.environ[CIPHER_SUITES_ENV] = TLS12_SUITES
    return True


TLS13_ONLY = _configure()
"""Whether this process's grpc refuses TLS 1.2 (False when grpc was imported before us)."""


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


def _load(paths: Paths, eku: x509.ObjectIdentifier, side: str) -> Material:
    ca, cert_pem, key_pem = (
        _read("CA certificate", paths.ca),
        _read(f"{side} certificate", paths.cert),
        _read(f"{side} key", paths.key),
    )
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
    return Material(ca, cert_pem, key_pem)


def load_server(paths: Paths) -> Material:
    """Read and check the daemon's CA, certificate and key.

    Raises :class:`InvalidArgument` naming the file when one is unreadable, not PEM, not
    ECDSA, not matching, or the certificate is not for serverAuth.
    """
    return _load(paths, ExtendedKeyUsageOID.SERVER_AUTH, "server")


def load_client(paths: Paths) -> Material:
    """Read and check a client's CA, certificate and key (same errors as :func:`load_server`)."""
    return _load(paths, ExtendedKeyUsageOID.CLIENT_AUTH, "client")


_RECORD_HANDSHAKE = 0x16
_SERVER_HELLO = 0x02


def accepts_tls12(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether the TLS server at ``host:port`` answers a TLS-1.2-only ClientHello with a
    ServerHello, i.e. agrees to speak TLS 1.2. Blocking.

    Only the first server record is read: the answer is known before any certificate matters,
    so no client certificate is needed and a refusal cannot be mistaken for a client-auth
    failure.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    ctx.set_alpn_protocols(["h2"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    head = b""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(hello)
        while len(head) < 6:
            try:
                data = sock.recv(6 - len(head))
            except ConnectionResetError:
                break
            if not data:
                break
            head += data
    return len(head) == 6 and head[0] == _RECORD_HANDSHAKE and head[5] == _SERVER_HELLO
