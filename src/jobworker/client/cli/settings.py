"""How ``worker`` reaches the daemon: options, ``WORKER_*`` variables and the PKI lookup."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from jobworker.errors import ConfigError, InvalidArgument

if TYPE_CHECKING:
    from jobworker.client import Client

DEFAULT_ADDRESS = "127.0.0.1:50051"
"""workerd's default listen address."""
DEFAULT_TIMEOUT = 30.0
DEFAULT_RECONNECT = 60.0


def default_pki_dirs() -> list[Path]:
    """Where a PKI directory is looked for when neither --pki nor WORKER_PKI is given."""
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return [Path(config) / "jobworker" / "pki", Path("/etc/jobworker/pki")]


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """How to reach the daemon, from options and ``WORKER_*`` variables."""

    addr: str = DEFAULT_ADDRESS
    pki: Path | None = None
    user: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    reconnect: float = DEFAULT_RECONNECT
    follow: bool = False
    """The original's ``worker -f logs ID``: ``-f`` given before the command."""
    fleet: str | None = None
    """etcd's client URLs (``--fleet``): fleet commands and ``HOST/ID`` job ids use them."""
    etcd_ca: Path | None = None
    etcd_cert: Path | None = None
    etcd_key: Path | None = None
    server_name: str | None = None
    """The name the daemon's certificate must carry (default: the host of ``addr``); set when
    a fleet id routes a command to its host."""

    def pki_dir(self) -> Path:
        if self.pki is not None:
            return self.pki
        for candidate in default_pki_dirs():
            if (candidate / "ca.pem").exists():
                return candidate
        looked = ", ".join(str(p) for p in default_pki_dirs())
        raise ConfigError(
            "no client certificate configured: give --pki DIR and --user NAME (or WORKER_PKI "
            f"and WORKER_USER), or --ca/--cert/--key; looked for a PKI in {looked}"
        )

    def identity(self, pki: Path) -> str:
        """The user whose certificate to use: --user, else the login name if the PKI has a
        certificate for it, else the only user certificate in the PKI."""
        if self.user:
            return self.user
        users = pki_users(pki)
        import getpass  # (and termios) only when no --user is given

        with contextlib.suppress(Exception):
            login = getpass.getuser()
            if login in users:
                return login
        if len(users) == 1:
            return users[0]
        raise ConfigError(
            f"which identity? give --user NAME (or WORKER_USER); {pki} has certificates for "
            f"{', '.join(users) or 'nobody'}"
        )

    def tls_paths(self) -> tuple[Path, Path, Path]:
        """(ca, cert, key): explicit files win over those picked from the PKI directory."""
        if self.ca and self.cert and self.key:
            return self.ca, self.cert, self.key
        pki = self.pki_dir()
        user = self.identity(pki)
        return (
            self.ca or pki / "ca.pem",
            self.cert or pki / f"{user}.pem",
            self.key or pki / f"{user}-key.pem",
        )

    def connect(self) -> Client:
        """A client for the daemon; raises :class:`ConfigError` for unusable certificates."""
        # grpc's C core logs failed handshakes and connects on stderr; the CLI reports errors
        # itself, in one line. GRPC_VERBOSITY=debug still works for debugging.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        from jobworker.client.cli.imports import collector_paused

        with collector_paused(freeze="jobworker.client.client" not in sys.modules):
            from jobworker.client import Client

        ca, cert, key = self.tls_paths()
        try:
            # Only read: parsing them needs cryptography, whose import costs more than a short
            # command's whole work; explain_failure parses them if the daemon turns us away.
            return Client.from_files(
                self.addr,
                ca,
                cert,
                key,
                check=False,
                timeout=self.timeout,
                server_name=self.server_name,
            )
        except InvalidArgument as e:
            raise ConfigError(str(e)) from e

    def explain_failure(self) -> None:
        """Raise :class:`ConfigError` if the certificate files are why a connection failed
        (not PEM, an unusable key, a key that is not the certificate's, not a client
        certificate); return if they look fine."""
        from jobworker import tls

        try:
            tls.load_client(tls.Paths(*self.tls_paths()))
        except InvalidArgument as e:
            raise ConfigError(str(e)) from e


def pki_users(pki: Path) -> list[str]:
    """Names with a certificate and key in a PKI directory (not the CA or the server)."""
    try:
        names = sorted(p.name.removesuffix(".pem") for p in pki.glob("*.pem"))
    except OSError:
        return []
    return [
        n
        for n in names
        if n not in {"ca", "server"} and not n.endswith("-key") and (pki / f"{n}-key.pem").exists()
    ]


def settings_of(ctx: click.Context) -> Settings:
    obj = ctx.find_object(Settings)
    assert obj is not None, "the worker group sets the settings"
    return obj
