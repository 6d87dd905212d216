"""The root ``worker`` command: its connection options, which every command reads, and where
each command is defined (imported when it runs: :class:`~.group.WorkerGroup`)."""

from __future__ import annotations

from pathlib import Path

import click

from jobworker.client.cli.exits import EXIT_CODES_HELP, PROG
from jobworker.client.cli.group import WorkerGroup
from jobworker.client.cli.settings import (
    DEFAULT_ADDRESS,
    DEFAULT_RECONNECT,
    DEFAULT_TIMEOUT,
    Settings,
)

COMMANDS = {
    "attach": "attach:attach",
    "certs": "certs:certs",
    "completion": "completion:completion",
    "hosts": "fleet:hosts",
    "list": "control:list_",
    "logs": "control:logs",
    "rm": "control:rm",
    # start and run as jobs defines them, with the fleet's --on added by fleet_run
    "run": "fleet_run:run",
    "start": "fleet_run:start",
    "status": "control:status",
    "stop": "control:stop",
    "wait": "control:wait",
}
"""Every subcommand of ``worker``, by where it is defined (``MODULE:ATTRIBUTE``)."""


@click.group(
    cls=WorkerGroup,
    lazy=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
    epilog=EXIT_CODES_HELP,
)
@click.option(
    "--addr",
    envvar="WORKER_ADDR",
    default=DEFAULT_ADDRESS,
    show_envvar=True,
    help="workerd's HOST:PORT.",
)
@click.option(
    "--pki",
    envvar="WORKER_PKI",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A `worker certs init` directory: uses ca.pem, USER.pem and USER-key.pem.  "
    "[default: ~/.config/jobworker/pki, else /etc/jobworker/pki]",
)
@click.option(
    "--user",
    envvar="WORKER_USER",
    show_envvar=True,
    help="Whose certificate to use from --pki.  [default: your login name if the PKI has it, "
    "else its only user]",
)
@click.option(
    "--ca",
    envvar="WORKER_CA",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate the daemon's certificate must chain to (overrides --pki).",
)
@click.option(
    "--cert",
    envvar="WORKER_CERT",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Your client certificate (overrides --pki/--user).",
)
@click.option(
    "--key",
    envvar="WORKER_KEY",
    show_envvar=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Your client key (overrides --pki/--user).",
)
@click.option(
    "--timeout",
    envvar="WORKER_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0, min_open=True),
    metavar="SECONDS",
    default=DEFAULT_TIMEOUT,
    help="Seconds to wait for an answer (not for wait, logs -f or run).",
)
@click.option(
    "--reconnect",
    envvar="WORKER_RECONNECT",
    show_envvar=True,
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    default=DEFAULT_RECONNECT,
    help="Seconds logs, wait and run keep trying to reconnect after the connection drops.",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Only before `logs`: `worker -f logs ID` is `worker logs -f ID`.",
)
@click.option(
    "--fleet",
    envvar="WORKER_FLEET",
    show_envvar=True,
    metavar="URL",
    help="etcd of a fleet of workerd hosts (http://10.0.0.5:2379,...): for hosts, list, "
    "start/run --on, and HOST/ID job ids (docs/fleet.md).",
)
@click.option(
    "--etcd-ca",
    envvar="WORKER_ETCD_CA",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA of etcd's certificate (https:// --fleet).",
)
@click.option(
    "--etcd-cert",
    envvar="WORKER_ETCD_CERT",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Client certificate for etcd.",
)
@click.option(
    "--etcd-key",
    envvar="WORKER_ETCD_KEY",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Key of --etcd-cert.",
)
@click.version_option(package_name="jobworker", prog_name=PROG)
@click.pass_context
def cli(
    ctx: click.Context,
    addr: str,
    pki: Path | None,
    user: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    timeout: float,
    reconnect: float,
    follow: bool,
    fleet: str | None,
    etcd_ca: Path | None,
    etcd_cert: Path | None,
    etcd_key: Path | None,
) -> None:
    """Run commands on a workerd, each in its own cgroup, and stream their output.

    \b
      id=$(worker start -- sh -c 'for i in 1 2 3; do echo $i; sleep 1; done')
      worker logs -f "$id"
      worker status "$id"
      worker run --memory 256M --pids 64 -- make -j4; echo "exit $?"

    Connection options can also be set in the environment (WORKER_ADDR, WORKER_PKI,
    WORKER_USER, ...). After `make run`, `. dev/env` sets them for the demo daemon.
    Shell completion: `eval "$(worker completion bash)"` (or zsh, fish).
    """
    ctx.obj = Settings(
        addr=addr,
        pki=pki,
        user=user,
        ca=ca,
        cert=cert,
        key=key,
        timeout=timeout,
        reconnect=reconnect,
        follow=follow,
        fleet=fleet,
        etcd_ca=etcd_ca,
        etcd_cert=etcd_cert,
        etcd_key=etcd_key,
    )
    if follow and ctx.invoked_subcommand != "logs":
        raise click.UsageError("-f/--follow before the command applies to `logs` only")
