"""The root command group: its commands are imported when used, and its ``main`` turns every
failure into one line on stderr and an exit code."""

from __future__ import annotations

import gc
import importlib
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import click

from jobworker.client.cli.exits import (
    PROG,
    CommandExit,
    Exit,
    StdoutClosed,
    error_exit,
    silence_stdout,
    warn,
)
from jobworker.client.cli.imports import collector_paused
from jobworker.client.cli.settings import DEFAULT_ADDRESS
from jobworker.errors import JobworkerError

COMPLETE_VAR = "_WORKER_COMPLETE"


class WorkerGroup(click.Group):
    """Maps every failure to one line on stderr and an exit code (:class:`Exit`).

    ``lazy`` names commands by where they are defined (``NAME: "MODULE:ATTRIBUTE"``, a module
    of :mod:`jobworker.client.cli`), imported when the command is first looked up: a command
    pays for its own module (and what it imports), not for every other command's. ``--help``
    and shell completion list every command, so they import them all."""

    def __init__(self, *args: Any, lazy: Mapping[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            name = f"jobworker.client.cli.{module}"
            # As for the first imports (jobworker.client.cli): their objects live as long as
            # the process; a module imported before (a long-lived caller) freezes nothing.
            with collector_paused(freeze=name not in sys.modules):
                command = getattr(importlib.import_module(name), attribute)
            assert isinstance(command, click.Command), self.lazy[cmd_name]
            self.add_command(command, cmd_name)
        return self.commands.get(cmd_name)

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> NoReturn:
        code = self.run(args, prog_name, complete_var, **extra)
        # A failed RPC leaves reference cycles (error -> traceback -> frames -> call) that hold
        # grpc objects; left to the interpreter's exit they make grpc's shutdown wait ~2 s.
        gc.collect()
        sys.exit(code)

    def run(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        **extra: Any,
    ) -> int:
        """The command's exit code, for a caller that ends the process itself without the
        interpreter's shutdown (the console script: :func:`~jobworker.client.cli.exits.leave`),
        so has no grpc garbage to collect first."""
        return self._main(args, prog_name or PROG, complete_var or COMPLETE_VAR, extra)

    def _main(
        self, args: Sequence[str] | None, prog_name: str, complete_var: str, extra: Any
    ) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            return rv if isinstance(rv, int) else 0
        except CommandExit as e:
            if e.message:
                warn(e.message)
            return e.code
        except StdoutClosed:
            silence_stdout()
            return Exit.STDOUT_CLOSED
        except click.UsageError as e:
            warn(usage_line(e))
            return Exit.USAGE
        except click.ClickException as e:
            warn(" ".join(e.format_message().split()))
            return e.exit_code
        except (click.Abort, KeyboardInterrupt):
            return Exit.INTERRUPTED
        except JobworkerError as e:
            failure = error_exit(e, DEFAULT_ADDRESS)
            warn(failure.message)
            return failure.code
        except BrokenPipeError:
            silence_stdout()
            return Exit.STDOUT_CLOSED


def usage_line(e: click.UsageError) -> str:
    """Click's usage error as one line (its own display is a four-line block): the message and
    where to read more."""
    command = e.ctx.command_path if e.ctx is not None else PROG
    return f"{' '.join(e.format_message().split())} (see '{command} --help')"
