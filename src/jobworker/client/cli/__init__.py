"""``worker``: the command line client of workerd.

Every remote command goes through :class:`jobworker.client.Client`; the CLI never talks gRPC
itself, and imports the client (and grpc) only when a command needs the daemon, so
``worker --help`` and shell completion start fast.

Errors end the command with one line on stderr and an exit code from :class:`Exit`; the table is
in ``worker --help``. ``wait`` and ``run`` pass the job's own exit code through (128 + N when
signal N ended it), so for them a code in the 64-78 range may also be the job's: scripts that
must tell the two apart read ``worker status --json``.

One module per job: :mod:`.settings` (options, PKI lookup), :mod:`.session` (the reconnecting
connection), :mod:`.render` (text and JSON), :mod:`.group` (failures to exit codes, commands
imported when used), :mod:`.exits` (the codes), :mod:`.app` (the root command and where each
command is), :mod:`.control`, :mod:`.jobs`, :mod:`.attach`, :mod:`.certs` and
:mod:`.completion` (the commands); :mod:`.fleet` and :mod:`.fleet_run` add the fleet
(docs/fleet.md) to them. A command imports only its own module: ``worker status`` does not
load start's options, the terminal or the fleet.
"""

from __future__ import annotations

from typing import NoReturn

from jobworker.client.cli.imports import collector_paused

with collector_paused(freeze=True):
    from jobworker.client.cli.app import cli
    from jobworker.client.cli.exits import PROG, Exit, leave


def main() -> NoReturn:
    """The ``worker`` console script."""
    try:
        code = cli.run(prog_name=PROG)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    # The process ends without the interpreter's shutdown (grpc's would wait on the garbage of
    # a failed call), so there is nothing to collect first: a full collection of everything
    # the command imported costs more than the call.
    leave(code)


__all__ = ["Exit", "cli", "main"]
