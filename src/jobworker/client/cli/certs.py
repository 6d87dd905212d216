"""``worker certs``: make the CA, the server's and users' certificates, offline (and a fleet
host's: ``certs host``, docs/fleet.md)."""

from __future__ import annotations

from pathlib import Path

import click

from jobworker.client.cli.exits import CommandExit, Exit
from jobworker.client.cli.settings import default_pki_dirs
from jobworker.errors import InvalidArgument


@click.group()
def certs() -> None:
    """Make certificates for workerd and its users."""


@certs.command(name="init")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: str(default_pki_dirs()[0]),
    show_default="~/.config/jobworker/pki",
    help="Where to write the PKI (created 0700; an existing one must be yours and not "
    "writable by others).",
)
@click.option(
    "--user",
    "users",
    multiple=True,
    metavar="NAME:ROLE",
    help="A user certificate to make (roles: admin, user, viewer); repeatable. NAME may not "
    "be a role, ca or server.  [default for a new CA: ops:admin, alice:user, vera:viewer]",
)
@click.option(
    "--server-name",
    multiple=True,
    metavar="NAME",
    help="Extra DNS name or IP for the server certificate (localhost, 127.0.0.1 and ::1 "
    "are always in); repeatable.",
)
@click.option("--force", is_flag=True, help="Start over: new CA and certificates, replacing files.")
def certs_init(
    directory: Path, users: tuple[str, ...], server_name: tuple[str, ...], force: bool
) -> None:
    """Create a CA, a server certificate and user certificates (ECDSA P-256), offline.

    Run again with --user to add users to an existing CA. For development and small fleets;
    with your own CA, give workerd --ca/--cert/--key and clients certificates carrying
    clientAuth, the identity as CN and the role as OU.

    \b
      worker certs init --dir /etc/jobworker/pki --user ops:admin --server-name worker1.example
      workerd --pki /etc/jobworker/pki
    """
    from jobworker.client.pki import PkiError, init_pki, parse_user

    try:
        parsed = [parse_user(u) for u in users]
    except PkiError as e:
        raise click.BadParameter(str(e), param_hint="--user") from e
    try:
        pki = init_pki(directory, parsed, server_name, force=force)
    except PkiError as e:
        raise CommandExit(Exit.CONFIG, str(e)) from e
    except OSError as e:
        raise CommandExit(Exit.CONFIG, f"cannot write the PKI in {directory}: {e}") from e
    click.echo(f"PKI in {pki.dir}:")
    click.echo(f"  CA      {pki.ca.cert.name}, {pki.ca.key.name} (keep the key safe)")
    click.echo(f"  server  {pki.server.cert.name}, {pki.server.key.name}")
    for name, pair in pki.users.items():
        click.echo(f"  {name:<7} {pair.cert.name}, {pair.key.name}")
    click.echo(f"Start the daemon with: workerd --pki {pki.dir}")
    click.echo(f"Use it with: worker --pki {pki.dir} --user NAME ...")


_DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=lambda: str(default_pki_dirs()[0]),
    show_default="~/.config/jobworker/pki",
    help="The `certs init` directory (with ca.pem and ca-key.pem).",
)


@certs.command(name="revoke")
@click.argument("name")
@_DIR_OPTION
def certs_revoke(name: str, directory: Path) -> None:
    """Revoke NAME's certificate (NAME.pem): add its serial to crl.pem, signed by the CA.

    Earlier revocations are kept; the CRL says to expect the next one within 30 days. workerd
    applies it on SIGHUP (or at start), refusing every RPC with that certificate, open
    connections included. To replace a lost or leaked certificate, revoke it, then renew.

    \b
      worker certs revoke alice --dir /etc/jobworker/pki && systemctl reload workerd
    """
    from jobworker.client.pki import PkiError, revoke

    try:
        done = revoke(directory, name)
    except PkiError as e:
        raise CommandExit(Exit.CONFIG, str(e)) from e
    except OSError as e:
        raise CommandExit(Exit.CONFIG, f"cannot revoke {name} in {directory}: {e}") from e
    what = "was already revoked" if done.already else "revoked"
    click.echo(
        f"{name} (serial {done.serial:#x}) {what}: {done.crl} lists {done.count} "
        f"certificate(s), next update by {done.next_update:%Y-%m-%d}"
    )
    click.echo("Apply it: send workerd SIGHUP (kill -HUP PID, or systemctl reload workerd)")


@certs.command(name="renew")
@click.argument("name")
@_DIR_OPTION
def certs_renew(name: str, directory: Path) -> None:
    """Re-issue NAME's certificate (or the server's: NAME = server): a new key and serial, the
    same name and role, valid 90 days. Replaces NAME.pem and NAME-key.pem.

    The old certificate stays valid until it expires; revoke it first if its key leaked. After
    renewing the server's, send workerd SIGHUP to serve the new one.
    """
    from cryptography import x509

    from jobworker.client.pki import PkiError, renew

    try:
        pair = renew(directory, name)
    except PkiError as e:
        raise CommandExit(Exit.CONFIG, str(e)) from e
    except OSError as e:
        raise CommandExit(Exit.CONFIG, f"cannot renew {name} in {directory}: {e}") from e
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    click.echo(
        f"{name}: {pair.cert.name}, {pair.key.name} renewed (serial {cert.serial_number:#x}), "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )


@certs.command(name="host")
@click.argument("name")
@click.option(
    "--san",
    multiple=True,
    metavar="NAME",
    help="Another DNS name or IP the certificate names (the address in --advertise); repeatable.",
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The PKI (from `worker certs init`) whose CA signs it.",
)
def certs_host(name: str, san: tuple[str, ...], directory: Path) -> None:
    """A server certificate for fleet host NAME, in DIR/hosts/NAME/ (ca.pem, server.pem,
    server-key.pem): `workerd --pki DIR/hosts/NAME --fleet URL --name NAME ...`.

    NAME is always among its names (clients check it); localhost, 127.0.0.1 and ::1 too.
    """
    from jobworker.api.fleet import check_name
    from jobworker.client.pki import PkiError, issue_server, load_ca, write_pair

    try:
        check_name(name)
        ca_cert, ca_key = load_ca(directory)
        out = directory / "hosts" / name
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        cert, key = issue_server(ca_cert, ca_key, (name, *san))
        write_pair(out, "server", cert, key)
        (out / "ca.pem").write_bytes((directory / "ca.pem").read_bytes())
    except (PkiError, InvalidArgument) as e:
        raise CommandExit(Exit.CONFIG, str(e)) from e
    except OSError as e:
        raise CommandExit(Exit.CONFIG, f"cannot write the certificate of {name}: {e}") from e
    click.echo(str(out))
