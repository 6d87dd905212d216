"""The daemon's TLS-1.3-only rule.

grpcio has no setting for a minimum TLS version, and its auth context does not say which version
was negotiated (it holds ``transport_security_type``, ``security_level``, ``ssl_session_reused``
and the ``x509_*`` peer fields only). So TLS 1.2 is made impossible instead of detected:

1. ``GRPC_SSL_CIPHER_SUITES`` (the TLS <= 1.2 cipher list; BoringSSL's TLS 1.3 suites are fixed
   and unaffected) is set to :data:`TLS12_SUITES`, suites that authenticate the server with an
   RSA key only;
2. the server key must be ECDSA (:func:`jobworker.tls.load_server`), so no TLS 1.2 suite is
   usable and a 1.2 ClientHello ends in ``NO_SHARED_CIPHER`` before any certificate is sent;
3. grpc reads the variable once, when it is imported. Importing this module sets it, so it must
   be imported before ``grpc`` (:mod:`jobworker.server.service` does). Because import order is
   easy to get wrong, the daemon also probes its own port with a TLS 1.2 ClientHello
   (:func:`accepts_tls12`) and refuses to serve if a ServerHello comes back.

Only the daemon imports this module: the variable is process-wide, and a program embedding the
client may talk TLS 1.2 to other servers. The client needs nothing: it offers TLS 1.3 and 1.2,
and the daemon accepts only 1.3.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import sys

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
