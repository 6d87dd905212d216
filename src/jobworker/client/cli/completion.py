"""Shell completion: job ids asked from the daemon (the commands' ``ID`` arguments,
:data:`.control.JOB_ID`, import this when the shell asks), and the ``completion`` command."""

from __future__ import annotations

import dataclasses
import shlex
from typing import TYPE_CHECKING

import click

from jobworker.client.cli.exits import PROG
from jobworker.client.cli.group import COMPLETE_VAR
from jobworker.client.cli.session import run_sync
from jobworker.client.cli.settings import Settings
from jobworker.spec import JobStatus

if TYPE_CHECKING:
    # click's completion module is imported when completing, or printing the script.
    from click.shell_completion import CompletionItem


def complete_job_ids(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Job ids for shell completion; quietly nothing when the daemon cannot be asked."""
    from click.shell_completion import CompletionItem

    # The group's callback does not run while completing: build the settings from its
    # parameters (options and WORKER_* variables), as it would.
    params = ctx.find_root().params
    fields = {f.name for f in dataclasses.fields(Settings)}
    settings = Settings(**{k: v for k, v in params.items() if k in fields and v is not None})

    async def ids() -> list[JobStatus]:
        async with dataclasses.replace(settings, timeout=2.0).connect() as client:
            return await client.list(all=True)

    try:
        jobs = run_sync(ids())
    except Exception:
        return []
    return [
        CompletionItem(s.id, help=f"{s.state.value}: {shlex.join(s.argv)}"[:60])
        for s in jobs
        if s.id.startswith(incomplete)
    ]


@click.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    \b
      bash: echo 'eval "$(worker completion bash)"' >> ~/.bashrc
      zsh:  echo 'eval "$(worker completion zsh)"' >> ~/.zshrc
      fish: worker completion fish > ~/.config/fish/completions/worker.fish
    """
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None, "click supports bash, zsh and fish"
    root = click.get_current_context().find_root().command
    click.echo(cls(root, {}, PROG, COMPLETE_VAR).source())
