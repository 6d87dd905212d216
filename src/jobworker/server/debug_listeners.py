"""The debug endpoint's listeners: bounded thread-per-connection servers on a 0600 Unix socket
(peer uid checked) and on HTTPS with mutual TLS for admin certificates."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import ssl
import stat
import struct
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from jobworker.errors import HostError, InvalidArgument, Unauthenticated
from jobworker.identity import Role
from jobworker.server.authz import Policy, Revocations, identity_from_certificate, revocation_key
from jobworker.tls import Material

log = logging.getLogger("jobworker.server.debug")
"""The logger these lines had before this module was split out of the debug endpoint's."""

SOCKET_MODE = 0o600
CONNECTION_TIMEOUT = 10.0
"""Socket timeout of a connection: the TLS handshake, reading the request, writing the answer
(a profile's sampling time is not counted: nothing is read or written meanwhile)."""
MAX_CONNECTIONS = 16
"""Connections served at once (each has a thread); more are closed at once."""


class _Peer(threading.local):
    refused: str | None = None
    """Why this thread's connection may not be answered (403), or ``None``."""


class _Limited(socketserver.ThreadingMixIn):
    """Bounded thread-per-connection serving, with each connection vetted by :meth:`admit`."""

    daemon_threads = False
    """Request threads are joined at close (a profile is cut short first)."""
    block_on_close = True

    def setup_limits(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.peer = _Peer()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("debug endpoint: more than %d connections; closing one", MAX_CONNECTIONS)
            self.shutdown_request(request)  # type: ignore[attr-defined]
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Not the stdlib's traceback on stderr: a client that went away is no failure.
        log.debug("debug endpoint: connection failed", exc_info=True)


class _TLSServer(_Limited, ThreadingHTTPServer):
    """HTTPS with mutual TLS; the handshake runs in the connection's thread, not the accept
    loop, so a peer that stalls it holds up nobody else."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        context: ssl.SSLContext,
        policy: Policy | None,
        revocations: Revocations,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.context = context
        self.access = (policy, revocations)
        """The policy and CRL of the next connection: one tuple, swapped whole on reload (the
        connection threads read it without a lock)."""
        self.setup_limits()
        super().__init__(address, handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        try:
            # wrap_socket takes over the fd: closing ``tls`` closes the connection.
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log.info("debug endpoint: TLS handshake with %s failed: %s", client_address[0], e)
            return
        try:
            self.peer.refused = self._refusal(tls)
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            self.peer.refused = None
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()

    def _refusal(self, tls: ssl.SSLSocket) -> str | None:
        der = tls.getpeercert(binary_form=True)
        if der is None:  # pragma: no cover - CERT_REQUIRED fails the handshake first
            return "a client certificate is required"
        policy, revocations = self.access
        pem = ssl.DER_cert_to_PEM_cert(der).encode()
        try:
            identity = identity_from_certificate(pem, policy)
            revocations.check(revocation_key(pem), identity.name)
        except Unauthenticated as e:
            log.warning("debug endpoint: refused a client: %s", e)
            return f"the debug endpoint is for admins: {e}"
        if identity.role is not Role.ADMIN:
            log.warning("debug endpoint: refused %s (role %s)", identity.name, identity.role)
            return f"the debug endpoint is for admins; {identity.name} is {identity.role}"
        return None


class _UnixServer(_Limited, socketserver.UnixStreamServer):
    def __init__(self, sock: socket.socket, path: str, handler: type[BaseHTTPRequestHandler]):
        self.setup_limits()
        super().__init__(path, handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(CONNECTION_TIMEOUT)
        creds = request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        # The socket's mode already keeps other accounts out; this holds if it is ever widened.
        self.peer.refused = (
            None if uid in (0, os.geteuid()) else f"uid {uid} may not use the debug endpoint"
        )
        try:
            super().finish_request(request, client_address)
        finally:
            self.peer.refused = None


def _bind_unix(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, mode 0600 from the start.

    It is bound in a fresh 0700 directory next to ``path``, chmod-ed, then renamed into place,
    so no other account can connect in between (no process-wide umask is touched). A stale
    socket left by a daemon that died is replaced; a live one, or any other file, is not."""
    if len(os.fsencode(path)) > 100:
        raise InvalidArgument(f"debug socket path {path} is too long for a Unix socket")
    with contextlib.suppress(FileNotFoundError):
        mode = path.lstat().st_mode
        if not stat.S_ISSOCK(mode):
            raise HostError(f"debug socket {path} exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except ConnectionRefusedError:
                path.unlink()  # stale
            else:
                raise HostError(f"debug socket {path} is in use by another process")
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".dbg", dir=path.parent))
    except OSError as e:
        raise HostError(f"cannot create the debug socket in {path.parent}: {e.strerror}") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        bound = scratch / "s"
        sock.bind(str(bound))
        os.chmod(bound, SOCKET_MODE)
        sock.listen(socketserver.TCPServer.request_queue_size)
        os.rename(bound, path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            (scratch / "s").unlink()
        raise HostError(f"cannot create the debug socket {path}: {e.strerror}") from e
    finally:
        scratch.rmdir()
    return sock


def _tls_context(material: Material) -> ssl.SSLContext:
    """Server side of mutual TLS 1.3 with the gRPC server's CA, certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=material.ca.decode())
    # ssl loads a key only from a file: an anonymous memory file, never on disk.
    fd = os.memfd_create("jobworker-debug-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, material.cert + b"\n" + material.key)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return ctx
